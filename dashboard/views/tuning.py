"""The Tuning tab: every method's initial prompt tuned on the target with the same budget, over one or more seeds,
test accuracy compared with intervals, and an estimate of the time before anything starts."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import streamlit as st

from core import TuneConfig
from dashboard import charts
from dashboard.state import Job, load_task
from dashboard.ui import chart, job_view
from dashboard.views.inputs import bank_for

EXPLAIN = ("The decisive test: every method's initial prompt is tuned on the target's train split for the same number "
           "of epochs, its head starting from a linear probe; the val split picks the epoch; the bars are test "
           "accuracy. With two seeds or more every seed redraws the train/val split, and the table gives HGPrompt's "
           "paired difference to each method with a bootstrap interval (few seeds make it wide; bench/quality.py runs "
           "the full evaluation).")


def progress(job: Job) -> tuple[float, str]:
    """Per epoch: which method, which epoch, how many tunes are done, and the time left at the pace so far."""
    last = job.progress[-1] if job.progress else {"method": "...", "done": 0, "total": 1, "epoch": 0, "epochs": 1}
    units = last.get("units", 1)
    f = (last["done"] + last.get("epoch", 0) / max(1, last.get("epochs", 1)) / units) / max(1, last["total"])
    left = ""
    if f > 0:
        elapsed = time.time() - job.started
        left = f", about {elapsed * (1 - f) / f:.0f} s left at this pace"
    seed = f", seed {last['seed']}" if "seed" in last else ""
    return f, (f"tuning {last['method']}{seed}: epoch {last.get('epoch', 0)}/{last.get('epochs', '?')} "
               f"({last['done']}/{last['total']} tunes done{left})")


@st.cache_data(show_spinner="Timing a tuning step on this target ...", max_entries=32)
def _estimate(key: str, _model, _task, _prompt, epochs: int) -> float:
    from core.tuning import estimate_tune_seconds

    return estimate_tune_seconds(_model, _task, _prompt, TuneConfig(epochs=epochs))


def _tune(job: Job, model, bank, task, methods, epochs, params, seeds: int, run_path: str | None = None):
    from core.baselines import run_method

    rows = []
    total = len(methods) * seeds
    for seed in range(seeds):
        data = task.resplit(seed) if seeds > 1 else task  # a seed redraws the split; one seed keeps the task's own
        for m in methods:
            if job.stop.is_set():
                break
            units = len(bank) if m == "oracle" else 1  # the oracle tunes every source, each a unit of its epochs
            base = {"stage": "method", "method": m, "seed": seed, "done": len(rows), "total": total, "epochs": epochs,
                    "units": units}
            job.report({**base, "epoch": 0})
            seen = [0]  # epochs finished in this method (the oracle's tunes one after another)

            def per_epoch(info, b=base, seen=seen):
                seen[0] += 1
                job.report({**b, "epoch": seen[0], "epochs": b["epochs"] * b["units"], "units": 1})

            r = run_method(m, model, bank, data, TuneConfig(epochs=epochs, seed=seed), params, should_stop=job.stop,
                           callback=per_epoch)
            rows.append({"method": m, "seed": seed, "test_acc": r.test_acc, "val_acc": r.val_acc})
    if run_path and os.path.isdir(run_path):  # the run folder holds the tuning results too
        with open(os.path.join(run_path, "tuning.json"), "w") as fh:
            json.dump({"epochs": epochs, "seeds": seeds, "stopped": job.stop.is_set(), "results": rows}, fh, indent=1)
    return rows


def _summary(rows: list[dict]) -> list[dict]:
    """Per method: mean test accuracy over seeds and, against HGPrompt, the paired difference with its interval."""
    from core.stats import paired

    by = {}
    for r in rows:
        by.setdefault(r["method"], {})[r["seed"]] = r["test_acc"]
    ref = by.get("hgprompt")
    out = []
    for m, accs in by.items():
        row = {"method": m, "seeds": len(accs), "mean test acc": round(float(np.mean(list(accs.values()))), 4)}
        if ref is not None and m != "hgprompt":
            common = sorted(set(ref) & set(accs))
            p = paired([ref[s] for s in common], [accs[s] for s in common])
            row.update({"HGPrompt minus this": round(p["mean_diff"], 4),
                        "95 % interval": f"[{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]" if len(common) > 1 else "one seed",
                        "wins/ties/losses": f"{p['wins']}/{p['ties']}/{p['losses']}"})
        out.append(row)
    return out


def view(res: dict, model, drawn: dict) -> None:
    from core.baselines import METHODS

    st.caption(EXPLAIN)
    names = res["names"]
    c1, c2, c3 = st.columns([3, 2, 1])
    methods = c1.multiselect("Methods", list(METHODS), default=["random", "uniform", "best_hscore", "hgprompt"],
                             key="tune_methods")
    epochs = c2.slider("Tuning epochs (same for every method)", 1, 50, 10, key="tune_epochs")
    seeds = c3.number_input("Seeds", 1, 5, 1, key="tune_seeds", help="Each seed redraws the train/val split (from two on).")
    jkey, rkey = f"tune_job_{res['id']}", f"tune_result_{res['id']}"
    if rkey not in st.session_state and res.get("tuning"):  # read back from the run folder after a reload
        st.session_state[rkey] = res["tuning"]["results"]
    usable = res.get("stack") is not None
    if usable and methods and jkey not in st.session_state:
        task = load_task(res["target_path"])
        per = _estimate(f"{res['id']}-{epochs}", model, task, res["prompt"], epochs)
        tunes = sum(len(names) if m == "oracle" else 1 for m in methods) * seeds
        fits = sum(m.startswith("hgprompt") for m in methods) * seeds
        est = per * tunes + fits * res.get("seconds", 15.0)
        st.info(f"Estimate: about {est / 60:.1f} min: {tunes} tunes of {epochs} epochs at about {per:.0f} s each "
                f"(timed just now on this target)" + (f", plus {fits} weight fits of about {res.get('seconds', 15):.0f} s"
                                                     if fits else "") + ".")
    if st.button("Tune and compare", key="tune_button", disabled=jkey in st.session_state or not usable or not methods):
        bank, task = bank_for(names), load_task(res["target_path"])
        st.session_state[jkey] = Job("tune", lambda job: _tune(job, model, bank, task, methods, epochs, res["params"],
                                                             int(seeds), res["run_path"])).start()
    if jkey in st.session_state:
        job_view(jkey, rkey, progress)
    rows = st.session_state.get(rkey)
    if rows:
        rows = [{"seed": 0, **r} for r in rows]  # results saved before seeds existed carry none
        drawn["accuracy"] = charts.accuracy_bars(rows)
        chart(st, drawn["accuracy"], key="acc_chart")
        st.dataframe(_summary(rows), hide_index=True)
