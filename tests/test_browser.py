"""End to end in a real browser: headless Chromium drives the page against a running server.

Needs Debian's ``chromium`` and ``chromium-driver`` (CI installs them); skipped with the reason
when they are missing.
"""

from __future__ import annotations

import contextlib
import csv
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import servers
from conftest import synthetic_xray
from pneumoscan.serve.app import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
KEY = "ward-7-key"
CSV_COLUMNS = ["rank", "filename", "label", "probability", "threshold", "flags", "model_sha256", "error"]

pytestmark = [
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
    ),
    pytest.mark.slow,  # a real browser and server: about 20 s for the module; make test runs it
]


@contextlib.contextmanager
def serving(app):
    """``app`` under uvicorn on a free 127.0.0.1 port, in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port meanwhile
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def server(trained_model):
    """The real app with an API key."""
    with serving(create_app(trained_model, api_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def open_server(trained_model):
    """The real app without an API key."""
    with serving(create_app(trained_model, api_key=None)) as url:
        yield url


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1440,900"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads"),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float = 90, what: str = "condition"):
    return servers.wait_for(condition, what, timeout=timeout)


def test_upload_and_worklist(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    rng = np.random.default_rng(3)
    files = []
    for name, label in (("normal-1.png", 0), ("pneumonia-1.png", 1)):
        Image.fromarray(synthetic_xray(rng, label, 96)).save(tmp_path / name)
        files.append(tmp_path / name)
    (tmp_path / "notes.png").write_text("this is not an X-ray")
    files.append(tmp_path / "notes.png")

    browser.get(server + "/")
    find = browser.find_element
    banner = find(By.ID, "banner")
    assert banner.is_displayed()
    assert "Screening aid — not a diagnosis. A radiologist must review every image." in banner.text

    # the API needs a key: the page asks for it, keeps it in sessionStorage and then loads the model card
    dialog = wait_for(lambda: find(By.ID, "key-dialog").is_displayed() and find(By.ID, "key-dialog"),
                      what="the API key dialog")
    find(By.ID, "key-input").send_keys(KEY)
    find(By.ID, "key-save").click()
    wait_for(lambda: not dialog.is_displayed(), what="the dialog to close")
    wait_for(lambda: "threshold" in find(By.ID, "model-info").text, what="the model card")
    assert browser.execute_script("return sessionStorage.getItem('pneumoscan.apiKey')") == KEY
    assert find(By.ID, "key-button").is_displayed()  # this server needs a key (health: api_key_required)
    assert "single centre" in find(By.ID, "limits").text  # the model's limits, next to the results

    find(By.ID, "file-input").send_keys("\n".join(str(f) for f in files))
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "tr.row-done")) == 2
             and len(browser.find_elements(By.CSS_SELECTOR, "tr.row-error")) == 1, what="three results")

    rows = browser.find_elements(By.CSS_SELECTOR, "#worklist-body tr")
    done = [r for r in rows if "row-done" in r.get_attribute("class")]
    probs = [float(r.get_attribute("data-probability")) for r in done]
    assert probs == sorted(probs, reverse=True)  # most suspicious first
    assert [r.get_attribute("data-rank") for r in done] == ["1", "2"]
    for r in done:
        assert r.find_element(By.CLASS_NAME, "badge").text in ("NORMAL", "PNEUMONIA")
        assert re.fullmatch(r"(> 99\.9|< 0\.1|\d{1,2}\.\d) %", r.find_element(By.CLASS_NAME, "prob-value").text)
    error_row = browser.find_element(By.CSS_SELECTOR, "tr.row-error")
    assert "notes.png" in error_row.text and "not an image" in error_row.text

    done[0].click()
    # the overlay, or (issue 14) the sentence that the map is flat: the tiny test model's maps on these
    # synthetic images are flat, which the server now reports (cam_flat) instead of sending a blue wash
    wait_for(lambda: find(By.ID, "cam-flat").is_displayed() or browser.execute_script(
        "const i = document.getElementById('viewer-overlay'); return i.complete && i.naturalWidth > 0"),
        what="the Grad-CAM overlay or the flat-map sentence")
    assert find(By.ID, "cam-flat").is_displayed() != find(By.ID, "viewer-overlay").is_displayed()
    assert "%" in find(By.ID, "fact-probability").text

    find(By.ID, "export-button").click()
    def downloaded_rows():
        # Chromium may show the file before it has written all of it: wait for the whole table
        found = sorted((tmp_path / "downloads").glob("*.csv")) if (tmp_path / "downloads").is_dir() else []
        if not found:
            return None
        with open(found[0], newline="") as f:
            rows = list(csv.DictReader(f))
        return rows if len(rows) == 3 else None

    table = wait_for(downloaded_rows, timeout=20, what="the complete CSV download")
    assert list(table[0]) == CSV_COLUMNS
    (name,) = [p.name for p in (tmp_path / "downloads").glob("*.csv")]
    assert re.fullmatch(r"pneumoscan-worklist-\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.csv", name), name
    assert [r["filename"] for r in table][-1] == "notes.png" and table[-1]["error"]
    assert [float(r["probability"]) for r in table[:2]] == sorted((float(r["probability"]) for r in table[:2]),
                                                                  reverse=True)

    browser.save_screenshot(str(tmp_path / "page.png"))
    assert Image.open(tmp_path / "page.png").size[0] > 0
    # nothing blocked by the page's Content-Security-Policy, no script errors, nothing fetched from outside
    # (the 401 and 422 answers above are logged as "network" errors: expected)
    problems = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and e["source"] != "network"]
    assert not problems, problems
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(r.startswith(server) or r.startswith("data:") for r in resources), resources


# Every /v1/predict answer is held in the page until the test releases it by file name, and may be
# changed first (probability, label, the fields the API will add): the batch's middle is then
# observable step by step, whatever the tiny model scores.
GATE = """
const patches = arguments[0];
window.__released = new Set();
window.__waiting = new Map();
window.__release = (name) => {
  window.__released.add(name);
  const go = window.__waiting.get(name);
  if (go) go();
};
const realFetch = window.fetch;
window.fetch = async (url, opts) => {
  const res = await realFetch(url, opts);
  if (!String(url).startsWith('/v1/predict') || !res.ok) return res;
  const name = opts.body.get('file').name;
  const patch = patches[name] || {};
  const body = Object.assign(await res.json(), patch);
  if ('probability' in patch && !('logit' in patch)) delete body.logit;  // the page then derives it
  if (!('flags' in patch)) { body.flags = []; body.flag_details = []; }  // the tiny model's own flags aside
  if (!window.__released.has(name)) await new Promise((go) => window.__waiting.set(name, go));
  return new Response(JSON.stringify(body), {status: 200, headers: {'content-type': 'application/json'}});
};
"""

PATCHES = {
    "a.png": {"probability": 0.2, "prediction": 0, "label": "NORMAL"},
    # the server now says whether a map is flat (issue 14); b's must show, whatever the test model drew
    "b.png": {"probability": 0.9999999, "logit": 16.0, "prediction": 1, "label": "PNEUMONIA", "cam_flat": False,
              "cam_scale": "relative"},
    "c.png": {"probability": 0.3, "prediction": 0, "label": "NORMAL"},
    "d.png": {"probability": 0.5, "prediction": 1, "label": "NOT_ASSESSED", "flags": ["not_chest_xray"],
              "flag_details": ["This looks like a hand radiograph, not a chest X-ray."]},
    "e.png": {"probability": 0.0001, "prediction": 0, "label": "NORMAL", "cam_flat": True, "cam_scale": "absolute"},
    "f.png": {"probability": 0.9999999, "logit": 17.0, "prediction": 1, "label": "PNEUMONIA"},  # a tie, above b by logit
}


def test_batch_rows_hold_still_and_rank_1_opens_at_the_end(open_server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    rng = np.random.default_rng(5)
    files = []
    for name in sorted(PATCHES):
        Image.fromarray(synthetic_xray(rng, 0, 64)).save(tmp_path / name)
        files.append(tmp_path / name)

    browser.get(open_server + "/")
    find = browser.find_element
    wait_for(lambda: "threshold" in find(By.ID, "model-info").text, what="the model card")
    assert not find(By.ID, "key-button").is_displayed()  # no key on this server: no key button
    assert "single centre" in find(By.ID, "limits").text
    find(By.CSS_SELECTOR, "#api-help summary").click()
    example = find(By.ID, "api-example").text
    assert "-F files=@a.png -F files=@b.dcm" in example and f"{open_server}/v1/predict/batch" in example
    assert "-F file=@xray.png" in example and "X-API-Key" not in example
    browser.execute_script(GATE, PATCHES)

    def release(name):
        browser.execute_script("window.__release(arguments[0])", name)

    def progress(text):
        wait_for(lambda: text in find(By.ID, "progress-text").text, timeout=20, what=f"progress {text!r}")

    def shown():  # the rows top to bottom: file names, and "[group]" for the headings
        return browser.execute_script("""return [...document.querySelectorAll('#worklist-body tr')].map(
            (tr) => tr.dataset.group ? `[${tr.dataset.group}]` : tr.querySelector('.filename').textContent)""")

    def row(name):
        return find(By.XPATH, f"//tbody[@id='worklist-body']/tr[.//div[@class='filename' and text()='{name}']]")

    export = find(By.ID, "export-button")
    ActionChains(browser).move_to_element(find(By.CLASS_NAME, "brand")).perform()  # the pointer off the list
    find(By.ID, "file-input").send_keys("\n".join(str(f) for f in files))
    progress("0 / 6")
    assert shown() == ["[pending]", "a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]
    assert not export.is_enabled() and "every image is analysed" in export.get_attribute("title")

    release("a.png")
    release("b.png")
    progress("2 / 6")
    # results sorted into their groups; the pending rows stay at the bottom, in upload order
    assert shown() == ["[pneumonia]", "b.png", "[normal]", "a.png", "[pending]", "c.png", "d.png", "e.png", "f.png"]
    assert not export.is_enabled()
    assert find(By.ID, "viewer-title").text == "No image selected"  # nothing opened behind the user's back

    # the pointer rests on a.png: c.png's result (it sorts above a.png) moves nothing under it
    ActionChains(browser).move_to_element(row("a.png")).perform()
    before, y = shown(), row("a.png").location["y"]
    release("c.png")
    progress("3 / 6")
    assert shown() == before and row("a.png").location["y"] == y
    assert row("c.png").get_attribute("data-rank") == "2"  # its rank is shown where it stands
    ActionChains(browser).move_to_element(find(By.ID, "viewer-title")).perform()  # the pointer leaves: sorted
    wait_for(lambda: shown()[:5] == ["[pneumonia]", "b.png", "[normal]", "c.png", "a.png"], timeout=5,
             what="the sort after the pointer left")

    for name in ("d.png", "e.png", "f.png"):
        release(name)
    progress("Finished: 6 / 6")
    assert shown() == ["[pneumonia]", "f.png", "b.png", "[normal]", "c.png", "a.png", "e.png", "[human]", "d.png"]
    assert [row(n).get_attribute("data-rank") for n in ("f.png", "b.png", "c.png", "a.png", "e.png", "d.png")] \
        == ["1", "2", "3", "4", "5", "6"]
    assert row("f.png").find_element(By.CLASS_NAME, "prob-value").text == "> 99.9 %"
    assert row("e.png").find_element(By.CLASS_NAME, "prob-value").text == "< 0.1 %"
    assert export.is_enabled()
    wait_for(lambda: find(By.ID, "viewer-title").text == "f.png", timeout=5, what="rank 1 in the viewer")
    assert find(By.ID, "fact-rank").text == "1 of 6"

    # the keyboard walks the list as shown
    row("f.png").send_keys(Keys.ARROW_DOWN)
    wait_for(lambda: find(By.ID, "viewer-title").text == "b.png", timeout=5, what="Down to rank 2")
    browser.switch_to.active_element.send_keys("j")
    wait_for(lambda: find(By.ID, "viewer-title").text == "c.png", timeout=5, what="j to rank 3")
    browser.switch_to.active_element.send_keys(Keys.ARROW_UP)
    wait_for(lambda: find(By.ID, "viewer-title").text == "b.png", timeout=5, what="Up to rank 2")
    assert browser.switch_to.active_element.get_attribute("data-id") == row("b.png").get_attribute("data-id")
    assert find(By.ID, "cam-flat").is_displayed() is False and find(By.ID, "viewer-overlay").is_displayed()
    assert "relative: scaled to this image's maximum" in find(By.ID, "cam-scale").text

    # a flat map says so instead of showing a blue wash
    row("e.png").click()
    wait_for(lambda: find(By.ID, "viewer-title").text == "e.png", timeout=5, what="e.png in the viewer")
    flat = find(By.ID, "cam-flat")
    assert flat.is_displayed() and flat.text == "The map is flat: no region raised the PNEUMONIA score"
    assert not find(By.ID, "viewer-overlay").is_displayed()

    # a flagged, not assessed image: the flag and its sentence in the row and the viewer, the score greyed
    assert "Not a chest X-ray" in row("d.png").find_element(By.CLASS_NAME, "flag").text
    assert "not meaningful" in row("d.png").text
    row("d.png").click()
    wait_for(lambda: find(By.ID, "viewer-flags").is_displayed(), timeout=5, what="the flag in the viewer")
    assert "This looks like a hand radiograph, not a chest X-ray." in find(By.ID, "viewer-flags").text
    assert "not meaningful" in find(By.ID, "fact-probability").text

    export.click()

    def downloaded():
        found = sorted((tmp_path / "downloads").glob("*.csv")) if (tmp_path / "downloads").is_dir() else []
        if not found:
            return None
        with open(found[0], newline="") as f:
            rows = list(csv.DictReader(f))
        return rows if len(rows) == 6 else None

    table = wait_for(downloaded, timeout=20, what="the CSV download")
    assert list(table[0]) == CSV_COLUMNS
    assert [(r["rank"], r["filename"], r["label"]) for r in table] == [
        ("1", "f.png", "PNEUMONIA"), ("2", "b.png", "PNEUMONIA"), ("3", "c.png", "NORMAL"),
        ("4", "a.png", "NORMAL"), ("5", "e.png", "NORMAL"), ("6", "d.png", "NOT_ASSESSED")]
    assert table[-1]["flags"] == "not_chest_xray" and table[-1]["probability"] == ""
    assert float(table[0]["probability"]) == pytest.approx(0.9999999)

    browser.save_screenshot(str(tmp_path / "batch.png"))
    problems = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and e["source"] != "network"]
    assert not problems, problems


def test_a_selected_row_stays_put_and_keeps_the_viewer(open_server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    patches = {"x1.png": {"probability": 0.2, "prediction": 0, "label": "NORMAL"},
               "x2.png": {"probability": 0.6, "prediction": 1, "label": "UNSURE"},
               "x3.png": {"probability": 0.9, "prediction": 1, "label": "PNEUMONIA"}}
    rng = np.random.default_rng(6)
    for name in patches:
        Image.fromarray(synthetic_xray(rng, 0, 64)).save(tmp_path / name)

    browser.get(open_server + "/")
    find = browser.find_element
    wait_for(lambda: "threshold" in find(By.ID, "model-info").text, what="the model card")
    browser.execute_script(GATE, patches)
    ActionChains(browser).move_to_element(find(By.CLASS_NAME, "brand")).perform()
    find(By.ID, "file-input").send_keys("\n".join(str(tmp_path / n) for n in patches))

    def shown():
        return browser.execute_script("""return [...document.querySelectorAll('#worklist-body tr')].map(
            (tr) => tr.dataset.group ? `[${tr.dataset.group}]` : tr.querySelector('.filename').textContent)""")

    def row(name):
        return find(By.XPATH, f"//tbody[@id='worklist-body']/tr[.//div[@class='filename' and text()='{name}']]")

    browser.execute_script("window.__release('x1.png')")
    wait_for(lambda: "1 / 3" in find(By.ID, "progress-text").text, timeout=20, what="1 / 3")
    assert shown() == ["[normal]", "x1.png", "[pending]", "x2.png", "x3.png"]
    row("x1.png").click()  # the radiologist starts reading x1 mid-batch
    ActionChains(browser).move_to_element(find(By.CLASS_NAME, "brand")).perform()
    browser.execute_script("document.activeElement.blur()")  # held because it is selected, not only focused
    browser.execute_script("window.__release('x3.png')")
    wait_for(lambda: "2 / 3" in find(By.ID, "progress-text").text, timeout=20, what="2 / 3")
    order = shown()
    assert order.index("x1.png") == 1 and order.index("x3.png") < order.index("x2.png")  # x1 held, x3 sorted
    assert "held" in row("x1.png").get_attribute("class")
    browser.execute_script("window.__release('x2.png')")
    wait_for(lambda: "Finished: 3 / 3" in find(By.ID, "progress-text").text, timeout=20, what="the end")
    assert shown() == ["[pneumonia]", "x3.png", "[unsure]", "x2.png", "[normal]", "x1.png"]  # all sorted now
    assert "held" not in row("x1.png").get_attribute("class")
    assert find(By.ID, "viewer-title").text == "x1.png"  # the user's pick is kept, rank 1 not forced on them
    assert row("x2.png").find_element(By.CLASS_NAME, "badge").text == "UNSURE"


@pytest.mark.parametrize("page, rendered", [("/docs", ".swagger-ui .opblock"), ("/redoc", "[data-section-id]")])
def test_api_docs_render_under_their_csp(open_server, browser, page, rendered):
    """The docs' CSP hashes their inline script: the viewers must still render, with no CSP violation."""
    from selenium.webdriver.common.by import By

    browser.get(open_server + page)
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, rendered), what=f"{page} to render")
    # blocked: only what must be (ReDoc's logo from its CDN: the page stays offline), never a script or style
    violations = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]
                  and ("script-src" in e["message"] or "style-src" in e["message"])]
    assert not violations, violations
