"""A finished run: what it was, then one tab per view of it. Only the open tab runs."""
from __future__ import annotations

import streamlit as st

from core import HGPromptEnsemble
from core.options import options
from dashboard import charts
from dashboard.run_result import RunResult
from dashboard.views import conflicts, export, hscores, maps, objective, tuning, weights

TABS = ["Weights", "Objective", "H-scores", "Conflicts", "Feature maps", "Tuning", "Export"]


def _figures(res: RunResult) -> tuple[dict, dict]:
    """The shown run's figures, kept per session for that run only: the small ones built once, and a dict
    where the maps and accuracy bars go once drawn. The small ones come as a copy (a view may replace one)."""
    kept = st.session_state.get("run_figures")
    if kept is None or kept[0] != res.id:
        names = res.names
        small = {
            "weights": charts.weights_bar(names, res.weights, mixing=res.params.get("mixing", "average")),
            "trajectory": charts.weights_trajectory(res.history, names),
            "objective": charts.objective_curves(res.history, res.params.get("lam", 0.0)),
            "hscores": charts.hscore_bar(names, res.source_hscores, res.ensemble_hscore, res.n_classes),
        }
        if res.cosine is not None:  # (None: the fit was stopped during its gradient pass)
            small["conflicts"] = charts.conflict_heatmap(res.cosine, names)
        kept = st.session_state["run_figures"] = (res.id, small, {})
    return dict(kept[1]), kept[2]


def _header(res: RunResult) -> None:
    names = res.names
    began = ("started from uniform (your choice)" if res.params.get("start") == "uniform"
             else f"started from the best candidate ({res.start})")
    steps = res.record.n_steps
    head = (f"Run `{res.id}` on **{res.target}**: {len(names)} sources, {steps} step{'s' if steps != 1 else ''} "
            f"(at most {res.params.get('steps', steps)}) in {res.seconds:.1f} s, {began}")
    if res.converged:
        head += ", converged"
    if res.served_from:
        head += (f"; identical to run `{res.served_from}` on this server, so served from its result "
                 "(copied into your own run folder) instead of computed again")
    if res.restored:
        head += "; read back from its run folder (the page was reloaded)"
    if res.stopped and res.cosine is None:
        head += (" (stopped during the sources' gradient pass: the best single source by its H-score is kept, and the "
                 "cosines were not computed)")
    elif res.stopped:
        head += " (stopped early; the best point so far is kept)"
    st.success(head)
    shown = [k for k, opt in options(HGPromptEnsemble).items() if opt.spec.ui and k in res.params]
    st.caption("Ran with: " + ", ".join(f"{k} = {res.params[k]}" for k in shown))
    for msg in res.warnings:
        st.warning(msg)


def view(res: RunResult, model) -> None:
    _header(res)
    # Only the open tab runs (on_change="rerun"): the feature maps cost seconds and are drawn when asked for.
    tabs = dict(zip(TABS, st.tabs(TABS, key="result_tab", on_change="rerun"), strict=True))
    figs, drawn = _figures(res)
    show = {
        "Weights": lambda: weights.view(res, figs, model),
        "Objective": lambda: objective.view(res, figs),
        "H-scores": lambda: hscores.view(res, figs, model),
        "Conflicts": lambda: conflicts.view(res, figs, model, drawn),
        "Feature maps": lambda: maps.view(res, model, drawn),
        "Tuning": lambda: tuning.view(res, model, drawn),
        "Export": lambda: export.view(res, {**figs, **drawn}, st.session_state.get(f"tune_result_{res.id}")),
    }
    for name, tab in tabs.items():
        if tab.open:
            with tab:
                show[name]()
