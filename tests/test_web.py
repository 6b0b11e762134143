"""The administrators' web page in headless Chromium (Debian `chromium` + `chromium-driver`, Selenium):
load it, add a rule in the editor, test it, see a job finish and its preview, echo a destination.

Set DICOMNODE_SCREENSHOTS to a folder (e.g. docs/images) to keep the screenshots."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import requests

from tests.node_helpers import NodeProcess, phantom_series
from tests.test_node import storescu

TOKEN = "web-test-token-0123456789"


@pytest.fixture
def browser():
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager reach for the network
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("chromium and chromium-driver are not installed (Debian packages); run scripts/setup.sh")
    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.binary_location = chromium
    b = webdriver.Chrome(service=Service(driver), options=opts)
    yield b
    b.quit()


def test_edit_a_rule_test_it_and_watch_the_job_finish(tmp_path: Path, browser) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    shots = Path(os.environ.get("DICOMNODE_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    node = NodeProcess(tmp_path, {"assembly": {"series_quiet_seconds": 0.5}}, env={"DICOMNODE_API_TOKEN": TOKEN}).start()
    node_dest = {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": node.port}
    requests.put(node.api_url + "/modalities/self", json=node_dest, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    # The studies and jobs tables are redrawn every 2 s: an element found just before may be gone.
    wait = WebDriverWait(browser, 120, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])
    by_id = lambda i: browser.find_element(By.ID, i)  # noqa: E731
    try:
        browser.get(node.api_url + "/")
        wait.until(lambda b: "DICOMNODE on DICOM port" in by_id("system").text)
        by_id("token").send_keys(TOKEN, Keys.TAB)

        # Rules: a new rule through the editor; saving without a valid pipeline shows the reason.
        browser.find_element(By.CSS_SELECTOR, 'nav [data-tab="rules"]').click()
        by_id("rule-new").click()
        editor = by_id("rule-editor")
        rule = {"name": "lumbar", "scope": "series", "match": {"Modality": "MR", "orientation": "sagittal"},
                "pipelines": ["spine-seg", "lordosis"], "send_to": []}
        editor.clear()
        editor.send_keys(json.dumps({**rule, "pipelines": ["no-such"]}))
        by_id("rule-save").click()
        wait.until(lambda b: "no pipeline named 'no-such'" in by_id("message").text)
        editor.clear()
        editor.send_keys(json.dumps(rule))
        by_id("rule-save").click()
        wait.until(lambda b: "rule lumbar saved" in by_id("message").text)
        wait.until(lambda b: any("lumbar" in li.text for li in b.find_elements(By.CSS_SELECTOR, "#rule-list li")))
        assert [r["name"] for r in requests.get(node.api_url + "/rules", timeout=10).json()] == ["lumbar"]
        by_id("dry-run").click()
        wait.until(lambda b: "would run: lumbar" in by_id("dry-output").text)
        browser.save_screenshot(str(shots / "web_rules.png"))

        # A study arrives; the job list shows the jobs finish; the preview is drawn from the SEG and SR.
        assert storescu(node.port, phantom_series(tmp_path, seed=60)).returncode == 0
        browser.find_element(By.CSS_SELECTOR, 'nav [data-tab="jobs"]').click()
        states = "return [...document.querySelectorAll('#job-rows td.state')].map(td => td.textContent)"
        wait.until(lambda b: b.execute_script(states) == ["done", "done"])
        preview = "//tbody[@id='job-rows']/tr[td[text()='lordosis']]//button[text()='preview']"
        wait.until(lambda b: b.find_element(By.XPATH, preview).click() or True)
        img = by_id("preview").find_element(By.TAG_NAME, "img")
        wait.until(lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 100)
        browser.save_screenshot(str(shots / "web_jobs.png"))

        # Studies: the one received, with its series.
        browser.find_element(By.CSS_SELECTOR, 'nav [data-tab="studies"]').click()
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#study-rows tr").click() or True)
        wait.until(lambda b: "MR" in by_id("study-detail").text)
        browser.save_screenshot(str(shots / "web_studies.png"))

        # Destinations: echo the node itself.
        browser.find_element(By.CSS_SELECTOR, 'nav [data-tab="destinations"]').click()
        wait.until(lambda b: b.find_elements(By.XPATH, "//tbody[@id='dest-rows']//button[text()='echo']"))
        browser.find_element(By.XPATH, "//tbody[@id='dest-rows']//button[text()='echo']").click()
        wait.until(lambda b: "C-ECHO self: status 0" in by_id("message").text)
        browser.save_screenshot(str(shots / "web_destinations.png"))
    finally:
        node.stop()
