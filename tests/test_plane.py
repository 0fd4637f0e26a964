"""The task-vector plane: coarse to fine against the full lattice, the points it scores, and its result's readers."""

import numpy as np
import pytest

from core.analysis.plane import PlaneResult, coarse_indices, refine_window, segment_indices, task_vector_plane
from core.errors import UserInputError


def test_the_coarse_map_holds_the_sources_the_start_and_the_sum():
    axis = np.linspace(-0.5, 1.5, 21)
    coarse = axis[coarse_indices(axis)]
    assert len(coarse) == 10 and np.isclose(coarse, 0).any() and np.isclose(coarse, 1).any()
    assert len(segment_indices(axis)) == 11  # l1 = 0, 0.1, ..., 1
    assert len(refine_window((0, 20), 21, 5)) == 9  # clipped at a corner
    assert len(refine_window((7, 7), 21, 5)) == 25


@pytest.mark.parametrize("a,b,probe", [("src0", "src1", True), ("src0", "src2", False), ("src1", "src2", False)])
def test_coarse_to_fine_finds_the_full_grids_best_with_a_quarter_of_the_prompts(model, bank, task, a, b, probe):
    kw = dict(grid=21, n_samples=24, probe=probe, n_test=24)
    full = task_vector_plane(model, bank, task, a, b, refine=False, **kw)
    fine = task_vector_plane(model, bank, task, a, b, **kw)
    assert full.values.shape == (21, 21) and fine.values.shape == (10, 10)
    assert fine.extra["prompts"] <= 100 + (2 if probe else 1) * 16 + 5 < 441 / (2.5 if probe else 3)
    assert (fine.best()[:2] == pytest.approx(full.best()[:2])
            and fine.best()[2] == pytest.approx(full.best()[2], abs=1e-5))
    for w1, w2 in [(1, 0), (0, 1), (1, 1), (0, 0)] + [(t, 1 - t) for t in np.linspace(0, 1, 11)]:
        assert fine.at(w1, w2) == pytest.approx(full.at(w1, w2), abs=1e-5)  # every point the view reads was scored
    if probe:  # the probe's best is refined too (its value: the accuracy of the full grid's best point)
        assert fine.best(probe=True)[2] == pytest.approx(full.best(probe=True)[2])
        assert fine.probe_acc.shape == fine.values.shape and len(fine.fine["probe_acc"]) == len(fine.fine["values"])


def test_a_small_lattice_is_scored_whole(model, bank, task):
    out = task_vector_plane(model, bank, task, "src0", "src1", grid=5, n_samples=40)
    assert out.values.shape == (5, 5) and out.fine is None and out.extra["prompts"] == 25


def test_the_progress_ends_at_its_total(model, bank, task):
    seen = []
    task_vector_plane(model, bank, task, "src0", "src1", grid=21, n_samples=40,
                      callback=lambda d, t: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] and all(d <= t for d, t in seen)


def test_a_window_that_is_even_is_refused(model, bank, task):
    with pytest.raises(UserInputError, match="window must be an odd integer >= 3"):
        task_vector_plane(model, bank, task, "src0", "src1", window=4)


def test_best_and_at_read_the_fine_points_too():
    grid = np.array([0.0, 1.0])
    plane = PlaneResult(("a", "b"), grid, grid, np.array([[0.1, 0.2], [0.3, 0.4]]), "hscore",
                        fine={"l1": np.array([0.5]), "l2": np.array([0.5]), "values": np.array([0.9]),
                              "probe_acc": None})
    assert plane.best() == (0.5, 0.5, 0.9)
    assert plane.at(0.5, 0.5) == 0.9 and plane.at(1.0, 0.0) == 0.3 and plane.at(0.9, 0.1) == 0.3  # nearest map point
