"""`trustser demo` in a real browser: the CLI serves the Gradio app on 127.0.0.1, Debian's headless
Chromium (driven by Selenium through Debian's chromedriver, every host but loopback unresolvable)
uploads a clip, presses Explain, and the page shows the caption, the emotion probabilities, the
descriptors with their confidence and the trust score the pipeline gives for that clip."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from explain_fixtures import write_corpus

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(explain_clips, tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "synth", explain_clips)


@pytest.fixture(scope="module")
def server(explain_model_dir, corpus, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    env = {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "GRADIO_TEMP_DIR": str(log.parent / "gradio-tmp"),
    }
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trustser.cli",
                "demo",
                str(explain_model_dir),
                "--port",
                str(port),
                "--examples",
                str(corpus),
                "--device",
                "cpu",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"trustser demo did not come up on {url}:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1400,1400",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_upload_and_explain_in_the_browser(server, browser, explain_model_dir, explain_clips, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from trustser import explain_files

    clip = explain_clips[2]
    want = explain_files(str(explain_model_dir), [clip], progress=False, device="cpu")[0]
    assert want["error"] is None and want["caption"]

    browser.get(server)
    wait = WebDriverWait(browser, 120)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#clip input[type=file]")))
    assert "Examples (synthetic corpus)" in browser.find_element(By.TAG_NAME, "body").text
    browser.find_element(By.CSS_SELECTOR, "#clip input[type=file]").send_keys(clip)
    # the upload has reached the server when the player shows up
    wait.until(
        EC.presence_of_element_located(
            (By.CSS_SELECTOR, "#clip audio, #clip .waveform-container, #clip [data-testid='waveform-Clip']")
        )
    )
    browser.find_element(By.CSS_SELECTOR, "#explain").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#caption textarea").get_attribute("value"))

    assert browser.find_element(By.CSS_SELECTOR, "#caption textarea").get_attribute("value") == want["caption"]
    assert (
        browser.find_element(By.CSS_SELECTOR, "#trust textarea, #trust input").get_attribute("value")
        == f"{want['trust']:.2f}"
    )
    probs = browser.find_element(By.CSS_SELECTOR, "#probabilities").text
    top = max(want["probabilities"], key=want["probabilities"].get)
    assert top in probs and f"{round(100 * want['probabilities'][top])}%" in probs, probs
    assert all(label in probs for label in want["probabilities"])  # one bar per emotion
    table = browser.find_element(By.CSS_SELECTOR, "#descriptors").text
    for field, value in want["descriptors"].items():
        assert field in table and value in table and f"{want['confidence'][field]:.2f}" in table, table
    shot = tmp_path / "demo.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:4] == b"\x89PNG"
    if os.environ.get("TRUSTSER_DEMO_SCREENSHOT"):  # docs/figures/demo.png is made this way
        shutil.copy2(shot, os.environ["TRUSTSER_DEMO_SCREENSHOT"])
