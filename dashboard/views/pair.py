"""The pair view: two sources, the H-score along the segment between their prompts and the slopes their
gradients predict."""
from __future__ import annotations

import numpy as np
import streamlit as st
import torch

from core.analysis.maps import maps_2d
from core.model.features import prompt_features
from dashboard import charts
from dashboard.run_result import RunResult
from dashboard.state import digest
from dashboard.ui import chart


def view(res: RunResult, r, model, drawn: dict | None = None) -> None:
    drawn = drawn if drawn is not None else {}
    names = r.names
    c1, c2 = st.columns([1, 3])
    iu = np.triu_indices(len(names), 1)
    worst = int(np.argmin(r.mixing_loss[iu]))
    a = c1.selectbox("First source", names, index=int(iu[0][worst]), key="pair_a")
    others = [n for n in names if n != a]
    suggested = names[int(iu[1][worst])]
    b = c1.selectbox("Second source", others, index=others.index(suggested) if suggested in others else 0, key="pair_b")
    i, j = names.index(a), names.index(b)
    s0, s1 = float(r.directional[i, j]), float(-r.directional[j, i])
    c1.caption("Dots: H-score measured along the segment from t = 0 to t = 1; dashed: the slope the gradient at each "
               f"end predicts, dH/dt = {_num(s0)} at t = 0 and {_num(s1)} at t = 1 (a positive slope rises towards t = "
               "1); dotted: no interference (the straight line between the ends). The pair opened first is the one "
               "whose mix loses most.")
    drawn["pair_segment"] = charts.segment_curve(r.t, r.segment[i, j], r.directional[i, j], -r.directional[j, i], a, b)
    chart(c2, drawn["pair_segment"], key="pair_chart")
    maps_at_ends(res, model, a, b, drawn)


@st.cache_data(show_spinner=False, max_entries=16)
def _segment_maps(key: str, _model, _res: RunResult, _a, _b, n: int, method: str):
    """Features of ``n`` target images under P_a, the midpoint and P_b, and their 2-D maps (one per point)."""
    tokens, labels, _ = _res.sample(_model, n)
    feats = prompt_features(_model, tokens, torch.stack([_a, 0.5 * (_a + _b), _b])).cpu()
    labels = labels.cpu().numpy()
    coords, shown = maps_2d(dict(zip(("t = 0", "midpoint", "t = 1"), feats, strict=False)), method, labels=labels,
                            seed=_res.params["seed"])
    return coords, labels, shown


def maps_at_ends(res: RunResult, model, a: str, b: str, drawn: dict | None = None) -> None:
    """The target's feature maps under the two prompts and their midpoint: what the mixing loss looks like."""
    c1, c2 = st.columns([1, 3])
    method = c1.radio("Map", ["lda", "pca"], format_func={"lda": "LDA (held out)", "pca": "PCA"}.get,
                      key="pair_map_method",
                      help="LDA: axes fitted on half of the points, the other half drawn (class separation that holds "
                           "on unseen images); PCA: the features' own main directions.")
    if not c1.toggle("Show the maps", key="pair_maps",
                     help="Features of 300 target images at three points (a few seconds)."):
        return
    names = res.names
    i, j = names.index(a), names.index(b)
    task = res.task()
    key = digest(res.id, a, b, method)
    with c2:
        with st.spinner(f"Computing the features at {a}, the midpoint and {b} ..."):
            coords, labels, shown = _segment_maps(key, model, res, res.stack[i], res.stack[j], 300, method)
        named = {f"{a} (t = 0)": coords["t = 0"], "midpoint": coords["midpoint"], f"{b} (t = 1)": coords["t = 1"]}
        fig = charts.feature_maps(named, labels[shown], task.classes, method, ids=shown, cols=3,
                                  subtitle="the target's features at both ends of the segment and halfway")
        if drawn is not None:
            drawn["pair_maps"] = fig
        chart(st, fig, key="pair_maps_chart")
    from sklearn.metrics import silhouette_score

    sep = {k: float(silhouette_score(v, labels[shown])) for k, v in named.items()}
    c1.caption("How apart the classes are on these maps (silhouette, -1 to 1; higher: more apart): "
               + ", ".join(f"{k} {v:+.2f}" for k, v in sep.items()) + ". "
               + ("The midpoint's classes overlap more than either end's."
                  if sep["midpoint"] < min(sep[f"{a} (t = 0)"], sep[f"{b} (t = 1)"]) else
                  "The midpoint is not the worst of the three here."))


def _num(x: float) -> str:
    """A slope as a person reads it: +0.174, +3.2e-05, or 0 (never -0.000)."""
    if abs(x) < 5e-7:
        return "0"
    return f"{x:+.3f}" if abs(x) >= 1e-3 else f"{x:+.1e}"
