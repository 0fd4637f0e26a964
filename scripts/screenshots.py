"""Screenshots of the dashboard's views at 1280x720, as a new user sees them, for a person to look at.

    python -m scripts.screenshots                      # -> bench/results/screenshots/1*-5*.png (30-60 min on 2 CPUs)
    python -m scripts.screenshots --out /tmp/shots --only lesson

Serves the app on a free port (a scratch runs folder), drives headless Chromium (Debian's chromium and
chromium-driver) through a run with task arithmetic and every view built for it, a run stopped during its gradient
pass, a queued run cancelled, the lesson, the deep bank with the layer-wise rule, Compare and Data, and saves one PNG
per view, in normal and (``-projector``) Projector mode: the element the view is about is scrolled into sight first.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench.dashboard import (
    RUN_BUTTON_XPATH,
    TAB_XPATH,
    WEIGHT_CHART_XPATH,
    _click_and_wait,
    _port,
    chrome,
    flip,
    nav,
    pick_and_wait,
    select,
    viewport,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (1280, 720)


def _text(title: str) -> str:
    return f"//*[local-name()='text' and contains(., \"{title}\")]"


class Shots:
    def __init__(self, driver, out: str):
        self.driver, self.out, self.taken = driver, out, []

    def wait(self, xpath: str, timeout: float = 300):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as EC
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.3).until(
            EC.presence_of_element_located((By.XPATH, xpath)))

    def settled(self, timeout: float = 900) -> None:
        """Wait until the page has finished its rerun: no spinner, nothing drawn faded as stale."""
        from selenium.webdriver.common.by import By

        end = time.monotonic() + timeout
        while time.monotonic() < end and self.driver.find_elements(
                By.CSS_SELECTOR, "[data-testid='stSpinner'], [data-stale='true']"):
            time.sleep(0.5)

    def take(self, name: str, xpath: str | None = None, block: str = "start") -> None:
        self.settled()
        if xpath:
            el = self.wait(xpath)
            self.driver.execute_script(f"arguments[0].scrollIntoView({{block: '{block}'}})", el)
            self.driver.execute_script("window.scrollBy(0, -60)")  # clear of the page's top bar
        time.sleep(1.5)
        path = os.path.join(self.out, f"{name}.png")
        self.driver.save_screenshot(path)
        self.taken.append(path)
        print(f"  {path}", flush=True)

    def both(self, name: str, xpath: str | None = None, block: str = "start") -> None:
        """The view in normal mode, then in Projector mode (``NAME-projector.png``), and back."""
        self.take(name, xpath, block)
        flip(self.driver, "Projector mode")
        self.take(f"{name}-projector", xpath, block)
        flip(self.driver, "Projector mode")

    def click(self, xpath: str, then: str, timeout: float = 300) -> None:
        _click_and_wait(self.driver, xpath, then, timeout)

    def button(self, label: str, then: str, timeout: float = 300) -> None:
        self.click(f"//button[contains(., \"{label}\")]", then, timeout)

    def tab(self, name: str, then: str) -> None:
        self.click(TAB_XPATH.format(name), then, 120)


def ensemble(s: Shots, url: str) -> None:
    """A task-arithmetic run on the defaults, then every tab and the lab's views, each in normal and Projector mode."""
    s.driver.get(url)
    s.wait(RUN_BUTTON_XPATH, 120)
    select(s.driver, "Mixing rule", "task_arithmetic")
    s.both("30-sidebar-mixing-rule-estimate", "//*[contains(text(), 'up to the first step')]", "center")
    s.click(RUN_BUTTON_XPATH, "//*[contains(text(), \"computing the sources' gradients\")]")
    s.take("49-running-gradient-pass-progress", "//*[contains(text(), \"computing the sources' gradients\")]", "center")
    s.wait(WEIGHT_CHART_XPATH, 1800)
    s.both("31-weights-task-arithmetic", WEIGHT_CHART_XPATH, "center")
    s.tab("Objective", _text("Objective and its terms"))
    s.take("32-objective", _text("Objective and its terms"), "center")
    s.tab("H-scores", _text("Transferability (H-score)"))
    s.take("33-hscores-bars-from-zero", _text("Transferability (H-score)"), "center")
    flip(s.driver, "Zoom in on their differences")
    s.both("33b-hscores-zoomed-dots", _text("Zoomed: H-scores"), "center")
    s.tab("Conflicts", "//button[contains(., 'Measure interference')]")
    s.take("34-conflicts-raw-and-estimate", "//button[contains(., 'Measure interference')]", "center")
    s.button("Measure interference", _text("Measured mixing loss"), 1800)
    s.both("35-interference-mixing-loss", _text("Measured mixing loss"), "start")
    s.both("35b-interference-centred-cosines", _text("Centred cosine"), "start")
    pick_and_wait(s.driver, "two sources", _text("H-score from "))
    s.both("36-pair-view-zoomed-axis", _text("H-score from "), "center")
    pick_and_wait(s.driver, "three sources", "//button[contains(., 'Compute the simplex')]")
    s.take("37a-simplex-estimate", "//button[contains(., 'Compute the simplex')]", "center")
    s.button("Compute the simplex", _text("H-score over the mixtures"), 1800)
    s.both("37-simplex", _text("H-score over the mixtures"), "center")
    pick_and_wait(s.driver, "task-vector plane", "//button[contains(., 'Compute the plane')]")
    s.button("Compute the plane", _text("Task-vector plane of"), 3000)
    s.both("38-task-vector-plane", _text("Task-vector plane of"), "center")
    pick_and_wait(s.driver, "objective vs accuracy", "//button[contains(., \"Measure each source's probe\")]")
    s.take("39-objective-vs-accuracy-estimate", "//button[contains(., \"Measure each source's probe\")]", "center")
    s.tab("Tuning", "//button[contains(., 'Tune and compare')]")
    s.both("40-tuning-estimate-and-chips", "//button[contains(., 'Tune and compare')]", "center")
    s.tab("Export", "//button[contains(., 'Figure: plane')]")
    s.both("41-export-prompt-and-metadata", "//button[contains(., \"Ensembled prompt's metadata\")]", "center")


def stop(s: Shots, url: str) -> None:
    """A default run stopped during the sources' gradient pass: the acknowledgement, then the partial result."""
    s.driver.get(url)
    s.click(RUN_BUTTON_XPATH, "//*[contains(text(), \"computing the sources' gradients\")]", 600)
    s.click("//button[normalize-space(.)='Stop']", "//*[contains(text(), 'Stopping after the current block')]", 60)
    s.take("50-stop-acknowledged", "//*[contains(text(), 'Stopping after the current block')]", "center")
    s.wait("//*[contains(text(), \"stopped during the sources' gradient pass\")]", 1200)
    s.both("51-stopped-partial-result", "//*[contains(text(), \"stopped during the sources' gradient pass\")]")


def queue(s: Shots, url: str) -> None:
    """Two sessions: the first runs, the second is queued with its wait and a Cancel button, then cancels."""
    from bench.dashboard import chrome

    other = chrome(os.path.join(tempfile.mkdtemp(), "profile-first"))
    try:
        viewport(other, *SIZE)
        other.get(url)
        Shots(other, s.out).click(RUN_BUTTON_XPATH, "//*[contains(text(), 'left')]", 600)
        s.driver.get(url)
        s.wait(RUN_BUTTON_XPATH, 120)
        type_number(s.driver, "Seed", 1)  # not the same run (an identical one would follow the first, not queue)
        s.click(RUN_BUTTON_XPATH, "//*[contains(text(), 'Place in the queue')]", 600)
        s.both("52-queued-with-wait-and-cancel", "//*[contains(text(), 'Place in the queue')]", "center")
        s.button("Cancel", "//*[contains(text(), 'Cancelled while queued')]", 120)
        s.take("53-queued-run-cancelled", "//*[contains(text(), 'Cancelled while queued')]", "center")
    finally:
        other.quit()


def lesson(s: Shots, url: str) -> None:
    """Every lesson step, the interference and mixing steps measured, each in normal and Projector mode, and a reload
    mid-lesson."""
    s.driver.get(url)
    nav(s.driver, "Lesson", "//h2")
    headers = ["What a prompt is", "What the H-score measures", "Why averaging can hurt", "What the weights pick",
               "Where prompts interfere", "When mixing helps"]
    for i, h in enumerate(headers):
        s.wait(f"//h2[contains(., '{h}')]")
        if i == 3:
            s.take("43-lesson-4-estimate", "//*[contains(text(), 'up to the first step')]", "center")
            s.button("Learn the weights", WEIGHT_CHART_XPATH, 1800)
            s.both("43-lesson-4")
        elif i == 4:
            s.take("43-lesson-5-estimate", "//button[contains(., 'Measure interference')]", "center")
            s.button("Measure interference", _text("Measured mixing loss"), 1800)
            s.both("43-lesson-5-interference", _text("Centred gradient cosine"), "center")
        elif i == 5:
            s.take("44-lesson-6-estimate", "//button[contains(., 'Measure the four prompts')]", "center")
            s.button("Measure the four prompts", "//*[contains(text(), 'HGPrompt on the whole bank')]", 3000)
            s.both("44-lesson-6-when-mixing-helps", "//*[contains(text(), 'Measured just now')]", "start")
        elif i == 2:
            s.both("43-lesson-3-zoomed-axis", _text("H-score from "), "center")
        else:
            s.both(f"43-lesson-{i + 1}")
        if i < len(headers) - 1:
            s.click("//button[normalize-space(.)='Next']", f"//h2[contains(., '{headers[i + 1]}')]")
    s.driver.refresh()
    s.wait("//h2[contains(., 'When mixing helps')]")
    s.take("45-lesson-after-reload", "//*[contains(text(), 'Measured just now')]", "start")


def deep(s: Shots, url: str) -> None:
    """A layer-wise run on the deep bank: its weights, its per-layer matrices at one layer, its simplex note; then
    Compare with every run on this server (deep and shallow overlaid) and the Data page."""
    s.driver.get(url)
    s.wait(RUN_BUTTON_XPATH, 120)
    s.click("//label[.//*[starts-with(normalize-space(text()), 'deep prompts')]]",
            "//*[@data-testid='stSidebar']//*[contains(text(), '_deep')]", 60)
    time.sleep(2)
    select(s.driver, "Mixing rule", "layerwise")
    s.click(RUN_BUTTON_XPATH, WEIGHT_CHART_XPATH, 1800)
    s.both("47-deep-layerwise-weights", WEIGHT_CHART_XPATH, "center")
    s.tab("Conflicts", _text("Gradient cosine between sources"))
    s.button("Measure interference", _text("Measured mixing loss"), 1800)
    layer_two(s.driver)
    s.wait(_text("Centred cosine, layer 2"), 120)
    s.both("48-deep-matrices-layer-2", "//*[contains(text(), 'at layer 2 is below')]", "start")
    s.both("48b-deep-centred-layer-2", _text("Centred cosine, layer 2"), "center")
    pick_and_wait(s.driver, "three sources", "//button[contains(., 'Compute the simplex')]")
    s.button("Compute the simplex", _text("H-score over the mixtures"), 1800)
    s.take("37b-simplex-of-a-layerwise-run", "//*[contains(text(), 'layer-wise rule')]", "center")
    nav(s.driver, "Compare runs")
    flip_checkbox(s.driver, "Every run on this server")
    s.wait(_text("Weights of every run"), 120)
    s.both("42-compare-deep-and-shallow", _text("Weights of every run"), "start")
    s.both("42b-compare-objective", _text("Objective J per step"), "center")
    nav(s.driver, "Data")
    s.both("18-data-counts")


def layer_two(driver) -> None:
    """Move the Conflicts tab's layer slider to block 2 (all -> 0 -> 1 -> 2, by the keyboard)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    thumb = driver.find_element(By.CSS_SELECTOR, "[data-testid='stSlider'] [role='slider']")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", thumb)
    thumb.click()
    for _ in range(3):
        thumb.send_keys(Keys.ARROW_RIGHT)
        time.sleep(0.5)
    time.sleep(2)


def type_number(driver, label: str, value) -> None:
    """Type ``value`` into the number input labelled ``label`` (and press Enter)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.XPATH,
                              f"//*[@data-testid='stNumberInput'][.//*[normalize-space(text())='{label}']]//input")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.ENTER)
    time.sleep(2)


def flip_checkbox(driver, label: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.XPATH, f"//label[.//*[normalize-space(text())='{label}']]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
    box.click()
    time.sleep(2)


PARTS = {"ensemble": ensemble, "stop": stop, "queue": queue, "lesson": lesson, "deep": deep}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "screenshots"))
    ap.add_argument("--only", nargs="+", choices=list(PARTS), default=list(PARTS))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    tmp = tempfile.mkdtemp()
    port = _port()
    log = open(os.path.join(tmp, "server.log"), "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true"], cwd=ROOT,
                            env={**os.environ, "HGPROMPT_RUNS": os.path.join(tmp, "runs")}, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    failed = []
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.2)
        for name in args.only:
            driver = chrome(os.path.join(tmp, f"profile-{name}"))
            viewport(driver, *SIZE)
            s = Shots(driver, args.out)
            print(f"{name}:", flush=True)
            try:
                PARTS[name](s, url)
            except Exception as exc:  # the next part still runs; the failure is named
                failed.append(f"{name}: {exc.__class__.__name__}: {str(exc)[:200]}")
                driver.save_screenshot(os.path.join(args.out, f"failed-{name}.png"))
            finally:
                driver.quit()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for f in failed:
        print("FAILED", f)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
