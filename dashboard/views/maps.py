"""The Feature maps tab: the target's images placed by their features under each prompt, in 2-D."""
from __future__ import annotations

import time

import numpy as np
import streamlit as st

from dashboard import charts
from dashboard.state import digest, load_task
from dashboard.ui import chart

EXPLAIN = ("Each panel places the target images by their features under one prompt, squeezed to 2-D. Tight, separate "
           "colour clusters mean the prompt already separates the classes. The first map computes the features "
           "(seconds); PCA then takes a fraction of a second, UMAP seconds (the first UMAP also compiles numba, about "
           "25 s). UMAP shows neighbourhoods better. Select points with the box tool to see their images.")


# Cached by a digest of their inputs, with caps: 16 feature sets (at most 800 points x 33 prompts x D floats
# each) and 32 maps per process; the oldest entries are dropped first.
@st.cache_data(show_spinner="Computing the prompt-induced features ...", max_entries=16)
def features(key: str, _model, _task, _stack, _prompt, names: tuple, n: int, seed: int):
    from core.features import extract_features, source_features

    x, y = _task.tensors("train", _model.transform(), key=("model", _model.fingerprint))
    idx = _task.subsample("train", n, seed)
    xs = x[idx]
    feats = dict(zip(names, source_features(_model, xs, _stack)))
    feats["ensemble"] = extract_features(_model, xs, _prompt)
    return feats, y[idx].numpy(), idx


@st.cache_data(show_spinner=False, max_entries=32)  # the view says what is being computed, with the time
def embed(key: str, method: str, _feats: dict, seed: int) -> dict:
    from core.features import embed_2d

    return {name: embed_2d(f, method, seed=seed) for name, f in _feats.items()}


def image(task, index: int) -> np.ndarray:
    from core.data import _to_pil

    return np.asarray(_to_pil(task.splits["train"], int(index)))


_UMAP_COMPILED = [False]  # numba compiles UMAP once per server process


@st.fragment
def view(res: dict, model, drawn: dict) -> None:
    """A fragment: changing the method or the number of points redraws only this view."""
    st.caption(EXPLAIN)
    if res.get("stack") is None:
        st.info("The run's source prompts are not all available in this session any more, so their maps cannot be drawn.")
        return
    task = load_task(res["target_path"])
    c1, c2 = st.columns([1, 3])
    method = c1.radio("Method", ["pca", "umap"], format_func=str.upper, key="map_method", horizontal=True)
    n = c1.slider("Points", 50, 800, 300, 50, key="map_points")
    slot = c2.empty()  # the old map gives way at once to a message saying what is being computed
    fkey = digest(res["id"], n)
    mkey = digest(fkey, method)
    figs = st.session_state.setdefault("map_figures", {})
    if mkey not in figs:
        t0 = time.perf_counter()
        first_umap = method == "umap" and not _UMAP_COMPILED[0]
        slot.info(f"Computing {method.upper()} maps of {n} target images under {len(res['names']) + 1} prompts"
                  + (" (the first UMAP also compiles numba: about 25 s)" if first_umap else "") + " ...")
    feats, labels, idx = features(fkey, model, task, res["stack"], res["prompt"], tuple(res["names"]), n, res["params"]["seed"])
    if mkey not in figs:
        while len(figs) >= 4:  # a few drawn figures per session; the coordinates stay in the process cache
            figs.pop(next(iter(figs)))
        figs[mkey] = charts.feature_maps(embed(mkey, method, feats, res["params"]["seed"]), labels, task.classes, method)
        _UMAP_COMPILED[0] = _UMAP_COMPILED[0] or method == "umap"
        c1.caption(f"{method.upper()} maps computed in {time.perf_counter() - t0:.1f} s")
    drawn["maps"] = figs[mkey]
    event = chart(slot, drawn["maps"], key="map_chart", on_select="rerun", selection_mode=("points", "box", "lasso"))
    points = (event or {}).get("selection", {}).get("points", []) if isinstance(event, dict) else getattr(getattr(event, "selection", None), "points", [])
    if points:
        picked = [int(idx[int(p["customdata"])]) if "customdata" in p else None for p in points[:12]]
        picked = [p for p in picked if p is not None]
        c1.write(f"{len(points)} selected")
        cols = c1.columns(3)
        for k, i in enumerate(picked):
            cols[k % 3].image(image(task, i), caption=f"#{i} {task.classes[task.splits['train'].labels[i]]}", width=64)
