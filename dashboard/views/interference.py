"""The interference lab: the measured mixing loss of every pair beside raw and centred cosines with their
random-prompt null, then the pair view and the simplex view."""
from __future__ import annotations

import numpy as np
import streamlit as st

from dashboard import charts
from dashboard.run_result import RunResult
from dashboard.state import BackgroundJob
from dashboard.ui import chart, on_demand
from dashboard.views import pair, simplex

EXPLAIN = ("For every pair of sources: the H-score at the midpoint of their prompts minus the mean of their own "
           "H-scores (I < 0: mixing the pair loses transferability), next to the gradient cosines, raw and with the "
           "shared direction removed (centred), each with the range the same cosines take for random prompts. "
           "Where a cosine and I disagree, trust I: it is measured, the cosine only predicts it.")


VIEWS = {"matrices": "every pair", "pair": "two sources", "simplex": "three sources"}


def measure(job: BackgroundJob, res: RunResult, model):
    from core.analysis.interference import interference

    return interference(model, res.stack, res.task(), n_samples=res.params["n_samples"], points=5,
                        seed=res.params["seed"], names=res.names)


def view(res: RunResult, model) -> None:
    st.subheader("Measured interference")
    st.caption(EXPLAIN)
    if res.stack is None:
        st.info("The run's source prompts are not all available in this session any more (an uploaded prompt is "
                "missing), so its interference cannot be measured. Run it again with the prompts you have.")
        return
    r = on_demand("interference", "Measure interference", "inter_button", f"inter_job_{res.id}",
                  f"inter_result_{res.id}", lambda job: measure(job, res, model),
                  "measuring: gradient pass and pair midpoints ...",
                  "One gradient pass over the sources and as many random prompts, and one forward of every pair's "
                  "points (30-45 s on 2 CPU cores).")
    if r is None:
        return
    shown = st.radio("View", list(VIEWS), format_func=VIEWS.get, key="inter_view", horizontal=True,
                     help="One at a time, so switching redraws one view, not all of them.")
    if shown == "pair":
        pair.view(res, r, model)
    elif shown == "simplex":
        simplex.view(res, model)
    else:
        _matrices(r)


def _matrices(r) -> None:
    """The mixing loss beside the raw and centred cosines with their random-prompt null, and how well each ranks it."""
    names = r.names
    c1, c0 = st.columns(2)  # two per row: three heatmaps side by side are unreadable at 1280 px
    chart(c1, charts.conflict_heatmap(r.mixing_loss, names, "Measured mixing loss I (H-score units)", zrange=None),
          key="inter_mix")
    c2, c3 = st.columns(2)
    for col, v in ((c2, "raw"), (c3, "centred")):
        lo, hi = r.null_band[v]
        chart(col, charts.conflict_heatmap(r.cosine[v], names, f"{v.capitalize()} cosine (random prompts: {lo:+.2f} to {hi:+.2f})"),
              key=f"inter_{v}")
    rho = r.spearman()
    iu = np.triu_indices(len(names), 1)
    c0.write(f"Pairs whose midpoint loses H-score: {int((r.mixing_loss[iu] < 0).sum())} of {len(iu[0])}. "
             f"Pairs whose centred cosine is below every random pair's: {int(r.below_null('centred')[iu].sum())}. "
             "How well each reading ranks the measured loss (Spearman): "
             + ", ".join(f"{k} {v:+.2f}" for k, v in rho.items()) + f". ({r.n_samples} samples, {r.seconds:.0f} s)")
    if r.layer_cosine is not None:
        layer = st.select_slider("Layer (deep prompts)", list(range(len(r.layer_cosine["centred"]))), key="inter_layer")
        lo, hi = r.layer_null_band["centred"][layer]
        chart(st, charts.conflict_heatmap(r.layer_cosine["centred"][layer], names,
                                          f"Centred cosine, layer {layer} (random prompts: {lo:+.2f} to {hi:+.2f})"),
              key="inter_layer_chart")
