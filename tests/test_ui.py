"""The MLflow UI in a real browser: a tiny run's metrics and heatmap on its run page.

Starts ``mlflow server`` on a loopback port over the run's SQLite store, opens the run in
headless Chromium (the system ``chromium`` and ``chromedriver``, driven by Selenium; no
browser download) and saves screenshots under ``$SAEUNIV_TEST_ARTIFACTS`` (CI keeps them)
or the test's temporary folder. Skipped when Chromium is absent, except under
``SAEUNIV_REQUIRE_BROWSER=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from saeuniv import cli

REQUIRED = os.environ.get("SAEUNIV_REQUIRE_BROWSER") == "1"


def _require(ok: bool, why: str) -> None:
    if not ok:
        (pytest.fail if REQUIRED else pytest.skip)(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    _require(chromium is not None and driver_path is not None,
             "headless browser test needs Chromium: apt-get install chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _require(False, "headless browser test needs selenium: pip install -e '.[test]'")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1600,1200", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture()
def server(tracking, tmp_path):
    """``mlflow server`` over the test's SQLite store; stopped by its PID."""
    port = _free_port()
    with open(tmp_path / "mlflow-server.log", "w") as log:  # the server keeps its own copy
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking,
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("mlflow server did not start:\n"
                            + (tmp_path / "mlflow-server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers, by the server's PID
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_for(driver, texts: list[str], timeout: float = 90) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.5).until(
        lambda d: all(t in d.page_source for t in texts))


def test_run_page_shows_metrics_and_heatmap_in_chromium(tracking, corpus_dir, tmp_path,
                                                        browser, server):
    import mlflow

    assert cli.main(["run", "--config", "tiny", "--set", f"corpus.source={corpus_dir}"]) == 0
    runs = mlflow.search_runs(search_all_experiments=True,
                              filter_string="tags.saeuniv.stage = 'main'")
    run_id, exp_id = runs.iloc[0].run_id, runs.iloc[0].experiment_id
    shots = Path(os.environ.get("SAEUNIV_TEST_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page = f"{server}/#/experiments/{exp_id}/runs/{run_id}"
    browser.get(page)
    try:  # metric names that only the run's metrics table shows (not the description)
        _wait_for(browser, ["main:tiny", "rsa_z", "rsa_null_mean", "sae_fvu_a"])
    finally:
        browser.save_screenshot(str(shots / "mlflow-run-page.png"))
        (shots / "mlflow-run-page.html").write_text(browser.page_source)
    browser.get(f"{page}/artifacts")
    try:
        _wait_for(browser, ["heatmap_svcca.png", "report.html", "artifacts.sha256.json"])
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        browser.find_element(By.XPATH, "//*[text()='heatmap_svcca.png']").click()
        img = WebDriverWait(browser, 60, poll_frequency=0.5).until(lambda d: next(
            (i for i in d.find_elements(By.TAG_NAME, "img")
             if ("heatmap_svcca.png" in (i.get_attribute("src") or "")
                 or (i.get_attribute("src") or "").startswith("blob:"))
             and d.execute_script("return arguments[0].naturalWidth", i) > 0), False))
        assert img.is_displayed()  # the heatmap itself, loaded from the server
    finally:
        browser.save_screenshot(str(shots / "mlflow-run-artifacts.png"))
    assert (shots / "mlflow-run-page.png").stat().st_size > 0
