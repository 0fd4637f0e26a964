"""Small pieces every view uses: a chart in the session's style, and the live view of a background job."""
from __future__ import annotations

from typing import Callable

import streamlit as st

from core.model.cost import Work
from dashboard import charts
from dashboard.progress import TIMING, Meter, duration, price
from dashboard.state import BackgroundJob

BUSY = "Busy: another run is using the machine. Yours is queued and starts as soon as it finishes."


#: plotly's toolbar stands upright at the right edge, beside the chart, instead of over the end of its title (where it
#: hid the key number at 1280 px), clear of the colour bars (``charts.BAR_ROOM``); no logo. A projector shows none: a
#: class does not zoom, and it covered colour-bar ticks at the projector's larger text.
CONFIG = {"displaylogo": False}
PROJECTOR_CONFIG = {**CONFIG, "displayModeBar": False}

#: The page's own text at a projector's size: body text, captions, widget labels, tables (the charts are restyled by
#: ``charts.projector``).
PROJECTOR_CSS = """<style>
[data-testid="stMain"] [data-testid="stMarkdownContainer"] p,
[data-testid="stMain"] [data-testid="stMarkdownContainer"] li
  { font-size: 1.3rem; line-height: 1.5; }
[data-testid="stMain"] [data-testid="stCaptionContainer"] { font-size: 1.1rem; }
[data-testid="stMain"] [data-testid="stWidgetLabel"] p { font-size: 1.15rem; }
[data-testid="stMain"] [data-testid="stMetricValue"] { font-size: 2.4rem; }
[data-testid="stMain"] h1 { font-size: 2.8rem; } [data-testid="stMain"] h2 { font-size: 2.2rem; }
</style>"""


def projector_style() -> None:
    """Enlarge the page's body text when the sidebar's Projector mode is on (called once per page run)."""
    if st.session_state.get("projector"):
        st.html(PROJECTOR_CSS)


def chart(where, fig, **kw):
    """``where.plotly_chart(fig, ...)``, in projector style (large text, high contrast, no toolbar) when the sidebar
    asks for it. The stored figure is left as it is: the style applies to a copy."""
    projector = bool(st.session_state.get("projector"))
    if projector:
        fig = charts.projector(fig)
    if fig.layout.modebar.orientation != "v":
        fig.update_layout(modebar=dict(orientation="v"))  # in place: idempotent, and no copy of a large figure
    return where.plotly_chart(fig, config=PROJECTOR_CONFIG if projector else CONFIG, **kw)


def note(result_key: str) -> None:
    """Say, once, how the last job for ``result_key`` ended when it left nothing to show (stopped, cancelled)."""
    msg = st.session_state.pop(f"{result_key}__note", None)
    if msg:
        st.info(msg)


def _queued(job: BackgroundJob) -> None:
    """A queued job: its place, the wait from what is ahead of it, and a Cancel button."""
    pos = job.queue_position
    wait, ahead = job.wait_ahead()
    text = BUSY
    if pos:
        text += f" Place in the queue: {pos}"
        if wait is not None:
            running = [j for j in ahead if j.status == "running"]
            parts = [f"{len(running)} running job{'s' if len(running) != 1 else ''} "
                     f"({', '.join(f'{j.kind}, about {duration(j.seconds_left() or 0)} left' for j in running)})"
                     if running else None,
                     f"{len(ahead) - len(running)} queued before yours" if len(ahead) > len(running) else None]
            text += f"; about {duration(wait)} to wait (ahead of it: {'; '.join(p for p in parts if p) or 'nothing'})"
        text += "."
    st.info(text)
    if job.stop.is_set():
        st.caption("Cancelling ...")
    elif st.button("Cancel", key=f"cancel-{job.id}", help="Takes this run out of the queue; nothing is computed."):
        job.stop.set()
        _rerun_view()


def _rerun_view() -> None:
    """Redraw the job's view at once: the fragment alone when this is a fragment rerun, else the page (a click
    handled in a full run, as AppTest runs every script)."""
    from streamlit.errors import StreamlitAPIException

    try:
        st.rerun(scope="fragment")
    except StreamlitAPIException:
        st.rerun()


@st.fragment(run_every=2.0)
def job_view(job_key: str, result_key: str, progress: Callable[[BackgroundJob], tuple[float, str]],
             live: Callable[[BackgroundJob], None] | None = None) -> None:
    """A background job's status, refreshed every two seconds: queued (with its wait and a Cancel button), progress
    with a Stop button, then its result.

    Every refresh runs in the server process that also runs the job: at one per second the default run on
    2 cores took 27-30 s instead of 22-24 s, so the view refreshes every two seconds (about 3 steps). A click on Stop
    is acknowledged at once; the job ends at the next block of whatever pass it is in.

    When the job ends its result goes to ``st.session_state[result_key]`` (an error is shown instead; a job stopped
    before it computed anything leaves a note, :func:`note`) and the whole page reruns to draw it.
    """
    job: BackgroundJob | None = st.session_state.get(job_key)
    if job is None:
        return
    if job.status == "queued":
        _queued(job)
    elif job.status == "running":
        fraction, label = progress(job)
        if job.stop.is_set():
            label = "Stopping after the current block ... (" + label + ")"
        st.progress(min(1.0, max(0.0, fraction)), text=label)
        if job.stop.is_set():
            st.info("Stopping after the current block of the pass it is in; what was computed is kept.")
        elif st.button("Stop", key=f"stop-{job.id}", help="Stops at the next block of whatever pass is running and "
                                                           "keeps what was computed."):
            job.stop.set()
            _rerun_view()  # the acknowledgement, at once
    if live is not None:
        live(job)
    if job.finished:
        if job.status == "failed":
            st.error(job.error)
        elif job.result is not None:
            st.session_state[result_key] = job.result
        else:
            st.session_state[f"{result_key}__note"] = (
                "Cancelled while queued: nothing was computed." if job.began is None else
                "Stopped before anything could be kept: nothing was saved. Start it again when you want it.")
        del st.session_state[job_key]
        st.rerun()


def metered(model, prompt, work: Work, wait: bool = True) -> Meter | None:
    """A meter for ``work`` priced on this machine now (a slice of rows under ``prompt``'s shape); ``wait=False``:
    None while that slice is being timed in the background."""
    cost = price(model, prompt, wait)
    return None if cost is None else Meter(cost, work)


def estimate_line(meter: Meter, what: str = "") -> str:
    """``About 40 s on this machine (timed just now)``, for a job not started yet."""
    return (f"About {duration(meter.estimate())} on this machine" + (f" ({what})" if what else "")
            + ": timed just now on a slice of it.")


def running_label(what: str, job: BackgroundJob) -> tuple[float, str]:
    """The progress of a metered job: its fraction and ``what``, with the time left at the pace it keeps."""
    m = job.meter
    if m is None:
        return 0.5, what
    return m.fraction(), f"{what} about {duration(m.seconds_left())} left"


def on_demand(kind: str, label: str, button_key: str, job_key: str, result_key: str,
              target: Callable[[BackgroundJob], object],
              running: str, help: str, model=None, work: Work | None = None, prompt=None):
    """A computation the user asks for with a button, run as a background job; its result once there (else None).

    With ``model``, the job is watched (a Stop ends it at the next block); with ``work`` (and a ``prompt`` of the
    shape it runs) it is priced before the click, and its progress bar and time left follow its passes.
    The result is kept in the session under ``result_key``, so the button goes once it has been computed."""
    note(result_key)
    priced = model is not None and work is not None and prompt is not None
    if result_key not in st.session_state:
        if priced and job_key not in st.session_state:
            meter = metered(model, prompt, work, wait=False)
            line = TIMING if meter is None else estimate_line(meter)
            help = f"{help} {line}"
            st.caption(line)
        if st.button(label, key=button_key, disabled=job_key in st.session_state, help=help):
            meter = metered(model, prompt, work) if priced else None
            st.session_state[job_key] = BackgroundJob(kind, target, model=model, meter=meter).start()
    if job_key in st.session_state:
        job_view(job_key, result_key, lambda job: running_label(running, job))
    return st.session_state.get(result_key)
