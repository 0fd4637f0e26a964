"""A tiny random ViT, a bank of random prompts and synthetic tasks: the whole method in seconds, with nothing
downloaded. The tests, the benchmarks' ``--quick`` profiles and the sweep's ``toy`` setup all use these."""
from __future__ import annotations

import numpy as np
import torch

from ..io.prompt_bank import PromptBank, SourcePrompt
from ..io.tasks import Task
from .prompted_vit import PromptedViT

#: The tiny ViT: 16 px images, 4 px patches (16 tokens), width 32, 2 blocks.
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def toy_model(seed: int = 0, **over) -> PromptedViT:
    """A randomly initialised tiny timm ViT (``TINY``, overridden by ``over``), its weights drawn from ``seed``."""
    torch.manual_seed(seed)  # (the weights do not depend on it; callers' later draws from the global RNG do)
    return PromptedViT.create("vit_tiny_patch16_224", seed=seed, **{**TINY, **over})


def toy_bank(model: PromptedViT, k: int = 3, tokens: int = 4, seed: int = 1) -> PromptBank:
    """``k`` random shallow prompts ``(tokens, D)`` of scale 0.5, named ``src0 ..``, for ``model``, with a random
    shared start recorded (so that the rules that need one run; these prompts were not tuned from it)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [SourcePrompt(f"src{i}", torch.randn(tokens, model.embed_dim, generator=g) * 0.5, source_task=f"task{i}",
                            backbone=model.name, backbone_fingerprint=model.fingerprint) for i in range(k)]
    start = torch.randn(tokens, model.embed_dim, generator=torch.Generator().manual_seed(seed + 1000)) * 0.5
    return PromptBank(prompts, start, {"rule": "random (toy)", "seed": seed + 1000})


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


def toy_task(name: str = "toy", n_classes: int = 3, seed: int = 0, n=(48, 24, 24)) -> Task:
    """A synthetic task: ``n`` train / val / test images of ``synthetic_images``."""
    parts = [synthetic_images(k, n_classes, seed + i) for i, k in enumerate(n)]
    return Task.from_arrays(name, *parts, classes=[f"c{i}" for i in range(n_classes)])


def toy_targets() -> dict[str, Task]:
    """The sweep's two synthetic targets, ``toy_a`` and ``toy_b`` (3 classes, 48 / 24 / 40 images; the class sets
    where a bright patch lies, a little wider in ``toy_b``)."""
    tasks = {}
    for t, name in enumerate(("toy_a", "toy_b")):
        parts = []
        for i, n in enumerate((48, 24, 40)):
            rng = np.random.default_rng([t, i])
            y = np.arange(n) % 3
            x = rng.integers(0, 60, size=(n, 16, 16, 3))
            for j, c in enumerate(y):
                x[j, (c % 2) * 6 : (c % 2) * 6 + 6, (c // 2) * 8 : (c // 2) * 8 + 6 + t, :] += 150
            parts.append((np.clip(x, 0, 255).astype(np.uint8), y))
        tasks[name] = Task.from_arrays(name, *parts, classes=["c0", "c1", "c2"])
    return tasks
