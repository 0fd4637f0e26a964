"""A real browser: the app served on localhost, headless Chromium clicks Run and finds the weight chart."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from core import assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not assets.available(), reason="the embedded default is not built"),
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Debian's chromium and chromium-driver are not installed"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    env = {**os.environ, "HGPROMPT_RUNS": str(tmp_path / "runs")}
    log = open(tmp_path / "server.log", "wb")  # a file, not a pipe: an unread pipe fills up and blocks the server
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 60:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("the app did not answer its health check within 60 s")
    yield url
    proc.terminate()
    proc.wait(timeout=20)
    log.close()
    print((tmp_path / "server.log").read_text(errors="replace")[-3000:])


@pytest.mark.xfail(strict=False, reason="known bug (issue 4): served by `streamlit run`, the default run on the embedded "
                   "default stays in its first stage for minutes while the same job finishes in ~20 s in a plain thread "
                   "and in AppTest; root cause not found yet (postScriptGC=false did not cure it)")
def test_click_run_and_find_weights(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,1400"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    shot = os.path.join(os.environ.get("HGPROMPT_SCREENSHOTS", str(tmp_path)), "dashboard-run.png")
    try:
        driver.get(server)
        wait = WebDriverWait(driver, 90)
        button = wait.until(EC.element_to_be_clickable((By.XPATH, "//button[contains(., 'Run ensemble learning')]")))
        button.click()
        # The live view shows the weights while it runs; the result view adds its tabs when the run is done.
        WebDriverWait(driver, 240).until(
            EC.presence_of_element_located((By.XPATH, "//button[@role='tab' and contains(., 'Conflicts')]")))
        time.sleep(1.0)
        charts = driver.find_elements(By.XPATH, "//*[local-name()='text' and contains(., 'Ensemble weights')]")
        assert charts, "the weight chart is not on the page"
        assert "Run `" in driver.page_source or "Run <code>" in driver.page_source
    finally:
        os.makedirs(os.path.dirname(shot), exist_ok=True)
        driver.save_screenshot(shot)
        print(f"screenshot: {shot}")
        driver.quit()
