"""`edgekit demo` as a new user runs it: compile → hub → agent → rollout → results, then the dashboard, driven
in headless Debian chromium, shows the device. Screenshot: tests/artifacts/demo-fleet.png."""

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgekit.hub.broker import free_port

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
RESULTS_FLOWING_WITHIN_S = 300  # the budget, package downloads excluded


class Output:
    """The demo's stderr, collected by a thread so the test can wait for lines with a timeout."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stderr:
            self.lines.append(line.rstrip())

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if match := re.search(pattern, line):
                    return match
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r} within {timeout:g} s; output:\n" + "\n".join(self.lines))


def test_demo_reaches_results_flowing_and_the_dashboard_shows_the_device(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)")
    port = free_port()
    command = [sys.executable, "-m", "edgekit", "demo", "--out", str(tmp_path / "demo"), "--http-port", str(port),
               "--duration", "600"]  # fmt: skip
    started = time.monotonic()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    output = Output(process)
    try:
        login = output.wait_for(r"dashboard: (\S+)/\s+\(log in with token (\S+)\)", RESULTS_FLOWING_WITHIN_S)
        flowing = output.wait_for(r"results flowing: ([\d.]+)/s.*bundle digits@1\.0\.0", RESULTS_FLOWING_WITHIN_S)
        elapsed = time.monotonic() - started
        assert elapsed < RESULTS_FLOWING_WITHIN_S and float(flowing.group(1)) > 0
        print(f"results flowing after {elapsed:.0f} s")
        url, token = login.group(1), login.group(2)
        with sync_api.sync_playwright() as playwright:
            args = ["--no-sandbox"] if os.geteuid() == 0 else []
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
            page = browser.new_page(viewport={"width": 1400, "height": 700})
            assert page.goto(url + "/").status == 401
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.wait_for_selector('tr[data-id="demo-cam-1"]', timeout=30_000)
            row = page.text_content('tr[data-id="demo-cam-1"]')
            assert "online" in row and "digits@1.0.0" in row, row
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "demo-fleet.png"), full_page=True)
            browser.close()
    finally:
        process.terminate()  # SIGTERM: the demo's Ctrl-C path
        assert process.wait(timeout=60) == 0, "\n".join(output.lines)
    assert any("demo stopped" in line for line in output.lines)
