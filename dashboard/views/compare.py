"""Compare past runs of this session side by side."""
from __future__ import annotations

import streamlit as st

from core import UserInputError
from core.runs import list_runs, load_run
from dashboard import charts
from dashboard.state import runs_dir


def page() -> None:
    st.title("Compare runs")
    st.caption("Every ensemble run of this browser session is saved as a run folder (config, environment, weights, "
               "history, the ensembled prompt). Pick two or more to put their weights and objectives side by side. "
               "Other users' runs are not listed: each session has its own folder.")
    runs = [r for r in list_runs(runs_dir()) if r["command"] == "learn"]
    if not runs:
        st.info("No runs yet: run the ensemble learning on the first page.")
        return
    table = [{"run": r["id"], "target": r["config"].get("target"), "sources": len(r["config"].get("sources", [])),
              "regulariser": r["config"].get("regularizer"), "lambda": r["config"].get("lam"),
              "H variant": r["config"].get("h_variant"), "steps": r["config"].get("steps"),
              "samples": r["config"].get("n_samples"), "seed": r["config"].get("seed")} for r in runs]
    st.dataframe(table, hide_index=True)
    ids = [r["id"] for r in runs]
    chosen = st.multiselect("Runs to compare", ids, default=ids[:2], key="compare_runs")
    if len(chosen) < 2:
        st.info("Pick at least two runs.")
        return
    by_id = {r["id"]: r for r in runs}
    cols = st.columns(len(chosen))
    for col, rid in zip(cols, chosen):
        try:
            run = load_run(by_id[rid]["path"])
        except UserInputError as exc:
            col.error(str(exc))
            continue
        w = run["weights"]
        cfg = run["config"]
        col.subheader(rid)
        col.caption(f"target {cfg.get('target')}, {cfg.get('regularizer')} lambda={cfg.get('lam')}, "
                    f"{cfg.get('h_variant')}, seed {cfg.get('seed')}")
        col.plotly_chart(charts.weights_bar(w["names"], w["weights"]), key=f"cw-{rid}")
        col.plotly_chart(charts.objective_curves(run["history"], cfg.get("lam", 0.0)), key=f"co-{rid}")
        col.metric("ensemble H-score", f"{w['ensemble_hscore']:.3f}")
