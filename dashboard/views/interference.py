"""The interference lab: the measured mixing loss of every pair beside raw and centred cosines with their
random-prompt null, then the pair view and the simplex view."""
from __future__ import annotations

import os

import numpy as np
import streamlit as st

from core.analysis.interference import InterferenceResult, interference
from core.io.safe_io import atomic_write_json, load_json
from core.model.cost import interference_work
from dashboard import charts
from dashboard.run_result import RunResult
from dashboard.state import BackgroundJob
from dashboard.ui import chart, on_demand
from dashboard.views import objective_accuracy, pair, plane, simplex

EXPLAIN = ("For every pair of sources: the H-score at the midpoint of their prompts minus the mean of their own "
           "H-scores (I < 0: mixing the pair loses transferability), next to the gradient cosines, raw and with the "
           "shared direction removed (centred), each with the range the same cosines take for random prompts. "
           "Where a cosine and I disagree, trust I: it is measured, the cosine only predicts it.")


VIEWS = {"matrices": "every pair", "pair": "two sources", "simplex": "three sources",
         "plane": "task-vector plane", "accuracy": "objective vs accuracy"}


FILE = "interference.json"


def measure(job: BackgroundJob, res: RunResult, model):
    """The run's interference, measured on its own target sample, and kept in its run folder (a reload, the lesson
    and the Ensemble page then read it back instead of measuring again)."""
    r = interference(model, res.stack, res.task(), n_samples=res.params["n_samples"], points=POINTS,
                     seed=res.params["seed"], names=res.names, should_stop=job.stop)
    if os.path.isdir(res.run_path):
        atomic_write_json(os.path.join(res.run_path, FILE), r.to_dict())
    return r


POINTS = 5  # along each pair's segment, ends included


def work(res: RunResult, model) -> dict:
    """What measuring the run's interference runs, for :func:`dashboard.ui.on_demand` to price and follow."""
    if res.stack is None:
        return {}
    return {"model": model, "prompt": res.stack[0],
            "work": interference_work(len(res.names), res.sample_size(model), POINTS, embed=not res.embedded(model))}


def measured(res: RunResult, result_key: str):
    """The run's measured interference when this session has it, or when its run folder keeps it; else None."""
    if result_key not in st.session_state:
        path = os.path.join(res.run_path, FILE)
        if os.path.isfile(path):
            st.session_state[result_key] = InterferenceResult.from_dict(load_json(path, max_bytes=64 * 2**20))
    return st.session_state.get(result_key)


def view(res: RunResult, model, layer="all", drawn: dict | None = None) -> None:
    """The lab; every figure it draws is also put in ``drawn``, the run's figures the Export tab offers."""
    drawn = drawn if drawn is not None else {}
    st.subheader("Measured interference")
    st.caption(EXPLAIN)
    if res.stack is None:
        st.info("The run's source prompts are not all available in this session any more (an uploaded prompt is "
                "missing), so its interference cannot be measured. Run it again with the prompts you have.")
        return
    shown = st.radio("View", list(VIEWS), format_func=VIEWS.get, key="inter_view", horizontal=True,
                     help="One at a time, so switching redraws one view, not all of them.")
    if shown in ("pair", "plane") and len(res.names) < 2:
        st.info(f"This run has one source ({res.names[0]}): the {shown} view needs two. Run again with two sources or "
                "more.")
        return
    if shown == "simplex":
        return simplex.view(res, model, drawn)
    if shown == "plane":
        return plane.view(res, model, drawn)
    if shown == "accuracy":
        return objective_accuracy.view(res, model)
    measured(res, f"inter_result_{res.id}")
    r = on_demand("interference", "Measure interference", "inter_button", f"inter_job_{res.id}",
                  f"inter_result_{res.id}", lambda job: measure(job, res, model),
                  "measuring: gradient pass and pair midpoints ...",
                  "One gradient pass over the sources and as many random prompts, and one forward of every pair's "
                  "points.", **work(res, model))
    if r is None:
        return
    if shown == "pair":
        pair.view(res, r, model, drawn)
    else:
        _matrices(r, layer, drawn)


def below_sentence(r, layer="all") -> str:
    """How many pairs lose H-score when mixed, and how many centred cosines lie below the random-prompt band: of the
    layer shown (the band and cosines of that block), or of all the prompt tokens."""
    iu = np.triu_indices(len(r.names), 1)
    if layer == "all" or r.layer_cosine is None:
        below, where = int(r.below_null("centred")[iu].sum()), ""
    else:
        lo, hi = r.layer_null_band["centred"][layer]
        below, where = int((np.asarray(r.layer_cosine["centred"][layer])[iu] < lo).sum()), f" at layer {layer}"
    return (f"Pairs whose midpoint loses H-score: {int((r.mixing_loss[iu] < 0).sum())} of {len(iu[0])}. "
            f"Pairs whose centred cosine{where} is below every random pair's: {below}.")


def _matrices(r, layer="all", drawn: dict | None = None) -> None:
    """The mixing loss, then the raw and centred cosines coloured against their random-prompt null, one matrix per
    row at the page's width (side by side, a deep bank's seven names and values ran together at 1280 px), and how
    well each ranks the loss; for deep prompts, the cosines of the layer the tab's control picks."""
    names = r.names
    drawn = drawn if drawn is not None else {}
    rho = r.spearman()
    st.write(below_sentence(r, layer) + " How well each reading ranks the measured loss (Spearman): "
             + ", ".join(f"{k} {v:+.2f}" for k, v in rho.items()) + f". ({r.n_samples} samples, {r.seconds:.0f} s)")
    drawn["mixing_loss"] = charts.conflict_heatmap(r.mixing_loss, names, "Measured mixing loss I (H-score units)",
                                                   zrange=None, what="I")
    chart(st, drawn["mixing_loss"], key="inter_mix")
    where = "" if layer == "all" or r.layer_cosine is None else f", layer {layer}"
    st.caption("Colours of the two cosine matrices: red, a pair below the range of every pair of random prompts "
               "(outlined: it conflicts more than chance); white, inside that range (nothing to read); blue, above it.")
    for v in ("raw", "centred"):
        if where:
            cos, (lo, hi) = r.layer_cosine[v][layer], tuple(r.layer_null_band[v][layer])
        else:
            cos, (lo, hi) = r.cosine[v], r.null_band[v]
        drawn[f"cosine_{v}"] = charts.conflict_heatmap(cos, names, f"{v.capitalize()} cosine{where}<br><sup>random "
                                                       f"prompts: {lo:+.2f} to {hi:+.2f}; red: below that band</sup>",
                                                       band=(lo, hi))
        chart(st, drawn[f"cosine_{v}"], key=f"inter_{v}")
