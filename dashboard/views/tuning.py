"""The Tuning tab: every method's initial prompt tuned on the target with the same budget, test accuracy compared."""
from __future__ import annotations

import json
import os
import time

import streamlit as st

from core import TuneConfig
from dashboard import charts
from dashboard.state import Job, load_task
from dashboard.ui import chart, job_view
from dashboard.views.inputs import bank_for

EXPLAIN = ("The decisive test: every method's initial prompt is tuned with a fresh linear head on the target's train "
           "split for the same number of epochs; the val split picks the epoch; the bars are test accuracy.")


def progress(job: Job) -> tuple[float, str]:
    """Per epoch: which method, which epoch, how many methods are done, and the time left at the pace so far."""
    last = job.progress[-1] if job.progress else {"method": "...", "done": 0, "total": 1, "epoch": 0, "epochs": 1}
    units = last.get("units", 1)
    f = (last["done"] + last.get("epoch", 0) / max(1, last.get("epochs", 1)) / units) / max(1, last["total"])
    left = ""
    if f > 0:
        elapsed = time.time() - job.started
        left = f", about {elapsed * (1 - f) / f:.0f} s left at this pace"
    return f, (f"tuning {last['method']}: epoch {last.get('epoch', 0)}/{last.get('epochs', '?')} "
               f"({last['done']}/{last['total']} methods done{left})")


def _tune(job: Job, model, bank, task, methods, epochs, params, seed, run_path: str | None = None):
    from core.baselines import run_method

    rows = []
    for m in methods:
        if job.stop.is_set():
            break
        # the oracle tunes every source, each a unit of its epochs
        units = len(bank) if m == "oracle" else 1
        base = {"stage": "method", "method": m, "done": len(rows), "total": len(methods), "epochs": epochs, "units": units}
        job.report({**base, "epoch": 0})
        cfg = TuneConfig(epochs=epochs, seed=seed)
        seen = [0]  # epochs finished in this method (the oracle's tunes one after another)

        def per_epoch(info, b=base, seen=seen):
            seen[0] += 1
            job.report({**b, "epoch": seen[0], "epochs": b["epochs"] * b["units"], "units": 1})

        r = run_method(m, model, bank, task, cfg, params, should_stop=job.stop, callback=per_epoch)
        rows.append({"method": m, "test_acc": r.test_acc, "val_acc": r.val_acc})
    if run_path and os.path.isdir(run_path):  # the run folder holds the tuning results too
        with open(os.path.join(run_path, "tuning.json"), "w") as fh:
            json.dump({"epochs": epochs, "seed": seed, "stopped": job.stop.is_set(), "results": rows}, fh, indent=1)
    return rows


def view(res: dict, model, drawn: dict) -> None:
    from core.baselines import METHODS

    st.caption(EXPLAIN)
    names = res["names"]
    methods = st.multiselect("Methods", list(METHODS), default=["random", "uniform", "best_hscore", "hgprompt"], key="tune_methods")
    epochs = st.slider("Tuning epochs (same for every method)", 1, 50, 10, key="tune_epochs")
    jkey, rkey = f"tune_job_{res['id']}", f"tune_result_{res['id']}"
    if rkey not in st.session_state and res.get("tuning"):  # read back from the run folder after a reload
        st.session_state[rkey] = res["tuning"]["results"]
    if st.button("Tune and compare", key="tune_button", disabled=jkey in st.session_state or res.get("stack") is None):
        bank, task = bank_for(names), load_task(res["target_path"])
        st.session_state[jkey] = Job("tune", lambda job: _tune(job, model, bank, task, methods, epochs, res["params"],
                                                             res["params"]["seed"], res["run_path"])).start()
    if jkey in st.session_state:
        job_view(jkey, rkey, progress)
    rows = st.session_state.get(rkey)
    if rows:
        drawn["accuracy"] = charts.accuracy_bars(rows)
        chart(st, drawn["accuracy"], key="acc_chart")
        st.dataframe(rows, hide_index=True)
