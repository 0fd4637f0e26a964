"""Screenshots of the dashboard's views at 1280x720, as a new user sees them, for a person to look at.

    python -m scripts.screenshots                      # -> bench/results/screenshots/3*.png, 4*.png (15-30 min on 2 CPUs)
    python -m scripts.screenshots --out /tmp/shots --only lesson

Serves the app on a free port (a scratch runs folder), drives headless Chromium (Debian's chromium and
chromium-driver) through a run with task arithmetic and every view built for it, the lesson and the deep bank, and
saves one PNG per view: the element the view is about is scrolled into sight first.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench.dashboard import (RUN_BUTTON_XPATH, TAB_XPATH, WEIGHT_CHART_XPATH, _click_and_wait, _port, chrome, flip,
                             nav, pick_and_wait, select, viewport)

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

    def click(self, xpath: str, then: str, timeout: float = 300) -> None:
        _click_and_wait(self.driver, xpath, then, timeout)

    def button(self, label: str, then: str, timeout: float = 300) -> None:
        self.click(f"//button[contains(., \"{label}\")]", then, timeout)

    def tab(self, name: str, then: str) -> None:
        self.click(TAB_XPATH.format(name), then, 120)


def ensemble(s: Shots, url: str) -> None:
    """A task-arithmetic run on the defaults, then every tab and the lab's views."""
    s.driver.get(url)
    s.wait(RUN_BUTTON_XPATH, 120)
    select(s.driver, "Mixing rule", "task_arithmetic")
    s.take("30-sidebar-mixing-rule-objective")
    s.click(RUN_BUTTON_XPATH, WEIGHT_CHART_XPATH)
    s.take("31-weights-task-arithmetic", WEIGHT_CHART_XPATH, "center")
    s.tab("Objective", _text("Objective and its terms"))
    s.take("32-objective", _text("Objective and its terms"), "center")
    s.tab("H-scores", _text("Transferability (H-score)"))
    s.take("33-hscores-bars-from-zero", _text("Transferability (H-score)"), "center")
    flip(s.driver, "Zoom in on their differences")
    s.take("33b-hscores-zoomed-dots", _text("Zoomed: the H-scores"), "center")
    s.tab("Conflicts", "//button[contains(., 'Measure interference')]")
    s.take("34-conflicts-raw", _text("Gradient cosine between sources"), "center")
    s.button("Measure interference", _text("Measured mixing loss"))
    s.take("35-interference-band-colours", _text("Raw cosine"), "center")
    pick_and_wait(s.driver, "two sources", _text("H-score from "))
    s.take("36-pair-view", _text("H-score from "), "center")
    pick_and_wait(s.driver, "three sources", "//button[contains(., 'Compute the simplex')]")
    s.button("Compute the simplex", _text("H-score over the mixtures"))
    s.take("37-simplex", _text("H-score over the mixtures"), "center")
    pick_and_wait(s.driver, "task-vector plane", "//button[contains(., 'Compute the plane')]")
    flip(s.driver, "Also the probe accuracy")
    s.button("Compute the plane", _text("Task-vector plane of"), 1200)  # 441 prompts, and a probe on each
    s.take("38-task-vector-plane", _text("Task-vector plane of"), "center")
    s.take("38b-task-vector-plane-probe", _text("Probe accuracy over the task-vector plane"), "center")
    pick_and_wait(s.driver, "objective vs accuracy", "//button[contains(., \"Measure each source's probe\")]")
    s.button("Measure each source's probe", _text("against accuracy"), 1200)
    s.take("39-objective-vs-accuracy", _text("against accuracy"), "center")
    s.tab("Tuning", "//button[contains(., 'Tune and compare')]")
    s.take("40-tuning-estimate", "//button[contains(., 'Tune and compare')]", "center")
    s.tab("Export", "//button[contains(., 'Figure: plane')]")
    s.take("41-export-with-lab-figures", "//button[contains(., 'Figure: plane')]", "center")
    nav(s.driver, "Compare runs")
    s.take("42-compare")


def lesson(s: Shots, url: str) -> None:
    """Every lesson step, the interference and mixing steps measured, and a reload mid-lesson."""
    s.driver.get(url)
    nav(s.driver, "Lesson", "//h2")
    headers = ["What a prompt is", "What the H-score measures", "Why averaging can hurt", "What the weights pick",
               "Where prompts interfere", "When mixing helps"]
    for i, h in enumerate(headers):
        s.wait(f"//h2[contains(., '{h}')]")
        if i == 3:
            s.button("Learn the weights", WEIGHT_CHART_XPATH)
        if i == 4:
            s.button("Measure interference", _text("Measured mixing loss"))
            s.take("43-lesson-5-interference", _text("Centred gradient cosine"), "center")
        elif i == 5:
            s.button("Measure the four prompts", "//*[contains(text(), 'HGPrompt on the whole bank')]", 600)
            s.take("44-lesson-6-when-mixing-helps", "//*[contains(text(), 'Measured just now')]", "start")
        else:
            s.take(f"43-lesson-{i + 1}")
        if i < len(headers) - 1:
            s.click("//button[normalize-space(.)='Next']", f"//h2[contains(., '{headers[i + 1]}')]")
    s.driver.refresh()
    s.wait("//h2[contains(., 'When mixing helps')]")
    s.take("45-lesson-after-reload", "//*[contains(text(), 'Measured just now')]", "start")
    flip(s.driver, "Projector mode")
    s.take("46-lesson-projector-mode", "//*[contains(text(), 'Measured just now')]", "start")


def deep(s: Shots, url: str) -> None:
    """A layer-wise run on the deep bank and its per-layer conflicts."""
    s.driver.get(url)
    s.wait(RUN_BUTTON_XPATH, 120)
    s.click("//label[.//*[starts-with(normalize-space(text()), 'deep prompts')]]",
            "//*[@data-testid='stSidebar']//*[contains(text(), '_deep')]", 60)
    time.sleep(2)
    select(s.driver, "Mixing rule", "layerwise")
    s.click(RUN_BUTTON_XPATH, WEIGHT_CHART_XPATH)
    s.take("47-deep-layerwise-weights", WEIGHT_CHART_XPATH, "center")
    s.tab("Conflicts", _text("Gradient cosine between sources"))
    s.take("48-deep-conflicts", _text("Gradient cosine between sources"), "center")


PARTS = {"ensemble": ensemble, "lesson": lesson, "deep": deep}


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
            except Exception as exc:  # noqa: BLE001 - the next part still runs; the failure is named
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
