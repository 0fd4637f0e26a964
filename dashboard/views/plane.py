"""The task-vector plane view: for two sources, the objective over P0 + l1 tau1 + l2 tau2 on a grid, with the paper's
simplex segment, both sources, the full-strength sum and the run's point drawn; on demand, the probe accuracy on the
same grid (core.analysis.plane)."""
from __future__ import annotations

import numpy as np
import streamlit as st

from core.analysis.plane import coarse_indices, segment_indices, task_vector_plane
from core.metrics.stats import kendall
from core.model.cost import Work, scoring_work
from dashboard import charts
from dashboard.run_result import RunResult
from dashboard.state import digest
from dashboard.ui import chart, on_demand

GRID, SAMPLES, TEST = 21, 128, 200
WINDOW = 5  # the refined window around the coarse map's best (core.analysis.plane.task_vector_plane's default)


def _plane_prompts() -> int:
    """The prompts the plane scores, at most: the coarse map, the segment's lattice points and one refined window."""
    import numpy as np

    axis = np.linspace(-0.5, 1.5, GRID)
    return len(coarse_indices(axis)) ** 2 + len(segment_indices(axis)) + WINDOW**2


PROMPTS = _plane_prompts()
MAP_COLUMNS = [3, 2]  # the map's column and the numbers' (at 1280 px the map is about square)
EXPLAIN = (f"Every source prompt here was tuned from the bank's shared start P0, so P_k = P0 + tau_k. The map is the "
           f"run's objective at P0 + l1 tau_1 + l2 tau_2 for l1, l2 from -0.4 to 1.4 in steps of 0.2 ({SAMPLES} target "
           "images); the points 0.1 apart around its best and along the paper's segment are scored too (coarse to "
           f"fine: about 121 prompts instead of the {GRID} x {GRID} lattice's {GRID * GRID}). The dashed segment is "
           "the paper's average (l1 + l2 = 1), the squares the two sources, the diamond their full-strength sum, the "
           "circle P0, the star the best point scored.")


def _compute(res: RunResult, model, a: str, b: str, probe: bool, job=None):
    return task_vector_plane(model, res.bank, res.task(), a, b, grid=GRID, objective=res.params.get(
        "objective", "hscore"), h_variant=res.params.get("h_variant", "shrinkage"), n_samples=SAMPLES,
        seed=res.params["seed"], probe=probe, n_test=TEST, should_stop=None if job is None else job.stop)


def work(res: RunResult, model, probe: bool) -> Work:
    """The plane's passes: the grid's prompts on the sample (and on the test images for the probe)."""
    embed = not res.embedded(model)
    w = scoring_work(PROMPTS, SAMPLES, embed=embed)
    if probe:
        w = w + scoring_work(PROMPTS + WINDOW**2, TEST, embed=not res.embedded(model, "test"))
    return w


def run_point(res: RunResult, a: str, b: str) -> tuple[float, float] | None:
    """The run's weights on (a, b) when every other source has none (else the run is not on this plane)."""
    w = np.asarray(res.weights, dtype=float).reshape(len(res.names), -1).mean(1)
    i, j = res.names.index(a), res.names.index(b)
    rest = np.delete(w, [i, j])
    return (float(w[i]), float(w[j])) if rest.size == 0 or float(np.abs(rest).max()) < 1e-6 else None


def sources(res: RunResult) -> list[str] | None:
    """Two sources to open on: the two with the best H-score."""
    order = np.argsort(res.source_hscores)[::-1]
    return [res.names[int(i)] for i in order[:2]]


def view(res: RunResult, model, drawn: dict | None = None) -> None:
    st.caption(EXPLAIN)
    if res.bank is None or res.bank.start is None:
        st.info("These sources have no recorded shared start (uploaded prompts, or a bank built before starts were "
                "recorded), so their task vectors are undefined: rebuild the bank with `python -m core build-bank`.")
        return
    default = sources(res)
    c1, c2, c3 = st.columns([2, 2, 2])
    a = c1.selectbox("First source", res.names, index=res.names.index(default[0]), key="plane_a")
    others = [n for n in res.names if n != a]
    b = c2.selectbox("Second source", others, index=others.index(default[1]) if default[1] in others else 0,
                     key="plane_b")
    probe = c3.toggle("Also the probe accuracy", key="plane_probe",
                      help=f"A linear probe (shrinkage LDA) fitted on the {SAMPLES} sample images' features at every "
                           f"grid point and scored on {TEST} test images: about twice the time.")
    key = f"plane_{digest(res.id, a, b, probe)}"
    out = on_demand("plane", "Compute the plane", "plane_button", f"{key}_job", key,
                    lambda job: _compute(res, model, a, b, probe, job), "scoring the plane, coarse to fine ...",
                    "The map's prompts, then those around its best and on the paper's segment, in batched passes" +
                    (", each with a probe." if probe else "."), model=model, prompt=res.stack[0],
                    work=work(res, model, probe))
    if out is None:
        return

    def draw(name: str, probe: bool = False):
        """The map in a column about as wide as it is tall (the plane's two axes have the same range); the column
        beside it, for its numbers."""
        fig_key = f"{key}_{'probe_' if probe else ''}fig"
        if fig_key not in st.session_state:  # building the figure once: a redraw only draws
            st.session_state[fig_key] = charts.plane_map(out, run_point(res, a, b), res.params.get("mixing", "average"),
                                                         probe=probe)
        if drawn is not None:
            drawn[name] = st.session_state[fig_key]
        left, right = st.columns(MAP_COLUMNS)
        chart(left, st.session_state[fig_key], key=f"{name}_chart")
        return right

    beside = draw("plane")
    l1, l2, best = out.best()
    seg = [out.at(t, 1 - t) for t in np.linspace(0, 1, 11)]
    beside.write(f"Best on the grid: l = ({l1:+.1f}, {l2:+.1f}), {best:.3f}. On the paper's segment the best is "
                 f"{max(seg):.3f}; the sources alone {out.at(1, 0):.3f} and {out.at(0, 1):.3f}; their full-strength "
                 f"sum {out.at(1, 1):.3f}. ({out.n_samples} samples, {out.seconds:.0f} s)")
    if out.probe_acc is not None:
        beside = draw("plane_probe", probe=True)
        tau = kendall(out.values.ravel(), out.probe_acc.ravel())
        beside.write(f"Kendall's tau between the objective and the probe accuracy over the {out.values.size} grid "
                     f"points: **{tau:+.2f}** (1: the objective orders the grid as the probe does).")
        st.session_state.setdefault(f"measured_{res.id}", {})[key] = {
            "objective": out.values.ravel().tolist(), "probe_acc": out.probe_acc.ravel().tolist(),
            "label": f"plane {a} x {b}"}
