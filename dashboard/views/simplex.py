"""The simplex view: the H-score over every mixture of three chosen sources, with the run's path on it."""
from __future__ import annotations

import time

import numpy as np
import streamlit as st

from core.analysis.interference import simplex_hscores
from core.model.cost import scoring_work
from dashboard import charts
from dashboard.run_result import RunResult
from dashboard.ui import chart, on_demand

RESOLUTION = 10
MIXTURES = (RESOLUTION + 1) * (RESOLUTION + 2) // 2  # the grid's points on a triangle


def off_simplex(mixing: str) -> str:
    """Why a run of another rule than the paper's average has no path on the simplex, naming its rule."""
    if mixing == "layerwise":
        return ("This run used the layer-wise rule (one weight per source and block, each in [0, 1], not summing to "
                "1): its weights are not a point of this triangle, so its path is not drawn here.")
    return (f"This run used {mixing.replace('_', ' ')}, whose weights are not on the simplex: its path is not drawn "
            "here (the task-vector plane view draws it).")


def _compute(res: RunResult, model, idx: list[int]) -> dict:
    t0 = time.perf_counter()
    w, h = simplex_hscores(model, res.stack[idx], res.task(), resolution=RESOLUTION, n_samples=res.params["n_samples"],
                           seed=res.params["seed"])
    return {"weights": w, "hscores": h, "seconds": time.perf_counter() - t0}


def view(res: RunResult, model, drawn: dict | None = None) -> None:
    names = res.names
    if len(names) < 3:
        return
    st.subheader("Simplex view")
    default = [names[i] for i in np.argsort(res.source_hscores)[::-1][:3]]
    chosen = st.multiselect("Three sources", names, default=default, max_selections=3, key="simplex_sources")
    if len(chosen) != 3:
        st.info("Pick three sources.")
        return
    idx = [names.index(n) for n in chosen]
    out = on_demand("simplex", "Compute the simplex", "simplex_button", f"simplex_job_{res.id}",
                    f"simplex_{res.id}_{'|'.join(chosen)}", lambda job: _compute(res, model, idx),
                    f"computing the H-score at {MIXTURES} mixtures ...", f"{MIXTURES} mixtures in batched forwards.",
                    model=model, prompt=res.stack[0],
                    work=scoring_work(MIXTURES, res.sample_size(model), embed=not res.embedded(model)))
    if out is None:
        return
    mixing = res.params.get("mixing", "average")
    if mixing != "average":
        st.caption(off_simplex(mixing))
        path, outside = None, 0.0
    else:
        hist = np.array([np.asarray(h["weights"], dtype=float) for h in res.history if not h.get("kept")])[:, idx]
        outside = float(1 - hist.sum(1).min()) if len(hist) else 0.0
        path = hist / np.clip(hist.sum(1, keepdims=True), 1e-12, None) if outside < 0.05 else None
    fig = charts.simplex_map(out["weights"], out["hscores"], chosen, path)
    if drawn is not None:
        drawn["simplex"] = fig
    chart(st, fig, key="simplex_chart")
    steps = res.record.n_steps
    if path is not None and steps == 0:
        note = (f"The run took no step (it started at {res.start} and no direction raised the objective), so its path "
                "is the one red point there.")
    elif path is not None:
        note = f"The red path is the run's weights on these three sources over its {steps} step(s)."
    elif mixing == "average":
        note = f"The run's path is not drawn: up to {outside:.0%} of its weight sat on other sources."
    else:
        note = ""
    st.caption(f"Computed in {out['seconds']:.1f} s, kept for this run. " + note)
