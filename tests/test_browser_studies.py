"""The page's study worklist in a real browser: headless Chromium against ``serve --db``.

A study the store receives while the page is open appears in it, most suspicious first, flagged
ones under "Needs a human"; uploads keep working beside it (tests/test_browser.py covers them).
Skipped, with the apt line, without Debian's chromium and chromium-driver.
"""

from __future__ import annotations

from datetime import timedelta

from browser_worklist import NEEDS_CHROMIUM, browser, worklist_page  # noqa: F401 (fixtures)
from store_data import PATIENTS, SHA, T0, header
from test_browser import wait_for

from pneumoscan.store import Store

pytestmark = NEEDS_CHROMIUM


def test_a_stored_study_appears_in_the_page_most_suspicious_first(browser, worklist_page):  # noqa: F811
    from selenium.webdriver.common.by import By

    with worklist_page() as page:
        ids, url = page.ids, page.url
        find = browser.find_element

        def shown():  # group headings and patients, top to bottom (read in one go: rows are rebuilt)
            return browser.execute_script(
                "return [...document.querySelectorAll('#studies-body tr')].map(r => r.dataset.group || "
                "r.querySelector('.study-patient').textContent)")

        wait_for(lambda: len(shown()) == 7, timeout=60, what="the stored studies")
        assert find(By.ID, "studies").is_displayed()
        assert shown() == ["pneumonia", "Doe, Jane", "normal", "Roe, Richard",
                           "human", "Poe, Edgar", "Moe, Lateral"]
        assert PATIENTS[2][1] == browser.execute_script(  # the accession beside the name
            "return document.querySelector('#studies-body tr.study-row .study-accession').textContent")

        with Store.open(url) as store:  # the node scores a new study while the page is open
            film = store.upsert_film(header(5, 1, view_position="PA"), None, received_at=T0 + timedelta(hours=1)).film
            store.record_result(film.id, SHA, probability=0.98, label="PNEUMONIA", threshold=0.5)
        wait_for(lambda: shown()[:3] == ["pneumonia", "Zoe, Waiting", "Doe, Jane"], timeout=30,
                 what="the new study at the top")

        browser.execute_script("document.querySelector(`#studies-body tr[data-id='${arguments[0]}']`).click()",
                               ids["odd"])
        detail = find(By.ID, "study-detail")
        wait_for(lambda: "unusual for the training films" in detail.text, timeout=20, what="the study's films")
        assert "No read recorded yet." in detail.text
        assert "threshold" in find(By.ID, "model-info").text  # the upload half of the page still works
