"""A running fit, live: its progress line and the weights and objective at the latest step."""
from __future__ import annotations

import streamlit as st

from dashboard.progress import duration
from dashboard.state import BackgroundJob


def progress(job: BackgroundJob) -> tuple[float, str]:
    """The fit's stage in words, and a fraction that moves with every block of every pass (the job's meter), with
    the time left at the pace the fit keeps. The steps are counted at most: a fit that converges ends sooner."""
    stages = {p.get("stage") for p in job.progress}
    steps = [p for p in job.progress if p.get("stage") == "step"]
    total = next((p["steps"] for p in job.progress if "steps" in p), None)
    shared = "" if job.heavy else " (an identical run another session started: yours is a copy of it)"
    if steps:
        what = f"step {steps[-1]['step']} of at most {total} (it ends sooner once converged)"
    elif "conflicts" in stages:
        full_sum = st.session_state.get("mixing_running") == "task_arithmetic"
        what = "scoring the candidates: the uniform point" + (" and the full sum" if full_sum else "")
    elif "sources" in stages:  # (the source pass's forward has scored each source alone: its backward runs)
        what = "computing the sources' gradients (the backward of one batched pass)"
    else:
        what = "embedding the target sample, then the sources' gradient pass (its forward scores each source alone)"
    meter = job.meter
    if meter is None:  # (a run without a meter: the stages only)
        fraction = len(steps) / ((total or 1) + 1) if steps else (0.05 if "sources" in stages else 0.0)
        return fraction, what + " ..." + shared
    return meter.fraction(), f"{what}: about {duration(meter.seconds_left())} left at most" + shared


def view(job: BackgroundJob) -> None:
    # Native elements, not plotly: redrawing two plotly charts every second cost headless Chromium about a CPU
    # core, which on a 2-core machine serving its own browser slowed the run itself by a third.
    steps = [p for p in job.progress if p.get("stage") == "step"]
    first = [p for p in job.progress if p.get("stage") == "sources"]
    if not steps:
        if first:
            _best_source(first[-1])
        return
    last, lam = steps[-1], st.session_state.get("lam_running", 0.0)
    mixing = st.session_state.get("mixing_running", "average")
    c1, c2 = st.columns([3, 2])
    with c1:
        if mixing == "average":
            st.markdown("**Ensemble weights** (live; ▲ above uniform)")
        else:  # a box: 1 keeps a source's whole task vector; layer-wise weights shown as their mean over the blocks
            st.markdown("**Ensemble weights** (live; " + ("mean over the blocks; " if mixing == "layerwise" else "")
                        + "1 = a source's whole change)")
        uniform = 1 / len(last["names"])
        for name, w in zip(last["names"], per_source(last["weights"]), strict=False):
            mark = "  ▲" if mixing == "average" and w > uniform else ""
            st.progress(max(0.0, min(1.0, w)), text=f"{name}: {w:.3f}" + mark)
    with c2:
        st.metric("objective J = H - lambda R", f"{last['objective']:.4f}",
                  delta=f"{last['objective'] - steps[0]['objective']:+.4f} since step 0")
        st.metric("H-score", f"{last['hscore']:.4f}")
        st.metric("regulariser R", f"{last['regularizer']:.4f}", help=f"lambda = {lam}")


def per_source(weights) -> list[float]:
    """One number per source: the weight, or a layer-wise run's mean weight over the blocks."""
    return [float(sum(w) / len(w)) if isinstance(w, (list, tuple)) else float(w) for w in weights]


def _best_source(info: dict) -> None:
    """Before the first step: the weights of the best point evaluated so far (the best single source) and every
    source's H-score, from the forward pass the fit reports first."""
    best = max(range(len(info["names"])), key=lambda i: info["source_hscores"][i])
    c1, c2 = st.columns([3, 2])
    with c1:
        st.markdown("**Ensemble weights** (live: the best point so far is a single source; the gradient pass decides "
                    "whether a mixture does better)")
        for name, w, h in zip(info["names"], per_source(info["weights"]), info["source_hscores"], strict=False):
            st.progress(max(0.0, min(1.0, w)), text=f"{name}: {w:.3f}  (alone: H = {h:.3f})")
    with c2:
        st.metric("best single source", info["names"][best])
        st.metric("its H-score", f"{info['hscore']:.4f}")
