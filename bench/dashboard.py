"""Dashboard speed on the embedded default; writes bench/results/dashboard.json.

    python bench/dashboard.py

Measures (wall clock, this machine): seconds from launching `streamlit run` to a healthy
`/_stcore/health`; seconds from clicking "Run ensemble learning" in headless Chromium (default
settings) to the live weights and to the final weight chart; the Feature maps tab opened cold and
again from the cache; UMAP cold, then switching between cached maps (browser, including drawing), timed
by WebDriver and again on the page's own clock (click to the new map drawn, without WebDriver's overhead);
the same map redraw without a browser (AppTest); measuring interference, computing the simplex view and
switching back to it from the pair matrices (drawn from the session's result), on both clocks.
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


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Streamlit 1.67 draws tabs as <div data-testid="stTab" role="tab">, older releases as <button role="tab">.
TAB_XPATH = "//*[@data-testid='stTab' or @role='tab'][contains(., '{}')]"
RUN_BUTTON_XPATH = "//button[contains(., 'Run ensemble learning')]"
WEIGHT_CHART_XPATH = "//*[local-name()='text' and contains(., 'Ensemble weights')]"  # the result's plotly chart
LIVE_WEIGHTS_XPATH = "//*[contains(text(), 'Ensemble weights')]"  # the live view's weights, or the final chart


def chrome(profile_dir: str):
    """Headless Chromium from Debian's `chromium` and `chromium-driver` packages (no browser download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile_dir}", "--window-size=1600,1400"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def click_run(driver, url: str, timeout: float = 300) -> tuple[float, float]:
    """Open the app, click Run with the default settings; seconds to the first live weights and to the final weight chart."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    button = WebDriverWait(driver, 90).until(EC.element_to_be_clickable((By.XPATH, RUN_BUTTON_XPATH)))
    t0 = time.perf_counter()
    button.click()
    WebDriverWait(driver, timeout, poll_frequency=0.2).until(EC.presence_of_element_located((By.XPATH, LIVE_WEIGHTS_XPATH)))
    live = time.perf_counter() - t0
    WebDriverWait(driver, timeout, poll_frequency=0.2).until(EC.presence_of_element_located((By.XPATH, WEIGHT_CHART_XPATH)))
    return live, time.perf_counter() - t0


def _click_and_wait(driver, click_xpath: str, xpath: str, timeout: float) -> float:
    """Click the element at ``click_xpath``; seconds until ``xpath`` is on the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    el = driver.find_element(By.XPATH, click_xpath)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)  # clear of the page's top bar
    t0 = time.perf_counter()
    el.click()
    WebDriverWait(driver, timeout, poll_frequency=0.05).until(EC.presence_of_element_located((By.XPATH, xpath)))
    return time.perf_counter() - t0


def open_tab_and_wait(driver, tab: str, xpath: str, timeout: float = 120) -> float:
    """Click a result tab; seconds until ``xpath`` is on the page."""
    return _click_and_wait(driver, TAB_XPATH.format(tab), xpath, timeout)


def pick_and_wait(driver, label: str, xpath: str, timeout: float = 180) -> float:
    """Click a radio option by its label; seconds until ``xpath`` is on the page."""
    return _click_and_wait(driver, f"//label[.//*[normalize-space(text())='{label}']]", xpath, timeout)


# Clicks a radio option and polls the page every 5 ms for the new map's title; the clock is the page's
# own (performance.now), so WebDriver's round trips and XPath polling are not counted.
_SWITCH_JS = """
var done = arguments[arguments.length - 1], label = arguments[0], title = arguments[1];
var el = Array.from(document.querySelectorAll('label')).find(function (l) { return l.innerText.trim() == label; });
var t0 = performance.now();
el.click();
(function poll() {
  var now = performance.now() - t0;
  var drawn = Array.from(document.querySelectorAll('svg text')).some(function (t) { return t.textContent.indexOf(title) >= 0; });
  if (drawn || now > 30000) { done(drawn ? now / 1000 : null); return; }
  setTimeout(poll, 5);
})();
"""


def switch_in_page(driver, label: str, title: str) -> float | None:
    """Seconds, on the page's clock, from clicking the radio option ``label`` to a chart titled ``title`` drawn."""
    driver.set_script_timeout(60)
    return driver.execute_async_script(_SWITCH_JS, label, title)


def browser_run(url: str, tmp: str) -> dict:
    maps = "//*[local-name()='text' and contains(., 'PCA maps')]"
    driver = chrome(os.path.join(tmp, "profile"))
    try:
        live, final = click_run(driver, url)
        cold = open_tab_and_wait(driver, "Feature maps", maps)
        open_tab_and_wait(driver, "Weights", WEIGHT_CHART_XPATH)
        warm = open_tab_and_wait(driver, "Feature maps", maps)
        umap_cold = pick_and_wait(driver, "UMAP", maps.replace("PCA", "UMAP"))
        switches, in_page = [], []  # three rounds: one switch is too noisy on a 2-core machine
        for _ in range(3):
            switches.append(pick_and_wait(driver, "PCA", maps))
            switches.append(pick_and_wait(driver, "UMAP", maps.replace("PCA", "UMAP")))
        for _ in range(3):
            time.sleep(0.5)
            in_page.append(switch_in_page(driver, "PCA", "PCA maps"))
            time.sleep(0.5)
            in_page.append(switch_in_page(driver, "UMAP", "UMAP maps"))
        out = {"click_to_live_weights_seconds": live, "click_to_final_weights_seconds": final,
               "browser_map_tab_cold_seconds": cold, "browser_map_tab_cached_seconds": warm,
               "browser_umap_cold_seconds": umap_cold, "browser_map_switch_cached_seconds": switches,
               "page_clock_map_switch_cached_seconds": in_page}
        try:
            out.update(simplex_run(driver))
        except Exception as exc:  # noqa: BLE001 - recorded, without losing the figures above
            out["simplex_error"] = f"{exc.__class__.__name__}: {exc}"[:500]
        return out
    finally:
        driver.quit()


SIMPLEX_XPATH = "//*[local-name()='text' and contains(., 'H-score over the mixtures')]"


def simplex_run(driver) -> dict:
    """The Conflicts tab: measure interference, compute the simplex view, then switch to the matrices and back (the
    simplex drawn again from the session's result), on WebDriver's clock and on the page's own."""
    open_tab_and_wait(driver, "Conflicts", "//button[contains(., 'Measure interference')]")
    inter = _click_and_wait(driver, "//button[contains(., 'Measure interference')]",
                            "//*[local-name()='text' and contains(., 'Measured mixing loss')]", 300)
    pick_and_wait(driver, "three sources", "//button[contains(., 'Compute the simplex')]")
    simplex = _click_and_wait(driver, "//button[contains(., 'Compute the simplex')]", SIMPLEX_XPATH, 300)
    redraws, in_page = [], []
    for _ in range(3):
        pick_and_wait(driver, "every pair", "//*[local-name()='text' and contains(., 'Measured mixing loss')]")
        time.sleep(0.5)
        redraws.append(pick_and_wait(driver, "three sources", SIMPLEX_XPATH))
    for _ in range(3):
        pick_and_wait(driver, "every pair", "//*[local-name()='text' and contains(., 'Measured mixing loss')]")
        time.sleep(0.5)
        in_page.append(switch_in_page(driver, "three sources", "H-score over the mixtures"))
    return {"interference_seconds": inter, "simplex_cold_seconds": simplex,
            "cached_simplex_redraw_seconds": redraws, "page_clock_cached_simplex_redraw_seconds": in_page}


def map_cache() -> dict:
    """A PCA map of the default run's features, cold and from Streamlit's cache (AppTest, no browser)."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(os.path.join(ROOT, "dashboard", "app.py"), default_timeout=300).run()
    at.button(key="run_button").click().run()
    while "ensemble_job" in at.session_state and not at.session_state["ensemble_job"].finished:
        time.sleep(0.5)
    at.run()
    at.session_state["result_tab"] = "Feature maps"  # what a click on the tab does
    t0 = time.perf_counter()
    at.run()
    cold = time.perf_counter() - t0
    assert any("PCA maps" in el.proto.spec for el in at.get("plotly_chart")), "the map was not drawn"
    t0 = time.perf_counter()
    at.run()  # a rerun redraws the open tab, the map from the cache
    warm = time.perf_counter() - t0
    return {"results_page_with_map_cold_seconds": cold, "results_page_with_map_cached_seconds": warm}


def main() -> int:
    from core import assets
    from core.io.runs import environment

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
        result.update(browser_run(url, tmp))
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON rather than hidden
        result["click_to_final_weights_seconds"] = None
        result["browser_error"] = f"{exc.__class__.__name__}: {exc}"[:500]
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
