"""Shared fixtures: a tiny random ViT and synthetic tasks; nothing is downloaded."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def make_model(seed: int = 0, **over):
    from core import PromptedViT

    torch.manual_seed(seed)
    return PromptedViT.create("vit_tiny_patch16_224", **{**TINY, **over})


def synthetic_images(n: int, n_classes: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images whose class sets the position of a bright square, plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    rng.shuffle(y)
    x = rng.integers(0, 60, size=(n, size, size, 3)).astype(np.int64)
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, r * 6 : r * 6 + 6, col * 8 : col * 8 + 6, :] += 180
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def make_task(name: str = "toy", n_classes: int = 3, seed: int = 0, n=(48, 24, 24)):
    from core import Task

    parts = [synthetic_images(k, n_classes, seed + i) for i, k in enumerate(n)]
    return Task.from_arrays(name, *parts, classes=[f"c{i}" for i in range(n_classes)])


@pytest.fixture(scope="session")
def model():
    return make_model()


@pytest.fixture(scope="session")
def task():
    return make_task()


@pytest.fixture(scope="session")
def bank(model):
    from core import PromptBank, SourcePrompt

    g = torch.Generator().manual_seed(1)
    return PromptBank(
        SourcePrompt(f"src{i}", torch.randn(4, model.embed_dim, generator=g) * 0.5, source_task=f"task{i}",
                     backbone=model.name, backbone_fingerprint=model.fingerprint)
        for i in range(3)
    )
