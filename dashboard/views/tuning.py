"""The Tuning tab: the evaluation protocol (:mod:`core.evaluation.protocol`, the one the CLI's ``baselines`` command
and the Ray sweep run) on this run's target and sources: every method's initial prompt tuned with the same budget,
over one or more seeds, test accuracy compared with intervals, and an estimate of the time before anything starts."""
from __future__ import annotations

import os
import time

import numpy as np
import streamlit as st

from core import TuneConfig
from core.evaluation.methods import METHODS, REFERENCE
from core.evaluation.protocol import Context, Protocol, evaluate, weights_work
from core.evaluation.summary import paired_summary
from core.io.safe_io import atomic_write_json
from core.tuning.tune import estimate_tune_seconds
from dashboard import charts
from dashboard.progress import duration
from dashboard.run_result import RunResult
from dashboard.state import BackgroundJob
from dashboard.ui import chart, job_view, metered

EXPLAIN = ("The decisive test: every method's initial prompt is tuned on the target's train split for the same number "
           "of epochs, its head starting from a linear probe; the val split picks the epoch; the bars are test "
           "accuracy. Every seed redraws the train/val split from the pooled train and val images (seed 0 too), as "
           "`python -m core baselines` and bench/quality.py do; methods with the same initial prompt share one tune. "
           "The table gives HGPrompt's paired difference to each method with a bootstrap interval (few seeds make it "
           "wide; bench/quality.py runs the full evaluation).")
SHOWN = [m for m in ("random", "uniform", "best_hscore", "hgprompt") if m in METHODS]
#: The table's columns in percent and percentage points, as the README reports them.
ACC, DIFF = "mean test acc (%)", "HGPrompt minus this"
WEIGHTS_SHARE = 0.05  # of the progress bar, for the weights phase


def progress(job: BackgroundJob) -> tuple[float, str]:
    """Per epoch: which methods the tune serves, which epoch, how many tunes are done, and the time left."""
    events = list(job.progress)
    ends = [i for i, p in enumerate(events) if p.get("stage") == "job"]
    if not ends or events[ends[-1]]["phase"] == "weights":
        if not any(p.get("stage") == "epoch" for p in events):
            what = "fitting the weights of every weight-based method on each seed's sample"
            if job.meter is None:
                return 0.02, what + " ..."
            # The weights come first and take a small share of the whole; the bar moves with their passes.
            return (WEIGHTS_SHARE * job.meter.fraction(),
                    f"{what}: about {duration(job.meter.seconds_left())} left for them")
    last = events[ends[-1]] if ends else {"done": 0, "total": 1, "phase": "tunes"}
    if last["phase"] == "weights":
        last = {"done": 0, "total": 1}
    epochs = [p for p in events[(ends[-1] + 1 if ends else 0):] if p.get("stage") == "epoch"]
    cur = epochs[-1] if epochs else None
    done, total = last["done"], max(1, last["total"])
    f = (done + (cur["epoch"] / max(1, cur["epochs"]) if cur else 0.0)) / total
    left = ""
    if f > 0:
        elapsed = time.time() - (job.began or job.started)  # (not the time it waited in the queue)
        left = f", about {elapsed * (1 - f) / f:.0f} s left at this pace"
    what = "tuning "
    if cur:
        what += (f"{', '.join(cur.get('methods') or ['...'])}, seed {cur.get('seed')}: "
                 f"epoch {cur['epoch']}/{cur['epochs']} ")
    return f, what + f"({done}/{total} tunes done{left})"


@st.cache_data(show_spinner="Timing a tuning step on this target ...", max_entries=32)
def _estimate(key: str, _model, _task, _prompt, epochs: int) -> float:
    return estimate_tune_seconds(_model, _task, _prompt, TuneConfig(epochs=epochs))


def _tune(job: BackgroundJob, model, bank, task, methods, epochs, params, seeds: int, run_path: str | None = None,
          estimate: float | None = None):
    """The protocol on this target, in this process; the results go into the run folder (``tuning.json``), with the
    estimate made before it started and the time it took."""
    protocol = Protocol(methods, list(range(seeds)), tune={"epochs": epochs}, ensemble=dict(params))

    def reporter(phase: str):
        return lambda done, total, key: job.report({"stage": "job", "phase": phase, "done": done, "total": total,
                                                    "key": key})

    ctx = Context(model, bank, {task.name: task}, callback=job.report, should_stop=job.stop)
    t0 = time.perf_counter()
    result = evaluate(protocol, [task.name], context=ctx, progress_for=reporter)
    out = {"epochs": epochs, "seeds": seeds, "stopped": result.stopped, "results": result.rows(),
           "per_target": result.per_target, "estimate_seconds": estimate, "seconds": time.perf_counter() - t0}
    if run_path and os.path.isdir(run_path):  # the run folder holds the tuning results too
        atomic_write_json(os.path.join(run_path, "tuning.json"), out)
    return out


def _per_target(saved: dict) -> dict:
    """The saved results by target and seed (a file written before ``per_target`` was saved has only rows)."""
    if saved.get("per_target"):
        return saved["per_target"]
    runs: dict[int, dict] = {}
    for r in saved["results"]:
        runs.setdefault(r.get("seed", 0), {"seed": r.get("seed", 0), "methods": {}})["methods"][r["method"]] = r
    return {"target": list(runs.values())}


def _summary(saved: dict) -> list[dict]:
    """Per method: mean test accuracy over seeds and, against HGPrompt, the paired difference with its interval."""
    per_target = _per_target(saved)
    runs = [r for rs in per_target.values() for r in rs]
    methods = [m for m in METHODS if any(m in r["methods"] for r in runs)]
    paired = paired_summary(per_target, REFERENCE) if REFERENCE in methods and all(
        REFERENCE in r["methods"] for r in runs) else {}
    out = []
    for m in methods:
        accs = [r["methods"][m]["test_acc"] for r in runs if m in r["methods"]]
        row = {"method": m, "seeds": len(accs), ACC: round(100 * float(np.mean(accs)), 1)}
        if m in paired:
            p = paired[m]
            row.update({DIFF: f"{100 * p['mean_diff']:+.1f} pp",
                        "95 % interval": (f"[{100 * p['ci95'][0]:+.1f}, {100 * p['ci95'][1]:+.1f}] pp" if p["n"] > 1
                                          else "one seed"),
                        "wins/ties/losses": f"{p['wins']}/{p['ties']}/{p['losses']}"})
        elif paired:  # the reference itself, or a method without a pair: say so rather than leave empty cells
            what = "(the reference)" if m == REFERENCE else "(not on every seed)"
            row.update({DIFF: what, "95 % interval": "", "wins/ties/losses": ""})
        out.append(row)
    return out


def same_tunes(saved: dict) -> list[list[str]]:
    """Groups of two or more methods that tuned the same initial prompt on every seed (one tune, one result)."""
    runs = [r for rs in _per_target(saved).values() for r in rs]
    jobs: dict[str, tuple] = {}
    for m in METHODS:
        keys = tuple(r["methods"].get(m, {}).get("job") for r in runs)
        if runs and all(keys):
            jobs[m] = keys
    groups: dict[tuple, list[str]] = {}
    for m, keys in jobs.items():
        groups.setdefault(keys, []).append(m)
    return [g for g in groups.values() if len(g) > 1]


def view(res: RunResult, model, drawn: dict) -> None:
    st.caption(EXPLAIN)
    names = res.names
    # The methods on a row of their own: beside the other controls their chips were cut ("hgpromp").
    methods = st.multiselect("Methods", list(METHODS), default=SHOWN, key="tune_methods",
                             help="\n".join(f"- **{m.name}**: {m.help}" for m in METHODS.values()))
    c2, c3 = st.columns([3, 1])
    epochs = c2.slider("Tuning epochs (same for every method)", 1, 50, 10, key="tune_epochs")
    seeds = c3.number_input("Seeds", 1, 5, 1, key="tune_seeds", help="Each seed redraws the train/val split.")
    jkey, rkey = f"tune_job_{res.id}", f"tune_result_{res.id}"
    if rkey not in st.session_state and res.tuning:  # read back from the run folder after a reload
        st.session_state[rkey] = res.tuning
    usable = res.stack is not None
    est = None
    if usable and methods and jkey not in st.session_state:
        per = _estimate(f"{res.id}-{epochs}", model, res.task(), res.prompt, epochs)
        tunes = sum(len(names) if METHODS[m].all_singles else 1 for m in methods) * seeds
        fits = sum(m.startswith("hgprompt") for m in methods) * seeds
        est = per * tunes + fits * res.seconds
        st.info(f"Estimate: at most about {est / 60:.1f} min: {tunes} tunes of {epochs} epochs at about {per:.0f} s "
                f"each (timed just now on this target)"
                + (f", plus {fits} weight fit{'s' if fits != 1 else ''} of about {res.seconds:.0f} s" if fits else "")
                + "; methods with the same initial prompt share one tune.")
    if st.button("Tune and compare", key="tune_button", disabled=jkey in st.session_state or not usable or not methods):
        bank, task = res.bank, res.task()
        fits = sum(m.startswith("hgprompt") for m in methods)
        n = res.sample_size(model)
        meter = None
        if fits:
            work = weights_work(len(names), n, res.params, methods, images=0 if res.embedded(model) else n)
            meter = metered(model, res.stack[0], int(seeds) * work)
        st.session_state[jkey] = BackgroundJob("tune", lambda job: _tune(job, model, bank, task, methods, epochs,
                                                                         res.params, int(seeds), res.run_path,
                                                                         est), model=model, estimate=est,
                                               meter=meter).start()
    if jkey in st.session_state:
        job_view(jkey, rkey, progress)
    saved = st.session_state.get(rkey)
    if saved and saved.get("results"):
        rows = [{"seed": 0, **r} for r in saved["results"]]  # results saved before seeds existed carry none
        table = _summary(saved)
        drawn["accuracy"] = charts.accuracy_bars(rows, order=[r["method"] for r in table])  # the table's order
        chart(st, drawn["accuracy"], key="acc_chart")
        st.dataframe(table, hide_index=True)
        for group in same_tunes(saved):
            note = (f"{' and '.join(group)} started from the same initial prompt on every seed, so they are one tune "
                    "and their accuracies are equal by construction.")
            if any(m.startswith("hgprompt")
                   for m in group) and any(m in ("best_hscore", "oracle", "oracle_test") for m in group):
                note += " HGPrompt's weights picked one source here: the ensemble was a selection."
            st.info(note)
        if saved.get("seconds") is not None:
            took = f"Took {saved['seconds'] / 60:.1f} min"
            if saved.get("estimate_seconds"):
                took += (f" against an estimate of {saved['estimate_seconds'] / 60:.1f} min (the estimate counts every "
                         "tune; methods that share an initial prompt share one, so it can take less)")
            st.caption(took + ".")
        if saved.get("stopped"):
            st.caption("Stopped early: the methods whose tunes finished are shown.")
