import os

import numpy as np
import pytest
from PIL import Image

from core import Task, UserInputError
from core.model.toy import synthetic_images, toy_task


def _write_vtab(root, n=(8, 4, 6), classes=2):
    os.makedirs(root / "images", exist_ok=True)
    files = {"train800.txt": n[0], "val200.txt": n[1], "test.txt": n[2]}
    for fname, count in files.items():
        x, y = synthetic_images(count, classes, seed=len(fname))
        lines = []
        for i in range(count):
            rel = f"images/{fname[:-4]}_{i}.png"
            Image.fromarray(x[i]).save(root / rel)
            lines.append(f"{rel} {y[i]}")
        (root / fname).write_text("\n".join(lines) + "\n")
    (root / "train800val200.txt").write_text((root / "train800.txt").read_text() + (root / "val200.txt").read_text())


def test_vtab_list_format(tmp_path, model):
    _write_vtab(tmp_path)
    task = Task.load(tmp_path)
    assert task.sizes() == {"train": 8, "val": 4, "test": 6} and task.num_classes == 2
    x, y = task.tensors("train", model.transform())
    assert x.shape == (8, 3, 16, 16) and y.shape == (8,)


@pytest.mark.parametrize("line,match", [
    ("images/train800_0.png x", "line 1: label 'x' is not an integer"),
    ("../outside.png 0", "leaves the dataset folder"),
    ("/etc/passwd 0", "leaves the dataset folder"),
    ("images/missing.png 1", "line 1: image 'images/missing.png' does not exist"),
    ("justonetoken", "expected 'relative/path label'"),
])
def test_vtab_bad_lines_reported(tmp_path, line, match):
    _write_vtab(tmp_path)
    (tmp_path / "train800.txt").write_text(line + "\n")
    with pytest.raises(UserInputError, match=match):
        Task.load(tmp_path)


def test_symlink_out_of_folder_refused(tmp_path):
    _write_vtab(tmp_path / "ds")
    (tmp_path / "secret.png").write_bytes((tmp_path / "ds" / "images" / "train800_0.png").read_bytes())
    os.symlink(tmp_path / "secret.png", tmp_path / "ds" / "images" / "link.png")
    (tmp_path / "ds" / "train800.txt").write_text("images/link.png 0\nimages/train800_1.png 1\n")
    with pytest.raises(UserInputError, match="outside the dataset folder"):
        Task.load(tmp_path / "ds")


def test_missing_split_file_named(tmp_path):
    _write_vtab(tmp_path)
    os.remove(tmp_path / "val200.txt")
    (tmp_path / "extra").mkdir()
    with pytest.raises(UserInputError, match="val200.txt missing"):
        Task.from_vtab(tmp_path)


def test_class_folders_split_by_seed(tmp_path, model):
    x, y = synthetic_images(30, 3, seed=0)
    for i in range(30):
        d = tmp_path / f"class_{y[i]}"
        d.mkdir(exist_ok=True)
        Image.fromarray(x[i]).save(d / f"{i}.png")
    task = Task.load(tmp_path)
    assert task.classes == ["class_0", "class_1", "class_2"]
    assert sum(task.sizes().values()) == 30 and task.sizes()["val"] == 3 and task.sizes()["test"] == 6


def test_corrupt_image_named(tmp_path, model):
    _write_vtab(tmp_path)
    (tmp_path / "images" / "train800_0.png").write_bytes(b"not a png")
    task = Task.load(tmp_path)
    with pytest.raises(UserInputError, match="train800_0.png.*cannot be read"):
        task.tensors("train", model.transform())


def test_npz_round_trip_without_pickle(tmp_path):
    task = toy_task()
    task.save_npz(tmp_path / "t.npz")
    back = Task.from_npz(tmp_path / "t.npz")
    assert back.name == "toy" and back.classes == task.classes
    np.testing.assert_array_equal(back.splits["test"].images, task.splits["test"].images)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "bad.npz", train_x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserInputError, match="pickle"):
        Task.from_npz(tmp_path / "bad.npz")


def test_labels_out_of_range_and_single_class():
    x, y = synthetic_images(10, 2, 0)
    with pytest.raises(UserInputError, match="outside 0..1"):
        Task.from_arrays("t", (x, y), (x, y), (x, y + 5), classes=["a", "b"])
    with pytest.raises(UserInputError, match="at least two classes"):
        Task.from_arrays("t", (x, np.zeros(10, dtype=int)), (x, y), (x, y))
    with pytest.raises(UserInputError, match="empty train split"):
        Task.from_arrays("t", (x[:0], y[:0]), (x, y), (x, y))


def test_stratified_subsample_keeps_every_class():
    task = toy_task(n=(60, 6, 6))
    idx = task.subsample("train", 7, seed=0)
    assert len(idx) == 7 and len(set(task.splits["train"].labels[idx])) == 3
    assert np.array_equal(idx, task.subsample("train", 7, seed=0))


def test_resplit_redraws_train_and_val_and_keeps_test():
    from core.model.toy import toy_task

    task = toy_task(n=(40, 20, 20))
    a, b, again = task.resplit(1), task.resplit(2), task.resplit(1)
    assert a.sizes() == task.sizes()
    assert a.splits["test"] is task.splits["test"]
    np.testing.assert_array_equal(a.splits["train"].images, again.splits["train"].images)  # reproducible for a seed
    assert not np.array_equal(a.splits["train"].images, b.splits["train"].images)
    pooled = np.concatenate([task.splits["train"].images, task.splits["val"].images])
    redrawn = np.concatenate([a.splits["train"].images, a.splits["val"].images])
    assert sorted(map(bytes, pooled)) == sorted(map(bytes, redrawn))  # the same 60 images, split another way


def test_a_missing_task_path_says_it_does_not_exist(tmp_path, monkeypatch):
    from core import assets

    with pytest.raises(UserInputError, match="does not exist"):
        Task.load(tmp_path / "nope.npz")
    with pytest.raises(UserInputError, match="does not exist"):
        assets.task_path(str(tmp_path / "nope.npz"))
    monkeypatch.setenv("HOME", str(tmp_path))
    toy_task().save_npz(tmp_path / "mine.npz")
    assert Task.load(assets.task_path("~/mine.npz")).name == "toy"  # ~ is expanded


def test_a_stored_image_comes_back_as_rgb_at_its_stored_size():
    task = toy_task("pictures")
    img = task.image("train", 3)
    stored = task.splits["train"].images[3]
    assert img.mode == "RGB" and img.size == (stored.shape[1], stored.shape[0])
