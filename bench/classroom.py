"""A class on one server: N sessions click Run on the defaults within a minute; writes bench/results/classroom.json.

    python bench/classroom.py [--sessions 30] [--spread 30]

Each session is a Streamlit AppTest of the real app in this process (the same server-side code a browser session
runs), with its own session id and so its own run folder. The sessions click "Run ensemble learning" one after
another over ``--spread`` seconds, and between clicks every session whose job has finished gets the rerun that
draws its weights; the clock of a session runs from its click to that rerun's end. Recorded: every session's seconds,
how many fits were computed, and whether every session got its own run folder. Browsers are left out: 30 headless
Chromiums do not fit on a 2-core machine beside the server.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=30)
    ap.add_argument("--spread", type=float, default=30.0, help="seconds over which the clicks are spread")
    args = ap.parse_args(argv)
    os.environ["HGPROMPT_RUNS"] = os.path.join(tempfile.mkdtemp(), "runs")
    from streamlit.testing.v1 import AppTest

    import dashboard.ensemble_runs as runs
    import dashboard.state as state
    from core import assets
    from core.io.runs import environment

    assets.require()
    state.RUNS_ROOT = os.environ["HGPROMPT_RUNS"]
    fits = []
    real_fit = runs.HGPromptEnsemble.fit

    def counted_fit(self, *a, **kw):
        fits.append(time.time())
        return real_fit(self, *a, **kw)

    runs.HGPromptEnsemble.fit = counted_fit
    app = os.path.join(ROOT, "dashboard", "app.py")
    sessions = [AppTest.from_file(app, default_timeout=300).run() for _ in range(args.sessions)]  # pages open
    clicked, seen = {}, {}

    def poll() -> None:
        """Every clicked session whose job has finished gets the rerun that draws its weights (what its page's
        two-second refresh does in a browser)."""
        for k in list(clicked):
            if k in seen:
                continue
            at = sessions[k]
            job = at.session_state["ensemble_job"] if "ensemble_job" in at.session_state else None
            if job is None or job.finished:
                at.run()
                at.run()
                if "ensemble_result" in at.session_state:
                    seen[k] = time.perf_counter() - clicked[k]

    t_start = time.perf_counter()
    for k, at in enumerate(sessions):
        while time.perf_counter() - t_start < k * args.spread / max(1, args.sessions - 1):
            poll()
            time.sleep(0.05)
        clicked[k] = time.perf_counter()
        at.button(key="run_button").click().run()
        if "ensemble_result" in at.session_state:  # served at once from the cache
            seen[k] = time.perf_counter() - clicked[k]
    while len(seen) < len(sessions) and time.perf_counter() - t_start < 900:
        poll()
        time.sleep(0.1)
    results = [at.session_state["ensemble_result"] if "ensemble_result" in at.session_state else None
               for at in sessions]
    folders = {os.path.dirname(r["run_path"]) for r in results if r}
    secs = [seen.get(k) for k in range(len(sessions))]
    done = [s for s in secs if s is not None]
    out = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "environment": environment(),
        "sessions": args.sessions, "clicks_spread_seconds": args.spread, "fits_computed": len(fits),
        "sessions_with_weights": len(done), "own_run_folder_each": len(folders) == args.sessions,
        "served_from_another_run": sum(bool(r and r.get("served_from")) for r in results),
        "click_to_weights_seconds": secs, "max_seconds": max(done) if done else None,
        "median_seconds": sorted(done)[len(done) // 2] if done else None,
        "all_within_30_s": bool(done) and len(done) == args.sessions and max(done) < 30,
    }
    path = os.path.join(ROOT, "bench", "results", "classroom.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=2)
    print(json.dumps({k: v for k, v in out.items() if k != "environment"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
