"""The MLflow UI in a real browser: the tiny run's page (its name, id, experiment and
metrics, no error shown), its heatmap, and its HTML report rendered in the artefact view.

Starts ``mlflow server`` on a loopback port over a copy of the tiny run's SQLite database,
opens the run in headless Chromium (the system ``chromium`` and ``chromedriver``, driven by
Selenium; no browser download) and saves screenshots under ``$SAEUNIV_TEST_ARTIFACTS`` (CI
keeps them) or the test's temporary folder. Skipped when Chromium is absent, except under
``SAEUNIV_REQUIRE_BROWSER=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.artifacts import load_text

from saeuniv.stages.convergence import HEADLINE

from helpers import finished, runs

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
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for errors
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture()
def server(tiny_run, tmp_path):
    """``mlflow server`` over a copy of the tiny run's SQLite database (the runs' artefacts
    are read where the run left them); stopped by its PID."""
    db = shutil.copy(tiny_run["root"] / "mlflow.db", tmp_path / "mlflow.db")
    port = _free_port()
    with open(tmp_path / "mlflow-server.log", "w") as log:  # the server keeps its own copy
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
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


# What the MLflow UI shows when something fails: alert and notification elements, the
# artefact viewers' error boxes, and the texts of its error pages and messages.
ERROR_SELECTOR = ('[role="alert"], [class*="notification-notice"], [class*="alert-error"], '
                  '[class*="view-error"], .mlflow-error-image')
ERROR_TEXTS = ("Something went wrong", "Oops", "The request failed", "Request failed",
               "Network request failed", "Failed to load", "not found", "does not exist",
               "Page not found", "RESOURCE_DOES_NOT_EXIST", "INTERNAL_ERROR")


def _wait_for(driver, texts: list[str], timeout: float = 90) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.5).until(
        lambda d: all(t in d.page_source for t in texts))


def _visible_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def _errors_shown(driver) -> list[str]:
    """Error elements on the page (with their text) and error texts the page shows."""
    from selenium.webdriver.common.by import By

    found = [f"<{e.tag_name} class={e.get_attribute('class')!r}>: {e.text!r}"
             for e in driver.find_elements(By.CSS_SELECTOR, ERROR_SELECTOR) if e.is_displayed()]
    text = _visible_text(driver)
    return found + [t for t in ERROR_TEXTS if t.lower() in text.lower()]


# Console messages that are not errors of the page: the UI asks for the signed-in user (a
# server without authentication answers 404), and the runs table's resize observer reports
# a layout pass it deferred (the browser's notice, logged at error level).
NOT_ERRORS = ("/ajax-api/2.0/mlflow/users/current - Failed to load resource",
              "ResizeObserver loop completed with undelivered notifications")


def _console_errors(driver) -> list[str]:
    """Console errors (level SEVERE) since the last call (the log is drained)."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not any(t in e["message"] for t in NOT_ERRORS)]


def _report_in_frame(browser, n_images: int) -> dict:
    """In the artefact view's iframe of report.html: its headings, and each image's
    decoded size; back to the page after."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    frame = WebDriverWait(browser, 60, poll_frequency=0.5).until(
        lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, "iframe.mlflow-html-iframe")),
                       False))
    browser.switch_to.frame(frame)
    try:
        WebDriverWait(browser, 60, poll_frequency=0.5).until(lambda d: len([
            i for i in d.find_elements(By.TAG_NAME, "img")
            if d.execute_script("return arguments[0].complete", i)]) >= n_images)
        out = {
            "h1": [h.text for h in browser.find_elements(By.TAG_NAME, "h1")],
            "h2": [h.text for h in browser.find_elements(By.TAG_NAME, "h2")],
            "images": [(i.get_attribute("alt"), *browser.execute_script(
                "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", i))
                for i in browser.find_elements(By.TAG_NAME, "img")],
            "summary_tables": browser.execute_script(
                "var h = document.getElementById('summary'), n = 0;"
                "for (var e = h.nextElementSibling; e && e.tagName !== 'H2';"
                " e = e.nextElementSibling) { if (e.tagName === 'TABLE') n++; } return n;"),
        }
        return {**out, **_use_pair_browser(browser)}
    finally:
        browser.switch_to.default_content()


def _use_pair_browser(browser) -> dict:
    """Sort the pair browser by correlation (one click: descending) and filter it to its
    last layer pair; what each showed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    table = browser.find_element(By.ID, "pair-browser")
    rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    headers = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    column = headers.index("corr")
    table.find_elements(By.CSS_SELECTOR, "thead th")[column].click()
    corr = [float(r.find_elements(By.TAG_NAME, "td")[column].text)
            for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
    menu = Select(browser.find_element(By.ID, "pair-cell"))
    picked = menu.options[-1].get_attribute("value")
    menu.select_by_value(picked)
    shown = [r for r in table.find_elements(By.CSS_SELECTOR, "tbody tr") if r.is_displayed()]
    return {"browser_rows": len(rows), "sorted_corr": corr, "picked": picked,
            "filtered_rows": len(shown),
            "filtered_cells": {r.get_attribute("data-cell") for r in shown}}



def test_run_page_shows_the_run_its_heatmap_and_report_in_chromium(tiny_run, tmp_path,
                                                                   browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    mains = finished(runs(tiny_run["uri"]), "main").sort_values("start_time")
    run, other = mains.iloc[0], mains.iloc[1]  # the cold run; the warm one must not show
    experiment = MlflowClient(tiny_run["uri"]).get_experiment(run.experiment_id).name
    shots = Path(os.environ.get("SAEUNIV_TEST_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page = f"{server}/#/experiments/{run.experiment_id}/runs/{run.run_id}"
    browser.get(page)
    try:  # metric names that only the run's metrics table shows (not the description)
        _wait_for(browser, [run.run_id, "rsa_z", "rsa_null_mean", "sae_fvu_a"])
        # this run, in its experiment: the header, the breadcrumb, the id in the overview
        header = browser.find_element(By.CSS_SELECTOR, '[data-testid="runs-header"]')
        assert header.text == run["tags.mlflow.runName"] == "xs vs s · one_to_one @ 0.05"
        crumb = browser.find_element(By.CSS_SELECTOR, 'a[data-testid="experiment-runs-link"]')
        assert crumb.text == experiment
        assert f"#/experiments/{run.experiment_id}/" in crumb.get_attribute("href")
        text = _visible_text(browser)
        assert run.run_id in text and other.run_id not in text
        assert _errors_shown(browser) == [] and _console_errors(browser) == []
    finally:
        browser.save_screenshot(str(shots / "mlflow-run-page.png"))
        (shots / "mlflow-run-page.html").write_text(browser.page_source)
    browser.get(f"{page}/artifacts")
    try:
        _wait_for(browser, ["heatmap_svcca.png", "report.html", "artifacts.sha256.json"])
        browser.find_element(By.XPATH, "//*[text()='heatmap_svcca.png']").click()
        img = WebDriverWait(browser, 60, poll_frequency=0.5).until(lambda d: next(
            (i for i in d.find_elements(By.TAG_NAME, "img")
             if ("heatmap_svcca.png" in (i.get_attribute("src") or "")
                 or (i.get_attribute("src") or "").startswith("blob:"))
             and d.execute_script("return arguments[0].naturalWidth", i) > 0), False))
        assert img.is_displayed()  # the heatmap itself, loaded from the server
        assert _errors_shown(browser) == [] and _console_errors(browser) == []
    finally:
        browser.save_screenshot(str(shots / "mlflow-run-artifacts.png"))
    # the report, rendered by the artefact view: the file's title, every section, every
    # image decoded (a broken data: URI decodes to 0 x 0), and nothing logged as an error
    metrics = tiny_run["cfg"].similarity.metrics
    html = load_text(f"runs:/{run.run_id}/report.html")
    try:
        browser.find_element(By.XPATH, "//*[text()='report.html']").click()
        report = _report_in_frame(browser, 3 * len(metrics) + 1)
        assert _errors_shown(browser) == [] and _console_errors(browser) == []
    finally:
        browser.save_screenshot(str(shots / "mlflow-run-report.png"))
    assert report["h1"] == [html.split("<h1>")[1].split("</h1>")[0]]
    assert report["h2"] == ["Summary", "Heatmaps", "Per-layer curves", "SAE quality per layer",
                            "Matched feature pairs"]
    panels = [f"heatmap_{m}{kind}.png" for m in metrics for kind in ("", "_cal", "_index")]
    assert [alt for alt, *_ in report["images"]] == [*panels, "depth_curves.png"]
    assert all(w > 0 and h > 0 for _, w, h in report["images"]), report["images"]
    assert report["summary_tables"] >= 1  # summary.md's Markdown tables, rendered
    # the pair browser, in the artefact view: sorted by a click, filtered by layer pair
    assert report["browser_rows"] > 0
    assert report["sorted_corr"] == sorted(report["sorted_corr"], reverse=True)
    assert report["sorted_corr"] and report["filtered_cells"] == {report["picked"]}
    assert 0 < report["filtered_rows"] < report["browser_rows"]
    # the error checks bite: a run that does not exist shows an error
    browser.get(f"{server}/#/experiments/{run.experiment_id}/runs/{'0' * 32}")
    WebDriverWait(browser, 60, poll_frequency=0.5).until(_errors_shown)


def test_the_experiment_opens_on_its_runs_with_names_and_datasets(tiny_run, tmp_path, browser,
                                                                 server):
    from selenium.webdriver.common.by import By

    mains = finished(runs(tiny_run["uri"]), "main")
    exp_id = mains.experiment_id.iloc[0]
    dataset = MlflowClient(tiny_run["uri"]).get_run(mains.run_id.iloc[0]).inputs
    name = dataset.dataset_inputs[0].dataset.name
    shots = Path(os.environ.get("SAEUNIV_TEST_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    # the link `saeuniv run` prints: the model-training view of the experiment
    browser.get(f"{server}/#/experiments/{exp_id}?workflowType=machine_learning")
    try:
        _wait_for(browser, ["xs vs s · one_to_one @ 0.05", name])
        header = browser.find_element(By.CSS_SELECTOR, "h2, [data-testid='runs-header']")
        text = _visible_text(browser)
        # the runs table (run names, their dataset), not the GenAI overview of traces
        assert "Run Name" in text and "Dataset" in text and "Token Usage" not in text, header
        assert text.count(name) >= 2  # the dataset of both main runs
        assert _errors_shown(browser) == [] and _console_errors(browser) == []
    finally:
        browser.save_screenshot(str(shots / "mlflow-runs-table.png"))


def test_the_main_runs_metrics_and_the_compare_view_show_the_headline(tiny_run, tmp_path,
                                                                     browser, server):
    """The headline numbers, not a wall of per-layer-pair keys: on a main run's Model
    metrics page and in the compare view of two main runs."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    mains = finished(runs(tiny_run["uri"]), "main").sort_values("start_time")
    exp_id, ids = mains.experiment_id.iloc[0], list(mains.run_id.iloc[:2])
    keys = MlflowClient(tiny_run["uri"]).get_run(ids[0]).data.metrics
    headline = [f"{m}_cal_middle" for m in tiny_run["cfg"].similarity.metrics]
    shots = Path(os.environ.get("SAEUNIV_TEST_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    view = "workflowType=machine_learning"
    # the run's charts: one per key (a few per metric), found by the chart search
    browser.get(f"{server}/#/experiments/{exp_id}/runs/{ids[0]}/model-metrics?{view}")
    try:
        WebDriverWait(browser, 90, poll_frequency=0.5).until(
            lambda d: f"Model metrics ({len(keys)})" in " ".join(_visible_text(d).split()))
        assert len(keys) < 120 and not [k for k in keys if re.search(r"/a\d+-b\d+$", k)]
        search = browser.find_element(By.CSS_SELECTOR, 'input[placeholder*="Search metric"]')
        search.send_keys("cal_middle")
        _wait_for(browser, headline)
        WebDriverWait(browser, 60, poll_frequency=0.5).until(  # each chart drawn
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) == len(headline))
        assert _errors_shown(browser) == [] and _console_errors(browser) == []
    finally:
        browser.save_screenshot(str(shots / "mlflow-run-metrics.png"))
    # the compare view of the two main runs: its plots open on a headline number, and its
    # metrics table (virtualised: only the rows in view are in the page) holds no cell keys
    names = [f"{m}_{k}" for m in tiny_run["cfg"].similarity.metrics for k in HEADLINE]
    page = (f"#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([exp_id])}"
            f"&{view}")
    browser.get(f"{server}/{page}")
    try:
        WebDriverWait(browser, 90, poll_frequency=0.5).until(
            lambda d: all(t in _visible_text(d) for t in ("Comparing 2 Runs", *ids, "Tags")))
        text = _visible_text(browser)
        plotted = text.split("Metrics:")[1].split()[0]
        assert plotted in names, plotted
        assert not re.search(r"/a\d+-b\d+", browser.page_source)
        assert _errors_shown(browser) == [] and _console_errors(browser) == []
    finally:
        browser.save_screenshot(str(shots / "mlflow-compare-runs.png"))
