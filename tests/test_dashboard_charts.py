import numpy as np
import pytest

from dashboard import charts


def test_conflict_heatmap_is_diverging_centred_and_outlines_conflicts():
    cos = np.array([[1.0, -0.4, 0.2], [-0.4, 1.0, 0.5], [0.2, 0.5, 1.0]])
    fig = charts.conflict_heatmap(cos, ["a", "b", "c"])
    hm = fig.data[0]
    assert hm.zmid == 0 and hm.zmin == -1 and hm.zmax == 1
    assert "cos" in hm.hovertemplate
    assert len(fig.layout.shapes) == 2  # (a, b) and (b, a)


def test_weights_and_maps_figures():
    fig = charts.weights_bar(["a", "b"], [0.7, 0.3])
    assert list(fig.data[0].y) == [0.7, 0.3]
    hist = [{"step": i, "weights": [0.5, 0.5], "hscore": 1.0, "regularizer": 0.1, "objective": 0.9} for i in range(3)]
    traj = charts.weights_trajectory(hist, ["a", "b"])
    assert len(traj.data) == 2 and traj.layout.yaxis.title.text == "weight"
    assert traj.layout.legend.orientation == "h"  # below the lines, not under the toolbar at the right edge
    blocks = [{**h, "weights": [[0.2, 0.4], [0.6, 0.8]]} for h in hist]  # layer-wise: (K, depth)
    traj = charts.weights_trajectory(blocks, ["a", "b"])
    assert list(traj.data[0].y) == pytest.approx([0.3] * 3) and list(traj.data[1].y) == pytest.approx([0.7] * 3)
    assert traj.layout.yaxis.title.text == "weight (mean over blocks)"
    assert len(charts.objective_curves(hist, 1.0).data) == 3
    coords = {"a": np.random.rand(10, 2), "ensemble": np.random.rand(10, 2)}
    labels = np.arange(10) % 2
    fig = charts.feature_maps(coords, labels, ["x", "y"], "pca")
    assert len(fig.data) == 4 and sum(t.showlegend for t in fig.data) == 2
    panel = fig.data[0]
    assert list(panel.customdata) == list(range(10))  # selection maps back to the sampled images
    assert panel.marker.color[0] != panel.marker.color[1] and panel.marker.color[0] == panel.marker.color[2]
    assert list(panel.text[:2]) == ["x", "y"]
    # Each map sits in its own box on the shared axes, keeps its shape (an affine rescale), and is titled.
    boxes = [(min(t.x), max(t.x), min(t.y), max(t.y)) for t in fig.data[:2]]
    assert (boxes[0][1] < boxes[1][0] or boxes[1][1] < boxes[0][0] or boxes[0][3] < boxes[1][2]
            or boxes[1][3] < boxes[0][2])
    ranks = lambda v: list(np.argsort(np.asarray(v)))
    assert (ranks(fig.data[1].x) == ranks(coords["ensemble"][:, 0])
            and ranks(fig.data[1].y) == ranks(coords["ensemble"][:, 1]))
    assert [a.text for a in fig.layout.annotations] == ["<b>a</b>", "<b>ensemble</b>"]
    stretched = charts.feature_maps({"wide": np.c_[np.arange(10.0) * 10, np.arange(10.0)]}, labels, ["x", "y"], "pca")
    w = stretched.data[0]
    assert np.ptp(w.x) == 1.0 and abs(np.ptp(w.y) - 0.1) < 1e-12  # one scale for both axes: the map keeps its shape


def test_feature_map_panels_are_square_titled_clear_of_each_other_and_share_a_selection():
    rng = np.random.default_rng(0)
    coords = {name: rng.random((20, 2)) for name in "abcdefg"}
    labels = np.arange(20) % 3
    ids = np.arange(1, 40, 2)  # the held-out points of an LDA map: their positions in the feature sample
    fig = charts.feature_maps(coords, labels, ["x", "y", "z"], "lda", ids=ids, selected=[3, 7, 8, 39])
    assert fig.layout.yaxis.scaleanchor == "x" and fig.layout.yaxis.scaleratio == 1  # square panels
    panels = fig.data[:7]
    assert all(list(t.customdata) == list(ids) for t in panels)
    # 8 is not drawn: the same two points (ids 3 and 7 and 39 -> positions 1, 3, 19) light up in every panel
    assert all(list(t.selectedpoints) == [1, 3, 19] for t in panels)
    assert panels[0].unselected.marker.opacity < 0.5
    # A title sits above its panel and below the frame of the panel above it.
    frames = {(s.x0, s.y0): s for s in fig.layout.shapes}
    for note in fig.layout.annotations:
        own = [s for s in fig.layout.shapes if s.x0 < note.x < s.x1 and s.y1 <= note.y]
        above = [s for s in fig.layout.shapes if s.x0 < note.x < s.x1 and s.y0 > note.y]
        assert own and all(s.y0 - note.y > 0.15 for s in above)
    assert len(frames) == 7
    assert charts.feature_maps(coords, labels, ["x", "y", "z"], "pca").data[0].selectedpoints is None


def test_objective_gives_r_its_own_non_negative_panel_and_says_when_it_is_zero():
    flat = [{"step": i, "weights": [0.5, 0.5], "hscore": 1.9 + i / 100, "regularizer": 0.0, "objective": 1.9 + i / 100}
            for i in range(3)]
    fig = charts.objective_curves(flat, 1.0)
    r_trace = fig.data[2]
    assert r_trace.yaxis == "y2" and fig.layout.yaxis2.rangemode == "tozero"
    assert any("R = 0" in a.text for a in fig.layout.annotations) and "coincide" in fig.layout.title.text
    moving = [{**h, "regularizer": 0.1, "objective": h["hscore"] - 0.1} for h in flat]
    fig = charts.objective_curves(moving, 1.0)
    assert not any("R = 0" in a.text for a in fig.layout.annotations) and "coincide" not in fig.layout.title.text


def test_hscore_bars_start_at_zero_and_the_zoom_is_a_separate_dot_plot():
    fig = charts.hscore_bar(["a", "b", "c"], [1.77, 2.03, 1.9], ensemble=2.03, n_classes=4)
    lo, hi = fig.layout.yaxis.range
    assert lo == 0.0 and 2.03 < hi < 2.5  # a bar's height is its score: 1.77 is drawn as 87 % of 2.03
    assert list(fig.data[0].text) == ["1.770", "2.030", "1.900"] and "[0, 3]" in fig.layout.title.text
    assert "bars start at 0" in fig.layout.title.text
    dots = charts.hscore_dots(["a", "b", "c"], [1.77, 2.03, 1.9], ensemble=2.03)
    assert dots.data[0].type == "scatter" and dots.data[0].mode == "markers+text"  # no bars on a zoomed axis
    zlo, zhi = dots.layout.xaxis.range
    assert 1.7 < zlo < 1.77 and 2.03 < zhi < 2.2 and "Zoomed" in dots.layout.title.text
    assert list(dots.data[0].y) == ["b", "c", "a"]  # best first


def test_cosines_are_coloured_against_the_random_prompt_band_not_their_sign():
    cos = np.array([[1.0, 0.80, 0.70], [0.80, 1.0, 0.90], [0.70, 0.90, 1.0]])
    colours = charts.band_colours(cos, (0.78, 0.84))
    assert colours[0, 1] == 0 and colours[0, 2] == -1 and colours[1, 2] == 1 and colours[0, 0] == 0
    fig = charts.conflict_heatmap(cos, ["a", "b", "c"], "raw", band=(0.78, 0.84))
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z[0, 2] < 0 < z[1, 2] and z[0, 1] == 0  # a positive cosine below random is drawn as below, not as agreement
    assert "0.70" in " ".join(np.asarray(fig.data[0].text).ravel())  # the cell still says the cosine itself


def test_uniform_label_stays_clear_of_the_bars():
    fig = charts.weights_bar(["a", "b"], [0.5, 0.5])
    assert fig.layout.annotations[0].xanchor == "left" or fig.layout.annotations[0].x >= 1


def test_projector_style_is_a_larger_high_contrast_copy():
    fig = charts.hscore_bar(["a", "b"], [1.8, 2.0], n_classes=4)
    big = charts.projector(fig)
    assert big.layout.font.size >= 18 and big.layout.font.color == "black" and big.layout.xaxis.tickfont.size >= 16
    assert fig.layout.font.size is None  # the stored figure is untouched


def test_segment_curve_shows_the_measured_path_the_straight_line_and_both_end_slopes():
    fig = charts.segment_curve([0, 0.25, 0.5, 0.75, 1], [2.0, 1.9, 1.85, 1.9, 1.95], -0.4, 0.3, "a", "b")
    assert len(fig.data) == 4 and "+0.000" not in fig.layout.title.text and "-0.125" in fig.layout.title.text
    start, end = fig.data[2], fig.data[3]
    assert list(start.x) == [0.0, 0.25] and start.y[1] == pytest.approx(2.0 - 0.4 * 0.25)
    assert list(end.x) == [1.0, 0.75] and end.y[1] == pytest.approx(1.95 - 0.3 * 0.25)


def test_simplex_map_marks_the_best_point_the_uniform_point_and_the_path():
    w = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1 / 3, 1 / 3, 1 / 3]])
    fig = charts.simplex_map(w, np.array([2.0, 1.5, 1.0, 1.2]), ["a", "b", "c"],
                             path=np.array([[0.4, 0.3, 0.3], [0.9, 0.05, 0.05]]))
    assert [t.name.split(" (")[0] for t in fig.data] == ["H-score", "best on the grid", "uniform", "the run's path"]
    assert fig.data[1].a[0] == 1 and "2.000" in fig.data[1].name


def test_the_plane_map_marks_the_segment_the_sources_the_sum_and_its_own_best():
    from core.analysis.plane import PlaneResult

    grid = np.linspace(-0.5, 1.5, 5)
    values = np.add.outer(grid, grid)  # best at (1.5, 1.5)
    probe = -np.add.outer((grid - 1) ** 2, (grid - 1) ** 2)  # best at (1, 1): the full sum
    plane = PlaneResult(("a", "b"), grid, grid, values, "hscore", probe_acc=probe, n_samples=40, n_test=200)
    fig = charts.plane_map(plane, run_point=(1.0, 0.0), mixing="task_arithmetic")
    star = next(t for t in fig.data if t.name and t.name.startswith("grid's best"))
    assert (star.x[0], star.y[0]) == (1.5, 1.5) and "Task-vector plane of a and b" in fig.layout.title.text
    assert list(fig.data[1].x) == [0, 1] and list(fig.data[1].y) == [1, 0]  # the paper's segment l1 + l2 = 1
    labels = {t.text[0] for t in fig.data if t.text is not None and t.mode == "markers+text"}
    assert labels == {"a", "b", "full sum", "start P0"}
    assert any(t.name == "this run (task arithmetic)" and t.x[0] == 1.0 for t in fig.data)
    acc = charts.plane_map(plane, probe=True)
    star = next(t for t in acc.data if t.name and t.name.startswith("grid's best"))
    assert (star.x[0], star.y[0]) == (1.0, 1.0) and acc.layout.title.text.startswith("Probe accuracy")
    assert np.allclose(np.asarray(acc.data[0].z), probe.T)


# ---------------------------------------------------------------- fourth edition (issue 35)
DEEP_NAMES = [f"{n}_deep" for n in ("fashion_mnist", "shapes_kind", "shapes_xpos", "shapes_yhalf", "digits_count",
                                    "textures", "blobs_count")]


def test_projector_titles_fit_and_every_category_label_has_room():
    names = DEEP_NAMES
    dots = charts.projector(charts.hscore_dots(names, np.linspace(1.5, 1.9, 7).tolist(), ensemble=1.9))
    first = dots.layout.title.text.split("<br>")
    assert all(len(line) <= charts.PROJECTOR_TITLE for line in first if not line.startswith("<sup>"))
    plot = dots.layout.height - dots.layout.margin.t - dots.layout.margin.b
    assert plot / len(names) >= charts.LABEL_ROW - 1  # 34 px a name at 16 px ticks: plotly draws all seven
    assert charts.wrap_title("a " * 40 + "<br><sup>kept</sup>", 20).endswith("<br><sup>kept</sup>")


def test_every_colour_bar_says_what_it_shows_and_leaves_room_for_the_toolbar():
    from core.analysis.plane import PlaneResult

    cos = np.array([[1.0, -0.4], [-0.4, 1.0]])
    grid = np.linspace(-0.5, 1.5, 3)
    figs = [charts.conflict_heatmap(cos / 100, ["a", "b"], "loss", zrange=None, what="I"),
            charts.conflict_heatmap(cos, ["a", "b"], band=(-0.5, 0.5)),
            charts.simplex_map(np.eye(3), np.ones(3), ["a", "b", "c"]),
            charts.class_hscores(np.ones((2, 3)), ["a", "b"], ["x", "y", "z"]),
            charts.prompt_image(np.ones((4, 8)), "p"),
            charts.plane_map(PlaneResult(("a", "b"), grid, grid, np.add.outer(grid, grid), "hscore", None, 40, 0))]
    for fig in figs:
        trace = fig.data[0]
        bar = trace.colorbar if trace.type == "heatmap" else trace.marker.colorbar
        assert bar.title.text and bar.title.text != "value", fig.layout.title.text
        assert fig.layout.margin.r >= charts.BAR_ROOM and bar.thickness <= 16
    assert figs[0].data[0].colorbar.title.text == "I"


def test_the_segment_curve_says_its_axis_is_zoomed():
    fig = charts.segment_curve([0, 0.5, 1], [1.80, 1.791, 1.79], None, None, "a", "b")
    lo, hi = fig.layout.yaxis.range
    assert lo > 0 and "zoomed axis" in fig.layout.title.text and "not from 0" in fig.layout.title.text
    assert "-0.004 (0.2 % of the score)" in fig.layout.title.text


def test_compare_overlays_give_long_run_labels_room_and_a_run_of_no_step_its_own_axis():
    labels = [f"target · TA · hscore · fishr λ=1.0 · seed {s} · 12:00:0{s} (abc12{s})" for s in range(3)]
    bars = charts.overlay_bars({lab: dict(zip(DEEP_NAMES, np.ones(7), strict=True)) for lab in labels}, "Weights",
                               "weight")
    assert bars.layout.legend.orientation == "v" and bars.layout.margin.b >= 22 * len(labels)
    assert bars.layout.xaxis.automargin
    still = [{"step": 0, "objective": 1.0, "weights": [1.0]}]
    curves = charts.overlay_curves({"a": still, "b": still}, "objective", "J")
    assert tuple(curves.layout.xaxis.range) == (-0.3, 1.3) and curves.layout.xaxis.dtick == 1


def test_the_plane_keeps_its_colour_bar_beside_it_and_a_visible_segment_swatch():
    from core.analysis.plane import PlaneResult

    grid = np.linspace(-0.5, 1.5, 3)
    fig = charts.plane_map(PlaneResult(("a", "b"), grid, grid, np.add.outer(grid, grid), "hscore", None, 40, 0))
    seg = next(t for t in fig.data if t.name and t.name.startswith("paper's average"))
    assert seg.line.color not in ("white", "#fff", "#ffffff")
    assert fig.layout.xaxis.scaleanchor is None  # an equal-scale map shrank inside its width, far from its bar


def test_deep_bank_matrices_grow_with_their_sources_and_the_accuracy_bars_follow_the_table():
    fig = charts.conflict_heatmap(np.eye(7), DEEP_NAMES)
    assert fig.layout.height >= 150 + 46 * 7 and fig.layout.yaxis.automargin
    rows = [{"method": m, "test_acc": a} for m, a in (("random", 0.5), ("hgprompt", 0.8), ("uniform", 0.7))]
    bars = charts.accuracy_bars(rows, order=["uniform", "hgprompt", "random"])
    assert list(bars.data[0].x) == ["uniform", "hgprompt", "random"] and list(bars.data[0].text)[0] == "70.0 %"
