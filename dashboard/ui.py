"""Small pieces every view uses: a chart in the session's style, and the live view of a background job."""
from __future__ import annotations

from typing import Callable

import streamlit as st

from dashboard import charts
from dashboard.state import BackgroundJob

BUSY = "Busy: another run is using the machine. Yours is queued and starts as soon as it finishes."


#: plotly's toolbar stands upright at the right edge, beside the chart, instead of over the end of its title (where it
#: hid the key number at 1280 px); no logo.
CONFIG = {"displaylogo": False}


def chart(where, fig, **kw):
    """``where.plotly_chart(fig, ...)``, in projector style (large text, high contrast) when the sidebar asks for it.
    The stored figure is left as it is: the style applies to a copy."""
    if st.session_state.get("projector"):
        fig = charts.projector(fig)
    if fig.layout.modebar.orientation != "v":
        fig.update_layout(modebar=dict(orientation="v"))  # in place: idempotent, and no copy of a large figure
    return where.plotly_chart(fig, config=CONFIG, **kw)


@st.fragment(run_every=2.0)
def job_view(job_key: str, result_key: str, progress: Callable[[BackgroundJob], tuple[float, str]],
             live: Callable[[BackgroundJob], None] | None = None) -> None:
    """A background job's status, refreshed every two seconds: queued, progress with a Stop button, then its result.

    Every refresh runs in the server process that also runs the job: at one per second the default run on
    2 cores took 27-30 s instead of 22-24 s, so the view refreshes every two seconds (about 3 steps).

    When the job ends its result goes to ``st.session_state[result_key]`` (an error is shown instead) and
    the whole page reruns to draw it.
    """
    job: BackgroundJob | None = st.session_state.get(job_key)
    if job is None:
        return
    if job.status == "queued":
        pos = job.queue_position
        st.info(BUSY + (f" Place in the queue: {pos}; about {15 * pos} s to wait (a default run takes about 15 s)."
                        if pos else ""))
    elif job.status == "running":
        fraction, label = progress(job)
        st.progress(min(1.0, max(0.0, fraction)), text=label)
        if st.button("Stop", key=f"stop-{job.id}", help="Stops after the current step and keeps what was computed."):
            job.stop.set()
    if live is not None:
        live(job)
    if job.finished:
        if job.status == "failed":
            st.error(job.error)
        else:
            st.session_state[result_key] = job.result
        del st.session_state[job_key]
        st.rerun()


def on_demand(kind: str, label: str, button_key: str, job_key: str, result_key: str, target: Callable[[BackgroundJob], object],
              running: str, help: str):
    """A computation the user asks for with a button, run as a background job; its result once there (else None).

    The result is kept in the session under ``result_key``, so the button goes once it has been computed."""
    if result_key not in st.session_state and st.button(label, key=button_key, disabled=job_key in st.session_state, help=help):
        st.session_state[job_key] = BackgroundJob(kind, target).start()
    if job_key in st.session_state:
        job_view(job_key, result_key, lambda job: (0.5, running))
    return st.session_state.get(result_key)
