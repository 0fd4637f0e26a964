"""Shared fixtures: the tiny random ViT, its random bank and a synthetic task of core.model.toy; nothing is
downloaded."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model():
    from core.model.toy import toy_model

    return toy_model()


@pytest.fixture(scope="session")
def task():
    from core.model.toy import toy_task

    return toy_task()


@pytest.fixture(scope="session")
def bank(model):
    from core.model.toy import toy_bank

    return toy_bank(model)


SUITE = ("pos_a", "pos_b", "pos_c", "pos_d", "pos_e")


def write_vtab_suite(root, names=SUITE, sizes=(24, 12, 12), n_classes: int = 3) -> dict:
    """Tiny tasks in the VTAB-1k list format (``train800.txt``, ``val200.txt``, ``train800val200.txt``, ``test.txt``
    with PNG images, as the NOAH / SSF preparations lay them out), one folder per task under ``root/suite``, and the
    tiny random ViT saved as a backbone folder (``root/backbone``): a user's own suite and model, made in the test."""
    import numpy as np
    from PIL import Image

    from core.model.toy import synthetic_images, toy_model

    root = os.fspath(root)
    suite = os.path.join(root, "suite")
    for t, name in enumerate(names):
        folder = os.path.join(suite, name)
        os.makedirs(os.path.join(folder, "images"), exist_ok=True)
        lists = {}
        for s, (split, n) in enumerate(zip(("train800", "val200", "test"), sizes, strict=False)):
            x, y = synthetic_images(n, n_classes, seed=100 * t + s)
            x = np.roll(x, shift=t, axis=2)  # each task a little different from the others
            lines = []
            for i, (img, label) in enumerate(zip(x, y, strict=True)):
                rel = f"images/{split}_{i}.png"
                Image.fromarray(img).save(os.path.join(folder, rel))
                lines.append(f"{rel} {int(label)}")
            lists[split] = lines
        lists["train800val200"] = lists["train800"] + lists["val200"]
        for split, lines in lists.items():
            with open(os.path.join(folder, f"{split}.txt"), "w") as fh:
                fh.write("\n".join(lines) + "\n")
    toy_model().save(os.path.join(root, "backbone"))
    return {"suite": suite, "backbone": os.path.join(root, "backbone"),
            "tasks": [os.path.join(suite, n) for n in names]}


@pytest.fixture(scope="session")
def vtab_suite(tmp_path_factory):
    """Five tiny VTAB-1k-format tasks and a saved tiny backbone (see :func:`write_vtab_suite`)."""
    return write_vtab_suite(tmp_path_factory.mktemp("own"))
