"""Objective vs accuracy: can the objective be trusted on this target? For the prompts the run has measured (every
source alone, and the grid points of a task-vector plane computed with its probe), the objective against the probe
accuracy, with Kendall's tau; and against the tuned accuracy where the Tuning tab has tuned a source."""
from __future__ import annotations

import numpy as np
import streamlit as st

from core import TuneConfig, tune_prompt
from core.metrics.stats import kendall
from core.model.cost import probe_work
from dashboard import charts
from dashboard.run_result import RunResult
from dashboard.ui import chart, on_demand

EXPLAIN = ("An objective is a prediction of an accuracy. Each point is a prompt: its objective on the target sample "
           "(x) against the accuracy it gives (y). The probe accuracy is a linear head fitted on the frozen features "
           "of the train split and scored on the test split; the tuned accuracy, where the Tuning tab has run, is the "
           "prompt after the tuning recipe. Kendall's tau near 1: the objective orders the prompts as the accuracy "
           "does; near 0: it tells them apart no better than chance.")


def _source_probes(res: RunResult, model) -> dict:
    """Each source's objective (from the run) and probe accuracy (logistic regression on the train features, tested)."""
    task = res.task()
    accs = [tune_prompt(model, task, res.stack[i], TuneConfig(epochs=0, seed=res.params["seed"]),
                        train_accuracy=False).test_acc for i in range(len(res.names))]
    return {"objective": list(res.source_hscores), "accuracy": accs, "names": list(res.names)}


def _tuned(res: RunResult) -> dict | None:
    """The sources the Tuning tab tuned (single-source tunes), their objective and mean tuned accuracy over seeds."""
    saved = st.session_state.get(f"tune_result_{res.id}") or res.tuning
    if not saved or not saved.get("per_target"):
        return None
    by: dict[str, list[float]] = {}
    for runs in saved["per_target"].values():
        for r in runs:
            for m, v in r["methods"].items():
                if m.startswith("single:"):
                    by.setdefault(m.split(":", 1)[1], []).append(v["test_acc"])
    names = [n for n in res.names if n in by]
    if len(names) < 3:
        return None
    h = dict(zip(res.names, res.source_hscores, strict=False))
    return {"objective": [h[n] for n in names], "accuracy": [float(np.mean(by[n])) for n in names], "names": names}


def view(res: RunResult, model) -> None:
    st.caption(EXPLAIN)
    if res.stack is None:
        st.info("The run's source prompts are not all available in this session any more.")
        return
    objective = res.params.get("objective", "hscore")
    if objective != "hscore":
        st.caption(f"The sources' objective is the run's own measure, {objective}.")
    key = f"source_probes_{res.id}"
    srcs = on_demand("probes", "Measure each source's probe accuracy", "obj_acc_button", f"{key}_job", key,
                     lambda job: _source_probes(res, model), "fitting a probe under every source ...",
                     "One probe fit per source: the features of every split under it, and a logistic regression.",
                     model=model, prompt=res.stack[0], work=probe_work(len(res.names), res.task().sizes(),
                                                                        embedded=res.embedded(model)))
    groups, lines = [], []
    if srcs is not None:
        groups.append({**srcs, "label": "sources (probe)"})
        lines.append(f"sources against the probe: **{kendall(srcs['objective'], srcs['accuracy']):+.2f}** "
                     f"({len(srcs['names'])} prompts)")
    for m in st.session_state.get(f"measured_{res.id}", {}).values():  # the planes computed with their probe
        groups.append({"objective": m["objective"], "accuracy": m["probe_acc"], "label": m["label"] + " (probe)"})
        lines.append(f"{m['label']} against the probe: **{kendall(m['objective'], m['probe_acc']):+.2f}** "
                     f"({len(m['objective'])} prompts)")
    tuned = _tuned(res)
    if tuned is not None:
        groups.append({**tuned, "label": "sources (tuned)"})
        lines.append(f"sources against their tuned accuracy: **{kendall(tuned['objective'], tuned['accuracy']):+.2f}** "
                     f"({len(tuned['names'])} prompts)")
    if not groups:
        st.info("Measure the sources' probe accuracy above, or compute a task-vector plane with its probe (the plane "
                "view), to see how the objective lines up with accuracy here.")
        return
    chart(st, charts.objective_vs_accuracy(groups, objective), key="obj_acc_chart")
    st.write("Kendall's tau, " + "; ".join(lines) + ".")
