"""A real Chromium for the dashboard and web-attack tests (Debian's chromium, driven by Playwright)."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 15_000


def until(page: Any, condition: str) -> None:
    """Wait for a JS condition, passed as a function: a bare expression would be eval'd, which the hub's CSP refuses."""
    page.wait_for_function(f"() => {condition}", timeout=WAIT_MS)


def open_logged_in(page: Any, url: str, token: str, ready: str) -> None:
    """Open a dashboard `url` as a person would: its 401 page is the login form; after logging in with `token` the
    same URL shows the page, which marks itself ready (`document.body.dataset.ready`, e.g. 'bundles')."""
    page.goto(url)
    page.fill("#token", token)
    page.click("button[type=submit]")
    until(page, f"document.body?.dataset.ready === '{ready}'")


def open_bundle_report(page: Any, bundle_id: str) -> None:
    """On the Bundles page: open a bundle's compile report and wait until it is shown."""
    page.click(f'button[data-report="{bundle_id}"]')
    until(page, f"document.querySelector('#bundle-report')?.dataset.ready === '{bundle_id}'")


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium, closed on exit; the test is skipped without Playwright, fails without the browser."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # root cannot use chromium's user-namespace sandbox
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield browser
        finally:
            browser.close()
