"""Compare past runs of this session side by side."""
from __future__ import annotations

import os
import time

import numpy as np
import streamlit as st

from core import UserInputError
from core.io.runs import list_runs
from core.method.record import EnsembleRecord
from dashboard import charts
from dashboard.state import runs_dir
from dashboard.ui import chart


def page() -> None:
    st.title("Compare runs")
    st.caption("Every ensemble run of this browser session is saved as a run folder (config, environment, weights, "
               "history, the ensembled prompt) and listed here from disk, so a reload keeps them (the session is in "
               "the page's URL). Pick two or more to put their weights and objectives side by side.")
    everyone = st.checkbox("Every run on this server", key="all_runs",
                           help="Also the runs of other sessions (other browsers, or before the page's URL changed).")
    roots = [runs_dir()]
    if everyone:
        base = os.path.dirname(os.path.dirname(runs_dir()))
        roots = [os.path.join(base, d, "runs") for d in sorted(os.listdir(base))
                 if os.path.isdir(os.path.join(base, d, "runs"))]
    runs = sorted((r for root in roots for r in list_runs(root) if r["command"] == "learn"),
                  key=lambda r: r.get("started") or 0, reverse=True)
    if not runs:
        st.info("No runs yet: run the ensemble learning on the first page.")
        return
    loaded: dict[str, EnsembleRecord] = {}
    for r in runs:
        try:
            loaded[r["id"]] = EnsembleRecord.read(r["path"], prompt=False)
        except (UserInputError, KeyError, OSError):
            continue
    runs = [r for r in runs if r["id"] in loaded]
    table = []
    for r in runs:
        cfg, rec = r["config"], loaded[r["id"]]
        table.append({"run": _label(r), "target": cfg.get("target"), "sources": len(rec.names),
                      "mixing rule": rec.params.get("mixing", "average"),
                      "objective": rec.params.get("objective", "hscore"),
                      "regulariser": rec.params.get("regularizer"), "lambda": rec.params.get("lam"),
                      "H variant": rec.params.get("h_variant"), "steps taken": rec.n_steps,
                      "step cap": rec.params.get("steps"), "stopped": rec.stopped, "converged": rec.converged,
                      "started from": rec.start, "J": rec.objective, "samples": rec.n_target_samples,
                      "seed": rec.params.get("seed"), "id": r["id"]})
    st.dataframe(table, hide_index=True)
    labels = {r["id"]: _label(r) for r in runs}
    ids = [r["id"] for r in runs]
    chosen = st.multiselect("Runs to compare", ids, default=ids[:2], key="compare_runs", format_func=labels.get)
    if len(chosen) < 2:
        st.info("Pick at least two runs.")
        return
    _overlays({labels[rid]: loaded[rid] for rid in chosen})
    # One objective axis for every column, so the runs' curves compare by eye.
    js = [h[k] for rid in chosen for h in loaded[rid].history for k in ("objective", "hscore")]
    pad = max(1e-3, 0.05 * (max(js) - min(js)))
    cols = st.columns(len(chosen))
    configs = {r["id"]: r["config"] for r in runs}
    for col, rid in zip(cols, chosen, strict=True):
        rec, cfg = loaded[rid], configs[rid]
        col.markdown(f"**{cfg.get('target')}** · {rec.params.get('mixing', 'average')} · λ = {rec.params.get('lam')}")
        col.caption(f"target {cfg.get('target')}, {rec.params.get('regularizer')} lambda={rec.params.get('lam')}, "
                    f"{rec.params.get('h_variant')}, seed {rec.params.get('seed')}")
        chart(col, charts.weights_bar(rec.names, rec.weights, f"Weights ({rec.params.get('mixing', 'average')})",
                                      mixing=rec.params.get("mixing", "average")), key=f"cw-{rid}")
        fig = charts.objective_curves(rec.history, rec.params.get("lam", 0.0))
        fig.update_yaxes(range=[min(js) - pad, max(js) + pad], row=1, col=1)
        fig.update_layout(title=dict(text="Objective per step", font=dict(size=13)))  # the column names the run
        chart(col, fig, key=f"co-{rid}")
        col.metric("ensemble H-score", f"{rec.ensemble_hscore:.3f}")


def _overlays(chosen: dict[str, EnsembleRecord]) -> None:
    """The chosen runs on shared charts: weights and source H-scores per source, the objective per step, and the
    change in every pair's gradient cosine between two runs of the same sources."""
    st.subheader("Overlaid")
    per_source = lambda r: np.asarray(r.weights, dtype=float).reshape(len(r.names), -1).mean(1).tolist()
    weights = {k: dict(zip(r.names, per_source(r), strict=True)) for k, r in chosen.items()}
    hscores = {k: dict(zip(r.names, r.source_hscores, strict=False)) for k, r in chosen.items()}
    # One chart per row: at half width, a deep and a shallow run's long names and labels were cut.
    chart(st, charts.overlay_bars(weights, "Weights of every run", "weight"), key="overlay_weights")
    chart(st, charts.overlay_bars(hscores, "Source H-scores, per run", "H-score"), key="overlay_h")
    chart(st, charts.overlay_curves({k: r.history for k, r in chosen.items()}, "objective", "Objective J per step"),
          key="overlay_objective")
    runs = list(chosen.items())
    same = len(runs) == 2 and runs[0][1].names == runs[1][1].names
    if same and any(r.cosine is None for _, r in runs):
        st.info("One of the two runs was stopped before its gradient cosines were computed.")
    elif same:
        (a, ra), (b, rb) = runs
        diff = np.asarray(rb.cosine) - np.asarray(ra.cosine)
        if float(np.abs(diff).max()) < 1e-4:
            st.info(f"The two runs' gradient cosines are the same (largest change {float(np.abs(diff).max()):.1e}): "
                    "the same sources on the same target sample give the same gradients, whatever the settings of the "
                    "weights.")
        else:
            chart(st, charts.conflict_heatmap(diff, ra.names, "Cosine change, second run - first", zrange=None,
                                              what="change in cosine"), key="overlay_conflicts")
            st.caption(f"First: {a}. Second: {b}. Red (outlined): a pair whose cosine fell in the second run.")
    else:
        st.info("Pick exactly two runs of the same sources to see how their gradient cosines differ.")


def _label(run: dict) -> str:
    """A run as a person names it: its target, regulariser and lambda, and when it ran."""
    cfg = run["config"]
    when = time.strftime("%H:%M:%S", time.localtime(run["started"])) if run.get("started") else ""
    rule = {"average": "avg", "task_arithmetic": "TA", "layerwise": "layer-wise"}.get(cfg.get("mixing", "average"),
                                                                                      cfg.get("mixing"))
    return (f"{cfg.get('target')} · {rule} · {cfg.get('objective', 'hscore')} · {cfg.get('regularizer')} "
            f"λ={cfg.get('lam')} · seed {cfg.get('seed')}" + (f" · {when}" if when else "") + f" ({run['id'][-6:]})")
