"""The Feature maps tab: the target's images placed by their features under each prompt, in 2-D."""
from __future__ import annotations

import time

import numpy as np
import streamlit as st
import torch

from core.analysis.maps import maps_2d
from core.model.features import prompt_features
from dashboard import charts
from dashboard.run_result import RunResult
from dashboard.state import digest
from dashboard.ui import chart

EXPLAIN = ("Each panel places the target images by their features under one prompt, squeezed to 2-D. Tight, separate "
           "colour clusters mean the prompt separates the classes. **PCA** and **UMAP** show the features' own shape; "
           "**LDA** turns the map towards the classes: its axes are fitted on half of the points and only the other "
           "half is drawn, so a separation you see holds for images the map never saw. **One map for all** fits the "
           "map once, on the ensemble's features, and puts every prompt through it: positions then compare across "
           "panels. Select points (box or lasso) in any panel: the same images light up in every panel and are shown "
           "below.")
METHODS = {"pca": "PCA", "umap": "UMAP", "lda": "LDA (held out)"}
SHOWN = 12  # images shown for a selection


# Cached by a digest of their inputs, with caps: 16 feature sets (at most 800 points x 33 prompts x D floats
# each) and 32 maps per process; the oldest entries are dropped first.
@st.cache_data(show_spinner="Computing the prompt-induced features ...", max_entries=16)
def features(key: str, _model, _res: RunResult, n: int):
    """Features of ``n`` target images (class-stratified, the run's seed) under every source and the ensemble."""
    tokens, labels, idx = _res.sample(_model, n)
    feats = prompt_features(_model, tokens, torch.cat([_res.stack, _res.prompt[None]])).cpu()
    named = dict(zip(_res.names, feats[:-1], strict=True))
    named["ensemble"] = feats[-1]
    return named, labels.cpu().numpy(), idx


@st.cache_data(show_spinner=False, max_entries=32)  # the view says what is being computed, with the time
def embed(key: str, method: str, _feats: dict, _labels, shared: bool, seed: int):
    return maps_2d(_feats, method, labels=_labels, fit_on="ensemble" if shared else None, seed=seed)


def image(task, index: int) -> np.ndarray:
    return np.asarray(task.image("train", index))


_UMAP_COMPILED = [False]  # numba compiles UMAP once per server process


def _selection(event) -> list[int]:
    sel = getattr(event, "selection", None) if not isinstance(event, dict) else event.get("selection")
    points = (sel or {}).get("points", []) if isinstance(sel, dict) else getattr(sel, "points", []) or []
    return sorted({int(p["customdata"]) for p in points if "customdata" in p})


@st.fragment
def view(res: RunResult, model, drawn: dict) -> None:
    """A fragment: changing the method, the layout, the points or the selection redraws only this view."""
    st.caption(EXPLAIN)
    if res.stack is None:
        st.info("The run's source prompts are not all available in this session any more, so their maps cannot be "
                "drawn.")
        return
    task = res.task()
    c1, c2, c3 = st.columns([2, 2, 2])
    method = c1.radio("Map", list(METHODS), format_func=METHODS.get, key="map_method", horizontal=True)
    shared = c2.radio("Fitted", ["each prompt", "once, on the ensemble"], key="map_layout", horizontal=True,
                      help="Once: one map fitted on the ensemble's features, every prompt put through it (shared "
                      "axes).") != "each prompt"
    n = c3.slider("Points", 50, 800, 300, 50, key="map_points")
    slot, status = st.empty(), st.empty()  # the old map gives way at once to a message saying what is being computed
    seed = res.params["seed"]
    fkey = digest(res.id, n)
    mkey = digest(fkey, method, shared)
    maps = st.session_state.setdefault("map_coords", {})
    t0 = time.perf_counter()
    if mkey not in maps:
        first_umap = method == "umap" and not _UMAP_COMPILED[0]
        slot.info(f"Computing {METHODS[method]} maps of {n} target images under {len(res.names) + 1} prompts"
                  + (" (the first UMAP also compiles numba: about 25 s)" if first_umap else "") + " ...")
    feats, labels, idx = features(fkey, model, res, n)
    if mkey not in maps:
        while len(maps) >= 4:  # a few per session; the process cache keeps more
            maps.pop(next(iter(maps)))
        maps[mkey] = embed(mkey, method, feats, labels, shared, seed)
        _UMAP_COMPILED[0] = _UMAP_COMPILED[0] or method == "umap"
        status.caption(f"{METHODS[method]} maps computed in {time.perf_counter() - t0:.1f} s")
    coords, shown = maps[mkey]
    picked = st.session_state.get("map_selected", {}).get(fkey)
    sub = ("one map fitted on the ensemble's features" if shared else "each map fitted on its own prompt's features")
    if method == "lda":
        sub += f"; {len(shown)} held-out points of {n}"
    figs = st.session_state.setdefault("map_figures", {})  # building the figure costs more than drawing it
    fig_key = (mkey, tuple(picked or ()))
    if fig_key not in figs:
        while len(figs) >= 4:
            figs.pop(next(iter(figs)))
        figs[fig_key] = charts.feature_maps(coords, labels[shown], task.classes, method, ids=shown, selected=picked,
                                            subtitle=sub)
    drawn["maps"] = figs.get((mkey, ())) if (mkey, ()) in figs else figs[fig_key]  # exported without the selection
    if picked and (mkey, ()) not in figs:
        drawn["maps"] = charts.feature_maps(coords, labels[shown], task.classes, method, ids=shown, subtitle=sub)
    event = chart(slot, figs[fig_key], key="map_chart", on_select="rerun", selection_mode=("points", "box", "lasso"))
    new = _selection(event)
    if new and new != picked:  # a new selection (an empty event, e.g. after a redraw, keeps the old one)
        st.session_state.setdefault("map_selected", {})[fkey] = picked = new
        st.rerun(scope="fragment")
    if picked:
        _gallery(task, idx, picked, fkey)


def _gallery(task, idx, picked: list[int], fkey: str) -> None:
    c1, c2 = st.columns([5, 1])
    c1.write(f"**{min(SHOWN, len(picked))} of {len(picked)} selected images shown**, lit up in every panel above.")
    if c2.button("Clear selection", key="map_clear"):
        st.session_state["map_selected"].pop(fkey, None)
        st.rerun(scope="fragment")
    cols = st.columns(SHOWN)
    labels = task.splits["train"].labels
    for k, p in enumerate(picked[:SHOWN]):
        i = int(idx[p])
        cols[k].image(image(task, i), caption=f"#{i} {task.classes[labels[i]]}", width=72)
