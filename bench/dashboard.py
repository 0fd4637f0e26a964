"""Dashboard speed on the embedded default; writes bench/results/dashboard.json.

    python bench/dashboard.py

Measures (wall clock, this machine): seconds from launching `streamlit run` to a healthy
`/_stcore/health`; seconds from clicking "Run ensemble learning" in headless Chromium (default
settings) to the live weights and to the final weight chart; the Feature maps tab opened cold and
again from the cache; UMAP cold, then switching between cached maps (browser, including drawing), timed
by WebDriver and again on the page's own clock (click to the new map drawn, without WebDriver's overhead);
the same map redraw without a browser (AppTest); measuring interference, computing the simplex view and the
task-vector plane and switching back to each from the pair matrices (drawn from the session's result), on both
clocks; and Run to the final weights with each mixing rule (average, task arithmetic; layer-wise on the deep bank).
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
    """Open the app, click Run with the default settings; seconds to the first live weights and to the final weight
    chart."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    button = WebDriverWait(driver, 90).until(EC.element_to_be_clickable((By.XPATH, RUN_BUTTON_XPATH)))
    t0 = time.perf_counter()
    button.click()
    WebDriverWait(driver, timeout, poll_frequency=0.2).until(
        EC.presence_of_element_located((By.XPATH, LIVE_WEIGHTS_XPATH)))
    live = time.perf_counter() - t0
    WebDriverWait(driver, timeout, poll_frequency=0.2).until(
        EC.presence_of_element_located((By.XPATH, WEIGHT_CHART_XPATH)))
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
  var drawn = Array.from(document.querySelectorAll('svg text'))
    .some(function (t) { return t.textContent.indexOf(title) >= 0; });
  if (drawn || now > 30000) { done(drawn ? now / 1000 : null); return; }
  setTimeout(poll, 5);
})();
"""


def switch_in_page(driver, label: str, title: str) -> float | None:
    """Seconds, on the page's clock, from clicking the radio option ``label`` to a chart titled ``title`` drawn."""
    driver.set_script_timeout(60)
    return driver.execute_async_script(_SWITCH_JS, label, title)


def nav(driver, title: str, header_xpath: str | None = None, timeout: float = 60) -> None:
    """Go to the page ``title`` through the sidebar's navigation (the same browser session); wait for its title, or
    for ``header_xpath``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    link = _find(driver, "[data-testid='stSidebarNavLink']",
                 lambda el: (el.text.splitlines() or [""])[-1].strip() == title
                 or el.get_attribute("textContent").strip().endswith(title), timeout)
    assert link, f"no page {title!r} in the navigation"
    link[0].click()
    WebDriverWait(driver, timeout, poll_frequency=0.2).until(EC.presence_of_element_located(
        (By.XPATH, header_xpath or "//h1")))
    time.sleep(1.0)


def _find(driver, css: str, keep, timeout: float) -> list:
    """The elements matching ``css`` for which ``keep(element)`` holds, waiting up to ``timeout`` s for one to appear
    (a page still rendering after a load or a rerun has not drawn its widgets yet)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    end = time.monotonic() + timeout
    while True:
        try:
            found = [el for el in driver.find_elements(By.CSS_SELECTOR, css) if keep(el)]
        except StaleElementReferenceException:
            found = []
        if found or time.monotonic() > end:
            return found
        time.sleep(0.3)


def _label(widget) -> str:
    """A widget's label, read from the page even where it is scrolled out of sight (Selenium's ``text`` is empty)."""
    from selenium.webdriver.common.by import By

    found = widget.find_elements(By.CSS_SELECTOR, "[data-testid='stWidgetLabel'], label")
    return (found[0].get_attribute("textContent") if found else widget.get_attribute("textContent") or "").strip()


def viewport(driver, width: int, height: int) -> None:
    """Make the page's viewport (not the window around it) ``width`` x ``height`` CSS pixels."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})


def select(driver, label: str, option: str, timeout: float = 30) -> None:
    """Pick ``option`` in the select box labelled ``label``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    box = _find(driver, "[data-testid='stSelectbox']", lambda el: _label(el) == label, timeout)
    assert box, f"no select box {label!r}"
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", box[0])
    box[0].find_element(By.CSS_SELECTOR, "input[role='combobox'], [data-baseweb='select']").click()
    item = WebDriverWait(driver, timeout).until(EC.element_to_be_clickable(
        (By.XPATH, f"//*[@role='option'][normalize-space(.)='{option}']")))
    item.click()
    time.sleep(1.5)


def selected(driver, label: str, timeout: float = 30) -> str:
    """The value the select box labelled ``label`` shows."""
    from selenium.webdriver.common.by import By

    box = _find(driver, "[data-testid='stSelectbox']", lambda el: _label(el) == label, timeout)
    assert box, f"no select box {label!r}"
    field = box[0].find_elements(By.CSS_SELECTOR, "input[role='combobox']")
    return field[0].get_attribute("value") if field else box[0].text.splitlines()[-1].strip()


def toggled(driver, label: str, timeout: float = 30) -> bool:
    """Whether the toggle labelled ``label`` is on (waiting up to ``timeout`` s for a page still drawing it)."""
    from selenium.webdriver.common.by import By

    found = _find(driver, "[data-testid='stCheckbox'], [data-testid='stToggle']", lambda el: _label(el) == label,
                  timeout)
    assert found, f"no toggle {label!r}"
    return found[0].find_element(By.TAG_NAME, "input").is_selected()


def flip(driver, label: str, timeout: float = 30) -> None:
    """Click the toggle labelled ``label``."""
    from selenium.webdriver.common.by import By

    found = _find(driver, "[data-testid='stCheckbox'], [data-testid='stToggle']", lambda el: _label(el) == label,
                  timeout)
    assert found, f"no toggle {label!r}"
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", found[0])
    found[0].find_element(By.TAG_NAME, "label").click()
    time.sleep(1.5)


# Every drawn plotly chart's title, trace types and y-axis range, read from the page's own plotly objects.
_CHARTS_JS = """
return Array.from(document.querySelectorAll('.js-plotly-plot')).map(function (g) {
  var l = g._fullLayout || {}, t = l.title && l.title.text || '';
  return {title: t, types: (g._fullData || []).map(function (d) { return d.type; }),
          y0: l.yaxis && l.yaxis.range ? l.yaxis.range[0] : null,
          ytitle: l.yaxis && l.yaxis.title ? l.yaxis.title.text : ''};
});
"""


def drawn_charts(driver) -> list[dict]:
    """The page's plotly charts: title, trace types, y-axis start and title."""
    return driver.execute_script(_CHARTS_JS)


def h_bars_from_zero(driver) -> list[dict]:
    """The bar charts of H-scores on the page that do not start at 0 (none, when the page is right)."""
    return [c for c in drawn_charts(driver) if "bar" in c["types"] and "H-score" in (c["ytitle"] or "")
            and c["y0"] != 0]


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
        except Exception as exc:  # recorded, without losing the figures above
            out["simplex_error"] = f"{exc.__class__.__name__}: {exc}"[:500]
        try:
            out.update(plane_run(driver))
        except Exception as exc:  # recorded, without losing the figures above
            out["plane_error"] = f"{exc.__class__.__name__}: {exc}"[:500]
        return out
    finally:
        driver.quit()


SIMPLEX_XPATH = "//*[local-name()='text' and contains(., 'H-score over the mixtures')]"


def _switches_back(driver, view: str, xpath: str, title: str, times: int = 3) -> tuple[list, list]:
    """Switch to the pair matrices and back to a computed ``view`` (drawn again from the session's result), ``times``
    times on WebDriver's clock, then ``times`` times on the page's own."""
    redraws, in_page = [], []
    for clock in (redraws, in_page):
        for _ in range(times):
            pick_and_wait(driver, "every pair", "//*[local-name()='text' and contains(., 'Measured mixing loss')]")
            time.sleep(0.5)
            clock.append(pick_and_wait(driver, view, xpath) if clock is redraws
                         else switch_in_page(driver, view, title))
    return redraws, in_page


def simplex_run(driver) -> dict:
    """The Conflicts tab: measure interference, compute the simplex view, then switch to the matrices and back (the
    simplex drawn again from the session's result), on WebDriver's clock and on the page's own."""
    open_tab_and_wait(driver, "Conflicts", "//button[contains(., 'Measure interference')]")
    inter = _click_and_wait(driver, "//button[contains(., 'Measure interference')]",
                            "//*[local-name()='text' and contains(., 'Measured mixing loss')]", 300)
    pick_and_wait(driver, "three sources", "//button[contains(., 'Compute the simplex')]")
    simplex = _click_and_wait(driver, "//button[contains(., 'Compute the simplex')]", SIMPLEX_XPATH, 300)
    redraws, in_page = _switches_back(driver, "three sources", SIMPLEX_XPATH, "H-score over the mixtures")
    return {"interference_seconds": inter, "simplex_cold_seconds": simplex,
            "cached_simplex_redraw_seconds": redraws, "page_clock_cached_simplex_redraw_seconds": in_page}


PLANE_XPATH = "//*[local-name()='text' and contains(., 'Task-vector plane of')]"


def plane_run(driver) -> dict:
    """The Conflicts tab's task-vector plane (21 x 21 prompts, the run's objective): its first computation, then a
    switch to the pair matrices and back (drawn again from the session's result), on both clocks."""
    pick_and_wait(driver, "task-vector plane", "//button[contains(., 'Compute the plane')]")
    first = _click_and_wait(driver, "//button[contains(., 'Compute the plane')]", PLANE_XPATH, 300)
    redraws, in_page = _switches_back(driver, "task-vector plane", PLANE_XPATH, "Task-vector plane of")
    return {"plane_first_seconds": first, "plane_cached_redraw_seconds": redraws,
            "page_clock_plane_cached_redraw_seconds": in_page}


def rule_runs(url: str, tmp: str) -> dict:
    """Click Run to the final weights on the defaults with each mixing rule, each in a new browser session: the
    paper's average (the first click's settings, so the server's cache of identical runs serves it: this times the
    cache), task arithmetic on the shallow bank and the layer-wise rule on the deep bank (both computed)."""
    out = {}
    for rule, bank in (("average", None), ("task_arithmetic", None), ("layerwise", "deep prompts")):
        driver = chrome(os.path.join(tmp, f"profile-{rule}"))
        try:
            driver.get(url)
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support import expected_conditions as EC
            from selenium.webdriver.support.ui import WebDriverWait

            WebDriverWait(driver, 90).until(EC.element_to_be_clickable((By.XPATH, RUN_BUTTON_XPATH)))
            if bank:  # the bank's prompts replace the sources once the page has rerun
                _click_and_wait(driver, f"//label[.//*[starts-with(normalize-space(text()), '{bank}')]]",
                                "//*[@data-testid='stSidebar']//*[contains(text(), '_deep')]", 60)
                time.sleep(2.0)
            select(driver, "Mixing rule", rule)
            button = WebDriverWait(driver, 60).until(EC.element_to_be_clickable((By.XPATH, RUN_BUTTON_XPATH)))
            t0 = time.perf_counter()
            button.click()
            WebDriverWait(driver, 300, poll_frequency=0.2).until(
                EC.presence_of_element_located((By.XPATH, WEIGHT_CHART_XPATH)))
            out[rule] = time.perf_counter() - t0
        except Exception as exc:  # recorded, without losing the other rules
            out[rule] = None
            out[f"{rule}_error"] = f"{exc.__class__.__name__}: {exc}"[:300]
        finally:
            driver.quit()
    return {"click_to_final_weights_by_rule_seconds": out}


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
    except Exception as exc:  # recorded in the JSON rather than hidden
        result["click_to_final_weights_seconds"] = None
        result["browser_error"] = f"{exc.__class__.__name__}: {exc}"[:500]
    try:
        result.update(rule_runs(url, tmp))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # In its own process, started from the checkout's root: run as a script, this file (bench/dashboard.py) would
    # shadow the app's `dashboard` package for the in-process AppTest.
    proc = subprocess.run([sys.executable, "-c", "import json; from bench.dashboard import map_cache; "
                           "print(json.dumps(map_cache()))"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode == 0:
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    else:  # recorded, without losing the browser's figures
        result["map_cache_error"] = proc.stderr[-500:]
    out = os.path.join(ROOT, "bench", "results", "dashboard.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
