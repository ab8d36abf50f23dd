"""End to end in a real browser: headless Chromium drives the page against a running server.

Needs Debian's ``chromium`` and ``chromium-driver`` (CI installs them); skipped with the reason
when they are missing.
"""

from __future__ import annotations

import csv
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import synthetic_xray
from pneumoscan.serve.app import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
KEY = "ward-7-key"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def server(trained_model):
    """The real app under uvicorn on a free 127.0.0.1 port, in a thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port meanwhile
    port = sock.getsockname()[1]
    app = create_app(trained_model, api_key=KEY)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


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

    find(By.ID, "file-input").send_keys("\n".join(str(f) for f in files))
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "tr.row-done")) == 2
             and len(browser.find_elements(By.CSS_SELECTOR, "tr.row-error")) == 1, what="three results")

    rows = browser.find_elements(By.CSS_SELECTOR, "#worklist-body tr")
    done = [r for r in rows if "row-done" in r.get_attribute("class")]
    probs = [float(r.find_element(By.CLASS_NAME, "prob-value").text.rstrip(" %")) for r in done]
    assert probs == sorted(probs, reverse=True)  # most suspicious first
    for r in done:
        assert r.find_element(By.CLASS_NAME, "badge").text in ("NORMAL", "PNEUMONIA")
    error_row = browser.find_element(By.CSS_SELECTOR, "tr.row-error")
    assert "notes.png" in error_row.text and "not an image" in error_row.text

    done[0].click()
    wait_for(lambda: browser.execute_script(
        "const i = document.getElementById('viewer-overlay'); return i.complete && i.naturalWidth > 0"),
        what="the Grad-CAM overlay")
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
