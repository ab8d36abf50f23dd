"""The page's study worklist opened in a real browser, as the worklist and reads tests need it: a
store filled with ``store_data.fill_worklist``, ``serve --db`` with an API key, and headless
Chromium on the page with that key in its session. One place, so the two tests set up alike.
Tests using it carry ``NEEDS_CHROMIUM`` (slow; skipped with the apt line without chromium)."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest
from store_data import fill_worklist
from test_browser import CHROMEDRIVER, CHROMIUM, KEY, browser, serving  # noqa: F401 (browser: a fixture)

from pneumoscan.serve.app import create_app
from pneumoscan.store import Store

NEEDS_CHROMIUM = [pytest.mark.slow, pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")]


@dataclass(frozen=True)
class WorklistPage:
    base: str  # the server's base URL
    url: str  # the store's URL (still there after the server stops)
    ids: dict  # fill_worklist's study ids


@contextlib.contextmanager
def open_worklist(model: Path, browser, folder: Path, *, shadow: bool = False):  # noqa: F811
    """Fill the store (``shadow``: with shadow mode on), serve it, open the page with the key."""
    url = f"sqlite:///{folder / 'pneumoscan.db'}"
    with Store.open(url) as store:
        ids = fill_worklist(store)
        if shadow:
            store.set_setting("shadow_mode", "on", changed_by="pilot lead")
    with serving(create_app(model, api_key=KEY, db=url)) as base:
        browser.get(base + "/?refresh=1")
        browser.execute_script("sessionStorage.setItem('pneumoscan.apiKey', arguments[0])", KEY)
        browser.get(base + "/?refresh=1")
        yield WorklistPage(base, url, ids)


@pytest.fixture
def worklist_page(trained_model, browser, tmp_path):  # noqa: F811
    """``with worklist_page(shadow=...) as page:`` (a ``WorklistPage``) in the test's own folder."""
    return functools.partial(open_worklist, trained_model, browser, tmp_path)
