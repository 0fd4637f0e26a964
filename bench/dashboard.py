"""Dashboard speed on the embedded default; writes bench/results/dashboard.json.

    python bench/dashboard.py

Measures (wall clock, this machine): seconds from launching `streamlit run` to a healthy
`/_stcore/health`; seconds from clicking "Run ensemble learning" in headless Chromium (default
settings) to the final weight chart on the page; and a 2-D map drawn cold and again from the cache.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser_run(url: str, tmp: str) -> float:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp}/profile", "--window-size=1600,1400"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(url)
        button = WebDriverWait(driver, 90).until(
            EC.element_to_be_clickable((By.XPATH, "//button[contains(., 'Run ensemble learning')]")))
        t0 = time.perf_counter()
        button.click()
        WebDriverWait(driver, 300).until(EC.presence_of_element_located((By.XPATH, "//button[@role='tab' and contains(., 'Weights')]")))
        return time.perf_counter() - t0
    finally:
        driver.quit()


def map_cache() -> dict:
    """A PCA map of the default run's features, cold and from Streamlit's cache (AppTest, no browser)."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(os.path.join(ROOT, "dashboard", "app.py"), default_timeout=300).run()
    at.button(key="run_button").click().run()
    while "ensemble_job" in at.session_state and not at.session_state["ensemble_job"].finished:
        time.sleep(0.5)
    t0 = time.perf_counter()
    at.run()
    at.run()
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    at.run()  # a rerun redraws every view, the map from the cache
    warm = time.perf_counter() - t0
    return {"results_page_with_map_cold_seconds": cold, "results_page_with_map_cached_seconds": warm}


def main() -> int:
    from core import assets
    from core.runs import environment

    assets.require()
    tmp = tempfile.mkdtemp()
    os.environ["HGPROMPT_RUNS"] = os.path.join(tmp, "runs")
    port = _port()
    t0 = time.perf_counter()
    log = open(os.path.join(tmp, "server.log"), "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    health = None
    while time.perf_counter() - t0 < 120:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                health = time.perf_counter() - t0
                break
        except OSError:
            time.sleep(0.1)
    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "environment": environment(),
              "health_seconds_after_launch": health}
    try:
        result["click_to_final_weights_seconds"] = browser_run(url, tmp)
    except Exception as exc:  # noqa: BLE001 - recorded, not hidden: see the known bug in tests/test_browser.py
        result["click_to_final_weights_seconds"] = None
        result["browser_error"] = f"{exc.__class__.__name__}: no final weights within 300 s"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result.update(map_cache())
    out = os.path.join(ROOT, "bench", "results", "dashboard.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
