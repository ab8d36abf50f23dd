"""Reads in the page, in a real browser (headless Chromium against ``serve --db``): with "read first"
on, the AI result of an unread study is hidden in the worklist and the detail; the radiologist
saves a read through the form; then the result shows, and the store holds the read with its reader.
Shadow mode (the store setting) forces read-first. Skipped, with the apt line, without chromium."""

from __future__ import annotations

from browser_worklist import NEEDS_CHROMIUM, browser, worklist_page  # noqa: F401 (fixtures)
from test_browser import serving, wait_for

from pneumoscan.serve.app import create_app
from pneumoscan.store import Store

pytestmark = NEEDS_CHROMIUM


def test_read_first_hides_the_result_until_the_read_is_saved(browser, worklist_page):  # noqa: F811
    from selenium.webdriver.common.by import By

    with worklist_page(shadow=True) as page:
        ids = page.ids
        css = lambda sel: browser.find_elements(By.CSS_SELECTOR, sel)  # noqa: E731
        wait_for(lambda: len(css("#studies-body tr.study-row")) >= 4, timeout=60, what="the stored studies")
        wait_for(lambda: css("#read-first") and css("#read-first")[0].is_selected(), timeout=20,
                 what="shadow mode forcing read first")
        assert css("#read-first")[0].get_attribute("disabled") is not None
        row = css(f"#studies-body tr[data-id='{ids['odd']}']")[0]
        wait_for(lambda: "unread" in row.get_attribute("class"), timeout=10, what="the unread mark")
        assert not row.find_element(By.CLASS_NAME, "prob").is_displayed()  # the probability is hidden
        row.click()
        wait_for(lambda: css("#read-form"), timeout=20, what="the read form")
        assert not css("#study-detail .study-films")[0].is_displayed()
        css("#read-form input[value='PNEUMONIA']")[0].click()
        css("#read-form textarea")[0].send_keys("right lower lobe")
        css("#read-form input[name='reader']")[0].send_keys("Dr Read")
        css("#read-form button")[0].click()
        wait_for(lambda: "PNEUMONIA by Dr Read" in browser.find_element(By.ID, "study-detail").text, timeout=20,
                 what="the saved read in the detail")
        wait_for(lambda: css("#study-detail .study-films")[0].is_displayed(), timeout=20,
                 what="the AI result after the read")
    with Store.open(page.url) as store:
        reads = store.read_history(ids["odd"])
    assert [(r.label, r.reader, r.comment) for r in reads] == [("PNEUMONIA", "Dr Read", "right lower lobe")]


def test_drift_banner_says_what_to_do(trained_model, browser, tmp_path):  # noqa: F811
    """60 recent films all scored near 1.0 by the served model: the prevalence alert shows as a banner."""
    from selenium.webdriver.common.by import By

    from pneumoscan.core.files import file_sha256
    from pneumoscan.store import FilmHeader

    url = f"sqlite:///{tmp_path / 'pneumoscan.db'}"
    sha = file_sha256(trained_model)
    with Store.open(url) as store:
        store.register_model(sha, "tiny", "1")
        for i in range(60):
            film = store.upsert_film(FilmHeader(study_instance_uid=f"1.7.{i}", sop_instance_uid=f"1.7.{i}.1"),
                                     None).film
            store.record_result(film.id, sha, probability=0.999, label="PNEUMONIA", threshold=0.5)
    with serving(create_app(trained_model, db=url)) as base:
        browser.get(base + "/")
        wait_for(lambda: browser.find_elements(By.ID, "drift-banner"), timeout=60, what="the drift banner")
        text = browser.find_element(By.ID, "drift-banner").text
    assert "prevalence" in text and "recalibrate" in text
