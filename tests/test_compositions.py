"""The composition targets (fourth edition): shipped, their classes built from the sources that carry the factors,
fresh images, and labels that mean what their names say."""
import hashlib

import numpy as np
import pytest

from core.io import assets
from core.io.tasks import Task

NEW = ("shapes_kind_yhalf", "shapes_xpos_yhalf", "shapes_count_yhalf", "shapes_xthird")


def _load(name: str) -> Task:
    return Task.load(assets.task_path(name))


def test_every_designed_target_is_shipped_and_its_sources_are_in_the_bank():
    assert set(NEW) <= set(assets.COMPOSITIONS)
    assert "shapes_quad" in assets.COMPOSITIONS  # the known-answer case stays
    for target, sources in assets.COMPOSITIONS.items():
        assert target in assets.shipped_tasks("target")
        assert set(sources) <= set(assets.shipped_tasks("source")), target
    assert [t for t, s in assets.COMPOSITIONS.items() if len(s) == 1] == ["shapes_xthird"]


@pytest.mark.parametrize("name", [n for n in NEW if len(assets.COMPOSITIONS[n]) == 2])
def test_a_composition_has_one_class_per_pair_of_its_sources_classes(name):
    task = _load(name)
    a, b = (_load(s) for s in assets.COMPOSITIONS[name])
    assert task.classes == [f"{x} {y}" for x in a.classes for y in b.classes]
    assert task.sizes() == {"train": 800, "val": 200, "test": 1000}
    for split in ("train", "val", "test"):  # every class in every split, none far from an even share
        counts = np.bincount(task.splits[split].labels, minlength=task.num_classes)
        assert counts.min() >= 0.5 * counts.mean(), (split, counts)


def _centroids(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the brightness-weighted row and column of the pixels above the noise: (N,), (N,)."""
    x = images.astype(np.float64)
    if x.ndim == 4:
        x = x.mean(-1)
    x = np.clip(x - 60, 0, None)
    rows, cols = np.indices(x.shape[1:])
    mass = x.sum((1, 2))
    return (x * rows).sum((1, 2)) / mass, (x * cols).sum((1, 2)) / mass


@pytest.mark.parametrize("name", ["shapes_kind_yhalf", "shapes_xpos_yhalf", "shapes_count_yhalf"])
def test_the_y_half_in_a_class_name_is_where_the_shapes_are(name):
    sp = _load(name).splits["test"]
    row, _ = _centroids(sp.images)
    bottom = sp.labels % 2 == 1  # classes alternate top / bottom
    assert (row[~bottom] < 16).mean() > 0.97 and (row[bottom] > 16).mean() > 0.97


@pytest.mark.parametrize("name, bins, of",
                         [("shapes_xpos_yhalf", 4, lambda y: y // 2), ("shapes_xthird", 3, lambda y: y)])
def test_the_x_bin_in_a_class_name_orders_the_shapes_left_to_right(name, bins, of):
    sp = _load(name).splits["test"]
    _, col = _centroids(sp.images)
    means = [col[of(sp.labels) == b].mean() for b in range(bins)]
    assert np.all(np.diff(means) > 3), means


def test_a_composition_holds_fresh_images_none_of_a_source_task_or_another_target():
    def digests(task: Task) -> set[str]:
        return {hashlib.sha1(x.tobytes()).hexdigest() for s in ("train", "val", "test") for x in task.splits[s].images}

    seen = set()
    for name in [*assets.shipped_tasks("source"), *[t for t in assets.shipped_tasks("target") if t not in NEW]]:
        seen |= digests(_load(name))
    for name in NEW:
        mine = digests(_load(name))
        assert len(mine) == 2000 and not mine & seen, name
        seen |= mine
