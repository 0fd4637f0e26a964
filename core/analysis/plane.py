"""The task-vector plane of two sources: the objective over ``P0 + l1 tau_a + l2 tau_b`` on a grid of weights.

FusionBench draws the loss of ``theta_0 + l1 tau_1 + l2 tau_2`` for two merged models; here the same plane for two
source prompts tuned from the bank's shared start ``P0``. On it: the paper's simplex is the segment ``l1 + l2 = 1``
between the two sources, ``(1, 0)`` and ``(0, 1)`` are the sources, ``(1, 1)`` the full-strength task-arithmetic
sum and ``(0, 0)`` the start. Every grid prompt is scored in one batched pass (chunked by rows); on demand, each gets
the accuracy of a linear probe (shrinkage LDA, closed form) fitted on the sample's features and scored on held-out
test images, so the objective can be compared with an accuracy on the same grid.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..control import stop_flag
from ..errors import StopRequested, UserInputError
from ..method.scoring import chunk_rows
from ..metrics.h_score import HScoreVariant
from ..metrics.transferability import Transferability, lda_log_proba, transferability
from ..model.features import prompt_features
from ..model.tokens import sample_tokens, target_tokens


@dataclass
class PlaneResult:
    """The objective (and the probe accuracy, when asked for) on a ``(G, G)`` grid: ``values[i, j]`` at
    ``P0 + l1[i] tau_a + l2[j] tau_b``."""

    names: tuple[str, str]
    l1: np.ndarray  # (G,)
    l2: np.ndarray  # (G,)
    values: np.ndarray  # (G, G)
    objective: str
    probe_acc: np.ndarray | None = None  # (G, G)
    n_samples: int = 0
    n_test: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def at(self, w1: float, w2: float) -> float:
        """The objective at the grid point nearest to ``(w1, w2)``."""
        return float(self.values[int(np.abs(self.l1 - w1).argmin()), int(np.abs(self.l2 - w2).argmin())])

    def best(self, probe: bool = False) -> tuple[float, float, float]:
        """``(l1, l2, value)`` of the grid's best point: by the objective, or (``probe``) by the probe accuracy."""
        values = self.probe_acc if probe else self.values
        i, j = np.unravel_index(int(np.nanargmax(values)), values.shape)
        return float(self.l1[i]), float(self.l2[j]), float(values[i, j])


def plane_prompts(stack: torch.Tensor, start: torch.Tensor, l1: np.ndarray, l2: np.ndarray) -> torch.Tensor:
    """``P0 + l1_i tau_a + l2_j tau_b`` for every grid point, ``(G1 * G2, *S)`` (row-major in ``l1``), float32."""
    taus = stack.double() - start.double()[None]
    w1 = torch.as_tensor(l1, dtype=torch.float64).reshape(-1, 1, *([1] * (stack.dim() - 1)))
    w2 = torch.as_tensor(l2, dtype=torch.float64).reshape(1, -1, *([1] * (stack.dim() - 1)))
    grid = start.double()[None, None] + w1 * taus[0][None, None] + w2 * taus[1][None, None]
    return grid.reshape(-1, *stack.shape[1:]).float()


@torch.no_grad()
def task_vector_plane(model, bank, task, a: str, b: str, *, grid: int = 21, span: tuple[float, float] = (-0.5, 1.5),
                      objective: Transferability = "hscore", h_variant: HScoreVariant = "shrinkage",
                      n_samples: int | str | None = 128, seed: int = 0, probe: bool = False, n_test: int = 200,
                      max_rows: int | None = None, callback=None, should_stop=None) -> PlaneResult:
    """The objective over the plane of sources ``a`` and ``b`` of ``bank`` (a :class:`PromptBank` that records its
    shared start) on ``task``; ``probe=True`` adds the probe accuracy on ``n_test`` test images. ``callback(done,
    total)`` hears the progress; ``should_stop`` ends it (:class:`core.errors.StopRequested`)."""
    t0 = time.perf_counter()
    if bank.start is None:
        from ..method.mixing import NO_START

        raise UserInputError("the task-vector plane needs the bank's shared start: " + NO_START)
    if not (isinstance(grid, int) and 3 <= grid <= 101):
        raise UserInputError(f"grid must be an integer in 3..101, got {grid!r}.")
    if a == b:
        raise UserInputError(f"the plane needs two different sources; got {a!r} twice (pick another second source).")
    pair = bank.subset([a, b])
    pair.check_compatible(model)
    l1 = l2 = np.linspace(span[0], span[1], grid)
    prompts = plane_prompts(pair.stack(), pair.start, l1, l2)
    tokens, y = target_tokens(model, task, None, n_samples, seed)
    if probe:
        test_tok, test_y, _ = sample_tokens(model, task, "test", n_test, seed)
        _, test_y = torch.unique(test_y, return_inverse=True)  # (the probe's classes are the train sample's)
    stop = stop_flag(should_stop)
    n = tokens.shape[0] + (test_tok.shape[0] if probe else 0)
    per = max(1, chunk_rows(model, prompts, tokens, max_rows) // max(1, n))
    values, accs = [], []
    c = int(y.max()) + 1
    for s in range(0, prompts.shape[0], per):
        if stop():
            raise StopRequested()
        chunk = prompts[s : s + per]
        feats = prompt_features(model, tokens, chunk, batch_size=tokens.shape[0])
        values.extend(float(transferability(f, y, objective, h_variant)) for f in feats)
        if probe:
            test = prompt_features(model, test_tok, chunk, batch_size=test_tok.shape[0])
            for f, g in zip(feats, test):
                pred = lda_log_proba(f.double(), y, g.double(), c).argmax(1)
                accs.append(float((pred == test_y).double().mean()))
        if callback:
            callback(len(values), prompts.shape[0])
    shape = (grid, grid)
    return PlaneResult((a, b), l1, l2, np.asarray(values).reshape(shape), objective,
                       np.asarray(accs).reshape(shape) if probe else None, int(tokens.shape[0]),
                       int(test_tok.shape[0]) if probe else 0, time.perf_counter() - t0)
