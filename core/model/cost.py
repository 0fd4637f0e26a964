"""What a pass through the backbone costs on this machine, measured now: seconds per row and block, forward and
backward, and per image embedded.

A job's time is mostly passes of many rows (a row: one target sample under one prompt) through the frozen blocks.
:func:`measure_cost` times a small slice of such passes (a few rows, forward without and with gradients, and a few
images through the embedding) and :class:`BlockCost` scales it to a job's rows: an estimate made on this machine,
under its present load, as ``core.tuning.tune.estimate_tune_seconds`` does for a tune. The same units count the work
done while a job runs (the hooks of :func:`core.model.watch.watched` report every block and its rows), so a progress
bar can move with the passes and the time left can follow the pace actually measured.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .device import autocast


@dataclass(frozen=True)
class BlockCost:
    """Seconds per row and block: ``forward`` (no gradients), ``backward`` (the backward of a forward that kept
    its graph); ``embed`` seconds per image through the embedding; ``depth`` blocks."""

    forward: float
    backward: float
    embed: float
    depth: int

    def seconds(self, forward_rows: float = 0, backward_rows: float = 0, images: float = 0) -> float:
        """Seconds for ``forward_rows`` rows through every block forward, ``backward_rows`` rows back through every
        block (a forward with gradients counts once in each), and ``images`` images embedded."""
        return self.depth * (forward_rows * self.forward + backward_rows * self.backward) + images * self.embed

    def of_tick(self, info: dict) -> float:
        """The seconds of work one report of :func:`core.model.watch.watched` stands for (one block of one pass)."""
        rows = info.get("rows", 0)
        if info.get("pass") == "embed":
            return rows * self.embed
        return rows * (self.backward if info.get("pass") == "backward" else self.forward)


def _now(device: torch.device) -> float:
    """The time once the device has finished what it was given (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure_cost(model, prompt: torch.Tensor, rows: int = 32, images: int = 8) -> BlockCost:
    """Time a slice: ``rows`` rows under ``prompt`` (``(T, D)`` or ``(depth, T, D)``), forward without gradients
    and forward-backward to the prompt, and ``images`` random images through the embedding (each after an untimed
    warm-up of a few rows). About a second on the embedded default on 2 CPU cores."""
    device = model.device
    size = tuple(model.backbone.patch_embed.img_size)
    with torch.no_grad():
        model.embed(torch.rand(2, 3, *size, device=device))  # warm-up
        t0 = _now(device)
        tokens = model.embed(torch.rand(images, 3, *size, device=device))
        embed = (_now(device) - t0) / images
    tokens = tokens[torch.arange(rows, device=device) % images]
    p = prompt.detach().float().to(device)
    rows_of = lambda m: p.unsqueeze(0).expand(m, *p.shape)  # noqa: E731
    with torch.no_grad(), autocast(device):
        model.forward_rows(tokens[:4], rows_of(4))  # warm-up
        t0 = _now(device)
        model.forward_rows(tokens, rows_of(rows))
        forward = _now(device) - t0
    leaf = p.clone().requires_grad_(True)
    with autocast(device):
        t0 = _now(device)
        feats = model.forward_rows(tokens, leaf.unsqueeze(0).expand(rows, *p.shape))
    t1 = _now(device)
    torch.autograd.grad(feats.float().sum(), [leaf])
    backward = _now(device) - t1
    depth = max(1, model.depth)
    forward = max(forward, t1 - t0)  # (a forward that keeps its graph costs at least one that does not)
    return BlockCost(forward / (rows * depth), backward / (rows * depth), embed, depth)
