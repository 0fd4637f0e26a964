"""Plotly figures for the dashboard: pure functions of plain data, no Streamlit."""
from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
import pandas  # noqa: F401 - imported up front: plotly imports it lazily, two threads importing it at once break it
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from core.metrics.stats import bootstrap_ci

PALETTE = px.colors.qualitative.Safe
#: Pixels right of a plot that has a colour bar: the bar (thin, its title upright beside it) and, beyond it, plotly's
#: upright toolbar, which then never covers its ticks or its title.
BAR_ROOM = 140


def colour_bar(title: str, **kw) -> dict:
    """A thin colour bar titled with what it shows (upright, at its right, so it takes no width above the bar)."""
    return dict(title=dict(text=title, side="right"), thickness=14, xpad=6, **kw)


def weights_bar(names: Sequence[str], weights, title: str = "Ensemble weights", mixing: str = "average") -> go.Figure:
    """One bar per source (a layer-wise run's: its mean weight over the blocks); the dotted line is the uniform
    average's weight (the paper's rule) or a source's full change (task arithmetic)."""
    w = np.asarray(weights, dtype=float).reshape(len(names), -1).mean(1) if len(names) else np.zeros(0)
    fig = go.Figure(go.Bar(x=list(names), y=w.tolist(), marker_color=PALETTE[: len(names)] * 3,
                           text=[f"{v:.3f}" for v in w], textposition="outside",
                           hovertemplate="%{x}: %{y:.4f}<extra></extra>"))
    # The label sits at the right end, past the last bar (in the right margin), so it never covers a bar's value.
    if mixing == "average":
        fig.add_hline(y=1 / max(1, len(names)), line_dash="dot", annotation_text="uniform", annotation_position="right")
    else:
        fig.add_hline(y=1.0, line_dash="dot", annotation_text="full change", annotation_position="right")
        title += f"<br><sup>{mixing.replace('_', ' ')}: 1 keeps a source's whole change</sup>"
    fig.update_layout(title=title, yaxis_title="weight", yaxis_range=[0, max(1.0, float(w.max(initial=0)) * 1.15)],
                      height=360, margin=dict(t=60, b=40, r=110))
    return fig


def _split_kept(history: list[dict]) -> tuple[list[dict], dict | None]:
    """The optimiser's steps, and the returned point when it is not where the optimiser ended (a marker, not a step)."""
    steps = [h for h in history if not h.get("kept")]
    kept = next((h for h in history if h.get("kept")), None)
    return steps, kept


def _step_axis(fig: go.Figure, steps: list[dict], **where) -> None:
    """Whole steps on the x axis, from 0 (a run of no step gets an axis of 0 alone, not -1 to 1)."""
    last = max([h["step"] for h in steps] + [0])
    fig.update_xaxes(range=[-0.3, max(1, last) + 0.3], dtick=max(1, int(np.ceil(last / 10))), **where)


def weights_trajectory(history: list[dict], names: Sequence[str]) -> go.Figure:
    rows, kept = _split_kept(history)
    steps = [h["step"] for h in rows]
    w = np.array([np.asarray(h["weights"]).reshape(len(names), -1).mean(1) for h in rows])
    fig = go.Figure()
    dashes = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
    for i, n in enumerate(names):  # colour and dash and marker: coinciding lines stay distinguishable
        fig.add_trace(go.Scatter(x=steps, y=w[:, i] if len(w) else [], name=n, mode="lines+markers",
                                 marker=dict(size=4),
                                 line=dict(color=PALETTE[i % len(PALETTE)], dash=dashes[i % len(dashes)])))
    title = "Weights over steps"
    if kept is not None:
        kw = np.asarray(kept["weights"]).reshape(len(names), -1).mean(1)
        fig.add_trace(go.Scatter(x=[kept["step"]] * len(names), y=kw, mode="markers", name="returned point",
                                 marker=dict(symbol="star", size=12,
                                             color=[PALETTE[i % len(PALETTE)] for i in range(len(names))],
                                             line=dict(color="black", width=1)),
                                 hovertext=[f"{n}: {v:.3f}" for n, v in zip(names, kw, strict=True)], hoverinfo="text"))
        title += ("<br><sup>stars: the point returned, the best evaluated (a candidate or an earlier proposal), "
                  "not a step</sup>")
    per_block = bool(rows) and np.asarray(rows[0]["weights"]).size > len(names)
    # The legend runs below the lines: at the right edge it sat under plotly's upright toolbar.
    fig.update_layout(title=title, xaxis_title="step",
                      yaxis_title="weight (mean over blocks)" if per_block else "weight",
                      height=400, margin=dict(t=60), yaxis_tickformat=".2f", hovermode="closest",
                      legend=dict(orientation="h", y=-0.22, x=0))
    _step_axis(fig, rows)
    return fig


def objective_curves(history: list[dict], lam: float) -> go.Figure:
    """J and H on top, R (>= 0) in its own panel below, on an axis that starts at 0; the returned point, when it is not
    where the optimiser ended, as a marker."""
    rows, kept = _split_kept(history)
    steps = [h["step"] for h in rows]
    r = [h["regularizer"] for h in rows]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.65, 0.35], vertical_spacing=0.08)
    fig.add_trace(go.Scatter(x=steps, y=[h["objective"] for h in rows], name="objective J = H - lambda R",
                             mode="lines+markers", marker=dict(size=4)), row=1, col=1)
    fig.add_trace(go.Scatter(x=steps, y=[h["hscore"] for h in rows], name="H-score", line=dict(dash="dash")), row=1,
                  col=1)
    fig.add_trace(go.Scatter(x=steps, y=r, name="regulariser R", line=dict(dash="dot", color="#c33")), row=2, col=1)
    if kept is not None:
        fig.add_trace(go.Scatter(x=[kept["step"]], y=[kept["objective"]], mode="markers", name="returned point (J)",
                                 marker=dict(symbol="star", size=13, color="#1f77b4",
                                             line=dict(color="black", width=1))),
                      row=1, col=1)
    same = lam == 0 or all(abs(v) < 1e-12 for v in r)
    title = f"Objective and its terms (lambda = {lam:g})" + (": J = H, the lines coincide" if same else "")
    fig.update_layout(title=title, height=460, margin=dict(t=50), legend=dict(orientation="h", y=-0.18, x=0))
    fig.update_xaxes(title_text="step", row=2, col=1)
    _step_axis(fig, rows)
    fig.update_yaxes(title_text="H, J", tickformat=".3f", row=1, col=1)
    fig.update_yaxes(title_text="R", rangemode="tozero", tickformat=".3f", row=2, col=1)
    if all(abs(v) < 1e-12 for v in r):
        fig.add_annotation(text="R = 0 at every step:<br>no penalised mixing (a single source, or no conflicting pair)",
                           xref="x2 domain", yref="y2 domain", x=0.5, y=0.55, showarrow=False, align="center")
    return fig


def hscore_bar(names: Sequence[str], hscores: Sequence[float], ensemble: float | None = None,
               n_classes: int | None = None) -> go.Figure:
    """The sources' H-scores as bars from 0, so a bar's height is its score (a zoomed axis made 1.547 look like a ninth
    of 1.903); the title gives the scale, H in [0, C - 1]. The differences of a few hundredths are in
    :func:`hscore_dots`, a separate chart with a labelled zoomed axis."""
    vals = list(hscores) + ([ensemble] if ensemble is not None else [])
    fig = go.Figure(go.Bar(x=list(names), y=list(hscores), marker_color="#88a", name="source prompts",
                           text=[f"{h:.3f}" for h in hscores], textposition="outside",
                           hovertemplate="%{x}: H = %{y:.4f}<extra></extra>"))
    if ensemble is not None:
        # Labelled at the line's left end: the right edge is where plotly's toolbar stands.
        fig.add_hline(y=ensemble, line_color="#c33", annotation_text=f"ensemble {ensemble:.3f}",
                      annotation_position="top left")
    top = max(vals, default=1.0)
    upper = max(top * 1.15, (n_classes - 1) * 0.05 if n_classes else 0.0)
    scale = f"<br><sup>H lies in [0, C - 1] = [0, {n_classes - 1}]; bars start at 0</sup>" if n_classes else ""
    fig.update_layout(title="Transferability (H-score) of each source prompt on the target" + scale,
                      yaxis_title="H-score",
                      yaxis_range=[0.0, upper], yaxis_tickformat=".2f", height=380, margin=dict(t=70, r=50))
    return fig


def hscore_dots(names: Sequence[str], hscores: Sequence[float], ensemble: float | None = None) -> go.Figure:
    """The same H-scores on a zoomed axis, as dots (not bars, whose length would mislead): their differences."""
    vals = list(hscores) + ([ensemble] if ensemble is not None else [])
    lo, hi = min(vals, default=0.0), max(vals, default=1.0)
    pad = max(0.08 * (hi - lo), 0.005)
    order = np.argsort(hscores)[::-1]
    fig = go.Figure(go.Scatter(x=[hscores[i] for i in order], y=[names[i] for i in order], mode="markers+text",
                               marker=dict(size=11, color="#88a"), text=[f"{hscores[i]:.3f}" for i in order],
                               textposition="middle right", name="source prompts",
                               hovertemplate="%{y}: H = %{x:.4f}<extra></extra>"))
    if ensemble is not None:
        fig.add_vline(x=ensemble, line_color="#c33", line_dash="dash", annotation_text=f"ensemble {ensemble:.3f}")
    # A short first line (a projector's larger title was cut at 1280 px) and a row of 30 px per source, so that
    # every name is drawn (plotly skips tick labels that do not fit).
    fig.update_layout(title=f"Zoomed: H-scores from {lo - pad:.3f} to {hi + 3 * pad:.3f}<br><sup>dots, not bars: a "
                            "zoomed axis does not start at 0</sup>", xaxis_title="H-score",
                      xaxis_range=[lo - pad, hi + 3 * pad], xaxis_tickformat=".3f", yaxis_autorange="reversed",
                      height=150 + 30 * len(names), margin=dict(t=70, l=10, r=20, b=60), showlegend=False,
                      yaxis=dict(automargin=True, type="category"))
    return fig


def band_colours(c: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    """``-1`` below the random-prompt null band, ``0`` inside it, ``+1`` above it, per entry (0 on the diagonal)."""
    lo, hi = band
    out = np.where(c < lo, -1.0, np.where(c > hi, 1.0, 0.0))
    np.fill_diagonal(out, 0.0)
    return out


def conflict_heatmap(cosine: np.ndarray, names: Sequence[str], title: str = "Gradient cosine between sources",
                     zrange: tuple[float, float] | None = (-1.0, 1.0), band: tuple[float, float] | None = None,
                     what: str = "cos") -> go.Figure:
    """A pairwise matrix with its values written in; ``what`` the values are (the colour bar's title). Without
    ``band``: a diverging scale centred at 0 (``zrange=None`` scales to the data, for the mixing loss), negative
    entries outlined. With ``band`` (the range the same cosines take
    for random prompts): colour says where each pair lies against the band, red below (conflicts more than random
    prompts do), white inside, blue above; only pairs below it are outlined."""
    c = np.asarray(cosine, dtype=float)
    k = len(names)
    if zrange is None:
        m = max(float(np.abs(c[~np.eye(k, dtype=bool)]).max()) if k > 1 else 0.0, 1e-6)
        zrange, fmt, label = (-m, m), ("{:+.3f}" if m >= 1e-3 else "{:+.1e}"), what
    else:
        fmt, label = "{:+.2f}", what
    text = [[fmt.format(v) for v in row] for row in c]
    font = dict(size=max(8, min(14, int(90 / max(k, 1)))))  # readable with many sources
    if band is None:
        fig = go.Figure(go.Heatmap(z=c, x=list(names), y=list(names), zmin=zrange[0], zmax=zrange[1], zmid=0,
                                   colorscale="RdBu", text=text, texttemplate="%{text}", textfont=font,
                                   hovertemplate=f"%{{y}} vs %{{x}}: {label} = %{{z:.3f}}<extra></extra>",
                                   colorbar=colour_bar(label)))
        outline = (c < 0) & ~np.eye(k, dtype=bool)
    else:
        where = band_colours(c, band)
        fig = go.Figure(go.Heatmap(z=where, x=list(names), y=list(names), zmin=-1, zmax=1, customdata=c,
                                   colorscale=[[0, "#d6604d"], [0.5, "#f7f7f7"], [1, "#4393c3"]], text=text,
                                   texttemplate="%{text}", textfont=font,
                                   hovertemplate=f"%{{y}} vs %{{x}}: {label} = %{{customdata:.3f}}<extra></extra>",
                                   colorbar=colour_bar(f"{label} vs random prompts", tickvals=[-1, 0, 1],
                                                       ticktext=["below", "inside", "above"])))
        outline = where < 0
    for i in range(k):
        for j in range(k):
            if i != j and outline[i, j]:
                fig.add_shape(type="rect", x0=j - 0.5, x1=j + 0.5, y0=i - 0.5, y1=i + 0.5,
                              line=dict(color="black", width=2))
    fig.update_layout(title=title, height=max(420, 150 + 46 * k), yaxis_autorange="reversed",
                      margin=dict(t=70, r=BAR_ROOM), xaxis=dict(automargin=True), yaxis=dict(automargin=True))
    return fig


def accuracy_bars(rows: list[dict], order: Sequence[str] | None = None) -> go.Figure:
    """Test accuracy per method: the mean over the rows' seeds, with the bootstrap 95 % interval of that mean when
    there are two seeds or more; the methods in ``order`` (the table's beside it), else as the rows first give them."""
    by: dict[str, list[float]] = {m: [] for m in order or []}
    for r in rows:
        by.setdefault(r["method"], []).append(r["test_acc"])
    by = {m: v for m, v in by.items() if v}
    methods = list(by)
    means = [float(np.mean(v)) for v in by.values()]
    cis = [bootstrap_ci(v) if len(v) > 1 else (m, m) for v, m in zip(by.values(), means, strict=True)]
    seeds = max(len(v) for v in by.values()) if by else 0
    fig = go.Figure(go.Bar(x=methods, y=means,
                           marker_color=["#c33" if m.startswith("hgprompt") else "#88a" for m in methods],
                           error_y=dict(type="data", symmetric=False,
                                        array=[hi - m for (lo, hi), m in zip(cis, means, strict=True)],
                                        arrayminus=[m - lo for (lo, hi), m in zip(cis, means, strict=True)],
                                        visible=seeds > 1),
                           text=[f"{100 * m:.1f} %" for m in means], textposition="outside"))
    title = "Target test accuracy after tuning (same budget for every method)"
    if seeds > 1:
        title += f"<br><sup>mean over {seeds} seeds (each redraws the train/val split), bootstrap 95 % interval</sup>"
    fig.update_layout(title=title, yaxis_title="test accuracy", yaxis_range=[0, 1.05], yaxis_tickformat=".0%",
                      height=400, margin=dict(t=70))
    return fig


def feature_maps(coords: dict[str, np.ndarray], labels: np.ndarray, classes: Sequence[str], method: str,
                 ids: np.ndarray | None = None, selected: Sequence[int] | None = None, subtitle: str = "",
                 cols: int = 4) -> go.Figure:
    """Small multiples: one square 2-D map per prompt, points coloured by class.

    ``ids`` names each point (its position in the feature sample; it comes back in a selection event as
    ``customdata``); ``selected`` ids are drawn in full in *every* panel and the others faded, so a selection
    made in one panel shows where the same images lie under each prompt.

    The panels share one pair of (hidden) axes, each map scaled into its own unit box with equal x and y scales
    (square panels), and a band above each for its title: a browser draws one plot area with 7 traces in about
    two thirds of the time it takes for 7 subplots (median 0.20 s against 0.30 s in headless Chromium, 300 points
    per map).
    """
    names = list(coords)
    cols = min(cols, len(names))
    rows = int(np.ceil(len(names) / cols))
    gap_x, gap_y = 0.1, 0.28  # the vertical gap holds the next panel's title
    labels = np.asarray(labels)
    ids = np.arange(len(labels)) if ids is None else np.asarray(ids)
    colours = np.array([PALETTE[int(c) % len(PALETTE)] for c in labels])
    text = np.array([str(classes[int(c)]) for c in labels])
    chosen = None if selected is None else np.flatnonzero(np.isin(ids, np.asarray(list(selected))))
    fig = go.Figure()
    shapes, notes = [], []
    for k, name in enumerate(names):
        xy = np.asarray(coords[name], dtype=np.float64)
        lo, span = xy.min(0), np.ptp(xy, axis=0)
        scale = max(float(span.max()), 1e-12)
        # One scale for both axes (a map keeps its shape), centred in the panel's unit box.
        unit = (xy - lo) / scale + (1 - span / scale) / 2
        r, c = divmod(k, cols)
        x0, y0 = c * (1 + gap_x), (rows - 1 - r) * (1 + gap_y)
        # One trace per panel (not per panel and class): a browser draws 7 traces far faster than 70.
        fig.add_trace(go.Scatter(
            x=x0 + unit[:, 0], y=y0 + unit[:, 1], mode="markers", name=name, showlegend=False, text=text,
            marker=dict(size=5, color=colours), customdata=ids,
            selectedpoints=None if chosen is None else chosen.tolist(),
            selected=dict(marker=dict(size=8, opacity=1.0)), unselected=dict(marker=dict(opacity=0.12)),
            hovertemplate=f"{name}<br>class %{{text}}<br>image #%{{customdata}}<extra></extra>"))
        shapes.append(dict(type="rect", x0=x0 - 0.03, x1=x0 + 1.03, y0=y0 - 0.03, y1=y0 + 1.03,
                           line=dict(color="#bbb", width=1)))
        notes.append(dict(x=x0 + 0.5, y=y0 + 1.06, text=f"<b>{name}</b>", showarrow=False, yanchor="bottom",
                          font=dict(size=13)))
    for ci, cname in enumerate(classes):  # the legend: one entry per class present
        if (labels == ci).any():
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=str(cname), showlegend=True,
                                     marker=dict(size=8, color=PALETTE[ci % len(PALETTE)])))
    width = cols * (1 + gap_x) - gap_x
    fig.update_xaxes(visible=False, range=[-0.06, width + 0.06], constrain="domain")
    fig.update_yaxes(visible=False, range=[-0.06, rows * (1 + gap_y) - gap_y + 0.2], scaleanchor="x", scaleratio=1,
                     constrain="domain")
    title = f"{method.upper()} maps of the target's prompt-induced features"
    # The class legend runs along the top, so the panels get the chart's whole width.
    fig.update_layout(title=title + (f"<br><sup>{subtitle}</sup>" if subtitle else ""), height=240 * rows + 140,
                      margin=dict(t=110, l=10, r=10, b=10), dragmode="select", shapes=shapes, annotations=notes,
                      legend=dict(orientation="h", x=0, y=1.0, yanchor="bottom", title_text="class "),
                      plot_bgcolor="white")
    return fig


PROJECTOR_TITLE = 44  # characters of a title line at the projector's 22 px that fit a half-width chart at 1280 px
LABEL_ROW = 34  # pixels per category label at the projector's 16 px ticks (plotly skips labels that do not fit)


def wrap_title(text: str, width: int = PROJECTOR_TITLE) -> str:
    """``text`` with its main line (before any ``<br>``) broken at spaces into lines of at most ``width``
    characters; the ``<sup>`` subtitle lines are left as they are (drawn smaller)."""
    head, sep, rest = text.partition("<br>")
    lines = textwrap.wrap(head, width) if "<" not in head else [head]
    return "<br>".join(lines or [head]) + sep + rest


def _categories(fig: go.Figure) -> int:
    """The most category labels any trace puts on the y axis (names of sources, runs or classes)."""
    most = 0
    for t in fig.data:
        y = getattr(t, "y", None)
        if y is not None and len(y) and isinstance(y[0], str):
            most = max(most, len(set(y)))
    return most


def projector(fig: go.Figure) -> go.Figure:
    """A copy of ``fig`` for a projector: larger text, black on white, darker grid lines; its title broken into lines
    that fit, every category label given the room to be drawn, and the colour bars' text enlarged with it."""
    fig = go.Figure(fig)
    fig.update_layout(font=dict(size=18, color="black"), title_font=dict(size=22, color="black"), legend_font_size=17,
                      paper_bgcolor="white", plot_bgcolor="white")
    fig.update_xaxes(tickfont=dict(size=16, color="black"), gridcolor="#999", linecolor="black", title_font_size=18)
    fig.update_yaxes(tickfont=dict(size=16, color="black"), gridcolor="#999", linecolor="black", title_font_size=18)
    fig.update_traces(textfont_size=16, selector=dict(type="bar"))
    fig.update_traces(textfont_size=15, selector=dict(type="heatmap"))
    fig.update_traces(colorbar=dict(tickfont_size=15, title_font_size=16), selector=dict(type="heatmap"))
    title = fig.layout.title.text
    margin = fig.layout.margin
    top = margin.t if margin.t is not None else 100
    if title:
        wrapped = wrap_title(title)
        top += 30 * (wrapped.count("<br>") - title.count("<br>"))
        fig.update_layout(title_text=wrapped)
    height = (fig.layout.height or 450) + top - (margin.t if margin.t is not None else 100)
    n = _categories(fig)
    if n:
        bottom = margin.b if margin.b is not None else 80
        height = max(height, n * LABEL_ROW + top + bottom)
    fig.update_layout(margin=dict(t=top), height=height)
    return fig


def segment_curve(t: Sequence[float], h: Sequence[float], slope_start: float | None, slope_end: float | None, a: str,
                  b: str) -> go.Figure:
    """The H-score along ``(1 - t) P_a + t P_b`` with the tangents the two end gradients predict (when given), and the
    straight line between the ends (what mixing would give without interference)."""
    t, h = np.asarray(t, dtype=float), np.asarray(h, dtype=float)
    fig = go.Figure(go.Scatter(x=t, y=h, mode="lines+markers", name="measured H", line=dict(color="#223", width=3)))
    fig.add_trace(go.Scatter(x=[0, 1], y=[h[0], h[-1]], mode="lines", name="no interference (straight line)",
                             line=dict(dash="dot", color="#888")))
    for t0, h0, s, name in ((0.0, h[0], slope_start, f"slope at {a}"), (1.0, h[-1], slope_end, f"slope at {b}")):
        if s is None:
            continue
        xs = np.array([t0, t0 + (0.25 if t0 == 0 else -0.25)])
        fig.add_trace(go.Scatter(x=xs, y=h0 + s * (xs - t0), mode="lines", name=name, line=dict(dash="dash")))
    mid = len(t) // 2
    lo, hi = float(np.min(h)), float(np.max(h))
    pad = max(0.15 * (hi - lo), 1e-3)
    loss = h[mid] - (h[0] + h[-1]) / 2
    share = abs(loss) / max(abs((h[0] + h[-1]) / 2), 1e-12)
    # The loss on its own line (one line ran past the chart at 1280 px), the legend below the lines (at the right edge
    # it sat under plotly's toolbar). The axis is zoomed to the curve, so the title says so: a loss of a fraction of a
    # percent would otherwise look like a collapse.
    fig.update_layout(title=f"H-score from {a} (t = 0) to {b} (t = 1)<br><sup>mixing loss at the midpoint "
                            f"{loss:+.3f} ({100 * share:.1f} % of the score); zoomed axis from {lo - pad:.3f} to "
                            f"{hi + pad:.3f}, not from 0</sup>", xaxis_title="t (share of the second prompt)",
                      yaxis_title="H-score (zoomed)", yaxis_tickformat=".3f", yaxis_range=[lo - pad, hi + pad],
                      height=460, margin=dict(t=80), legend=dict(orientation="h", y=-0.25, x=0))
    return fig


def simplex_map(weights: np.ndarray, hscores: np.ndarray, names: Sequence[str],
                path: np.ndarray | None = None) -> go.Figure:
    """The H-score over the triangle of three sources (``weights: (M, 3)``), the vertices and the uniform point
    marked, and optionally the run's path ``(S, 3)``."""
    w, h = np.asarray(weights, dtype=float), np.asarray(hscores, dtype=float)
    fig = go.Figure(go.Scatterternary(
        a=w[:, 0], b=w[:, 1], c=w[:, 2], mode="markers", name="H-score",
        marker=dict(size=11, color=h, colorscale="Viridis", colorbar=colour_bar("H-score"), symbol="hexagon"),
        hovertemplate=f"{names[0]} %{{a:.2f}}<br>{names[1]} %{{b:.2f}}<br>{names[2]} %{{c:.2f}}<br>H "
        f"%{{marker.color:.3f}}<extra></extra>"))
    best = int(np.argmax(h))
    fig.add_trace(go.Scatterternary(a=[w[best, 0]], b=[w[best, 1]], c=[w[best, 2]], mode="markers+text",
                                    name=f"best on the grid ({h[best]:.3f})", text=["best"],
                                    textposition="bottom center",
                                    marker=dict(size=18, symbol="star", color="#ffd700",
                                                line=dict(color="black", width=2)),
                                    cliponaxis=False))
    fig.add_trace(go.Scatterternary(a=[1 / 3], b=[1 / 3], c=[1 / 3], mode="markers", name="uniform",
                                    marker=dict(size=12, symbol="x", color="#c33")))
    if path is not None and len(path):
        p = np.asarray(path, dtype=float)
        fig.add_trace(go.Scatterternary(a=p[:, 0], b=p[:, 1], c=p[:, 2], mode="lines+markers", name="the run's path",
                                        line=dict(color="#c33", width=3), marker=dict(size=6)))
    fig.update_layout(title="H-score over the mixtures of three sources", height=540,
                      margin=dict(t=90, b=80, r=BAR_ROOM),
                      legend=dict(orientation="h", y=-0.08, x=0.5, xanchor="center"),  # clear of the colour bar
                      # the apex label sits above the triangle's top, clear of a star at the apex
                      ternary=dict(aaxis=dict(title=dict(text=names[0]), ticks="outside", tickfont=dict(size=9)),
                                   baxis_title=names[1], caxis_title=names[2]))
    return fig


def class_hscores(terms: np.ndarray, names: Sequence[str], classes: Sequence[str]) -> go.Figure:
    """A (prompts x classes) heatmap of each class's share of the H-score; a row sums to that prompt's H-score."""
    terms = np.asarray(terms, dtype=float)
    rows = [f"{n} (H {t:.2f})" for n, t in zip(names, terms.sum(1), strict=True)]
    fig = go.Figure(go.Heatmap(z=terms, x=[str(c) for c in classes], y=rows, colorscale="Blues", zmin=0,
                               text=np.round(terms, 2), texttemplate="%{text:.2f}",
                               colorbar=colour_bar("share of the H-score"),
                               hovertemplate="%{y}<br>class %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title="Each class's share of the H-score (a row sums to the prompt's H-score)",
                      height=140 + 34 * len(rows), margin=dict(t=50, r=BAR_ROOM), yaxis_autorange="reversed",
                      xaxis_title="class")
    return fig


def prompt_image(prompt: np.ndarray, name: str) -> go.Figure:
    """A prompt as what it is: a few learned token vectors (rows), each as wide as the backbone's embedding."""
    p = np.asarray(prompt, dtype=float)
    p = p.reshape(-1, p.shape[-1])  # a deep prompt: its blocks' tokens one under another
    lim = float(np.abs(p).max()) or 1.0
    fig = go.Figure(go.Heatmap(z=p, colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim, colorbar=colour_bar("prompt value"),
                               hovertemplate="token %{y}, dimension %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"The prompt '{name}': {p.shape[0]} tokens x {p.shape[1]} numbers", height=260,
                      xaxis_title="embedding dimension", yaxis_title="token", yaxis_autorange="reversed",
                      margin=dict(t=50, r=BAR_ROOM))
    return fig


def _below_legend(fig: go.Figure, n: int, height: int) -> None:
    """A legend of ``n`` long entries (run labels) one per line below the plot, and the height to hold it: in one
    row below a half-width chart the labels ran past its edge and were cut."""
    fig.update_layout(height=height + 22 * n, legend=dict(orientation="v", x=0, y=-0.2, yanchor="top"),
                      margin=dict(t=50, b=60 + 22 * n))


def overlay_bars(series: dict[str, dict[str, float]], title: str, yaxis: str) -> go.Figure:
    """Grouped bars: for each source (x), one bar per run (``series[run][source]``); a source a run lacks is left
    out."""
    sources = list(dict.fromkeys(s for values in series.values() for s in values))
    fig = go.Figure()
    for k, (label, values) in enumerate(series.items()):
        fig.add_trace(go.Bar(x=sources, y=[values.get(s) for s in sources], name=label,
                             marker_color=PALETTE[k % len(PALETTE)],
                             hovertemplate=f"{label}<br>%{{x}}: %{{y:.4f}}<extra></extra>"))
    fig.update_layout(title=title, barmode="group", yaxis_title=yaxis, xaxis=dict(automargin=True, tickangle=-30))
    _below_legend(fig, len(series), 420)
    return fig


def overlay_curves(series: dict[str, list[dict]], key: str, title: str) -> go.Figure:
    """One line per run: ``history[step][key]`` against the step (whole steps from 0, also for runs of no step)."""
    fig = go.Figure()
    for k, (label, history) in enumerate(series.items()):
        fig.add_trace(go.Scatter(x=[h["step"] for h in history], y=[h[key] for h in history], mode="lines+markers",
                                 name=label, line=dict(color=PALETTE[k % len(PALETTE)], width=2)))
    fig.update_layout(title=title, xaxis_title="step", yaxis_title=key, yaxis_tickformat=".3f")
    _below_legend(fig, len(series), 380)
    _step_axis(fig, [h for history in series.values() for h in history if not h.get("kept")])
    return fig


SEGMENT = "#e7298a"  # the paper's segment on the plane


def plane_map(plane, run_point: tuple[float, float] | None = None, mixing: str = "average",
              probe: bool = False) -> go.Figure:
    """The objective (``probe=True``: the probe accuracy) over the task-vector plane of two sources, with the paper's
    segment, the sources, the full sum, the start, the grid's best and the run's point."""
    a, b = plane.names
    values = plane.probe_acc if probe else plane.values
    what = "probe accuracy" if probe else {"hscore": "H-score"}.get(plane.objective, plane.objective)
    fig = go.Figure(go.Heatmap(z=values.T, x=plane.l1, y=plane.l2, colorscale="Viridis", colorbar=colour_bar(what),
                               hovertemplate=f"l({a}) %{{x:+.2f}}, l({b}) %{{y:+.2f}}: %{{z:.4f}}<extra></extra>"))
    # Magenta: it stands out on every colour of the map and on the legend's white (a white line vanished there).
    fig.add_trace(go.Scatter(x=[0, 1], y=[1, 0], mode="lines", line=dict(color=SEGMENT, dash="dash", width=3),
                             name="paper's average (l1 + l2 = 1)"))
    marks = [((1, 0), a, "square"), ((0, 1), b, "square"), ((1, 1), "full sum", "diamond"),
             ((0, 0), "start P0", "circle")]
    for (x, y), label, symbol in marks:
        fig.add_trace(go.Scatter(x=[x], y=[y], mode="markers+text", text=[label], textposition="top center",
                                 textfont=dict(color="white"), marker=dict(symbol=symbol, size=11, color="white",
                                                                          line=dict(color="black", width=1)),
                                 name=label, showlegend=False))
    l1, l2, best = plane.best(probe)
    fig.add_trace(go.Scatter(x=[l1], y=[l2], mode="markers", marker=dict(symbol="star", size=15, color="#ffd700",
                                                                          line=dict(color="black", width=1)),
                             name=f"grid's best ({best:.3f})"))
    if run_point is not None:
        fig.add_trace(go.Scatter(x=[run_point[0]], y=[run_point[1]], mode="markers",
                                 marker=dict(symbol="x", size=14, color="#e41a1c", line=dict(width=2)),
                                 name=f"this run ({mixing.replace('_', ' ')})"))
    head = f"Probe accuracy over the task-vector plane of {a} and {b}" if probe else f"Task-vector plane of {a} and {b}"
    sub = (f"a linear probe at P0 + l1 tau({a}) + l2 tau({b}), scored on {plane.n_test} test images" if probe else
           f"{plane.objective} at P0 + l1 tau({a}) + l2 tau({b})")
    fig.update_layout(title=f"{head}<br><sup>{sub}</sup>", xaxis_title=f"l1 (weight of {a}'s task vector)",
                      yaxis_title=f"l2 (weight of {b}'s task vector)", height=560, margin=dict(t=70, r=BAR_ROOM),
                      legend=dict(orientation="h", y=-0.16, yanchor="top"))
    # No equal-scale constraint: it shrank the map inside its width and left the colour bar far to its right; the view
    # draws the map in a column about as wide as it is tall instead.
    return fig


def objective_vs_accuracy(points: list[dict], objective: str) -> go.Figure:
    """Each measured prompt's objective against its accuracy (probe or tuned), one colour per group."""
    fig = go.Figure()
    for i, group in enumerate(points):
        fig.add_trace(go.Scatter(x=group["objective"], y=group["accuracy"], mode="markers", name=group["label"],
                                 text=group.get("names"), marker=dict(size=9 if group.get("names") else 5,
                                                                       color=PALETTE[i % len(PALETTE)]),
                                 hovertemplate="%{text}<br>objective %{x:.4f}, accuracy %{y:.3f}<extra></extra>"
                                 if group.get("names") else "objective %{x:.4f}, accuracy %{y:.3f}<extra></extra>"))
    fig.update_layout(title=f"Objective ({objective}) against accuracy", xaxis_title=objective, yaxis_title="accuracy",
                      yaxis_tickformat=".0%", height=440, margin=dict(t=50))
    return fig


def source_matrix(values: Sequence[Sequence[float | None]], targets: Sequence[str], sources: Sequence[str], method: str,
                  kind: str = "weights") -> go.Figure:
    """A study's targets x sources matrix for one method: what each target takes from each source (its weight, a
    rule's coefficient, or the share of seeds that chose it), written in; a blank cell is a source the target never had
    (its own prompt, in a leave-one-out study)."""
    z = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float).reshape(
        len(targets), len(sources))
    text = [["" if np.isnan(v) else f"{v:.2f}" for v in row] for row in z]
    what = {"weights": "weight", "coefficients": "coefficient",
            "chosen": "share of seeds that chose it"}.get(kind, kind)
    font = dict(size=max(8, min(13, int(110 / max(len(sources), 1)))))
    fig = go.Figure(go.Heatmap(z=z, x=list(sources), y=list(targets), zmin=0, zmax=1, colorscale="Blues", text=text,
                               texttemplate="%{text}", textfont=font, hoverongaps=False,
                               hovertemplate=f"target %{{y}}, source %{{x}}: {what} %{{z:.3f}}<extra></extra>",
                               colorbar=dict(title=what.split()[0])))
    fig.update_layout(title=f"{method}: what each target takes from each source<br><sup>{what}, mean over seeds; "
                            "blank: a source the target did not have</sup>",
                      xaxis_title="source", yaxis_title="target", yaxis_autorange="reversed",
                      height=max(320, 140 + 28 * len(targets)), margin=dict(t=70, r=110))
    return fig
