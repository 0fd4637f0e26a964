"""The task-vector plane of two sources: the objective over ``P0 + l1 tau_a + l2 tau_b`` on a grid of weights.

FusionBench draws the loss of ``theta_0 + l1 tau_1 + l2 tau_2`` for two merged models; here the same plane for two
source prompts tuned from the bank's shared start ``P0``. On it: the paper's simplex is the segment ``l1 + l2 = 1``
between the two sources, ``(1, 0)`` and ``(0, 1)`` are the sources, ``(1, 1)`` the full-strength task-arithmetic
sum and ``(0, 0)`` the start. The grid's prompts are scored in batched passes (chunked by rows); on demand, each gets
the accuracy of a linear probe (shrinkage LDA, closed form) fitted on the sample's features and scored on held-out
test images, so the objective can be compared with an accuracy on the same grid.

Coarse to fine (the default, ``refine=True``): of the ``grid x grid`` lattice, every other point in each direction
(the half that holds 0 and 1, so the sources, the start and the sum are on it) makes the map; then the lattice
points within ``window // 2`` steps of the map's best point (and of the probe's best, with ``probe``) and the
paper's segment are scored. For the default 21 x 21 lattice that is 100 + 16 + 5 prompts instead of 441, and the
best point is the full grid's wherever the landscape has no second peak more than two steps from the coarse
best (docs/BENCHMARKS.md, "The plane, coarse to fine", says how often that held on the shipped pairs).
``refine=False`` scores the whole lattice.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..control import stop_flag
from ..errors import StopRequested, UserInputError
from ..method.mixing import NO_START
from ..method.scoring import chunk_rows
from ..metrics.h_score import HScoreVariant
from ..metrics.threads import one_thread
from ..metrics.transferability import Transferability, lda_log_proba, transferability
from ..model.device import Precision, precision as at_precision
from ..model.features import prompt_features
from ..model.tokens import sample_tokens, target_tokens


@dataclass
class PlaneResult:
    """The objective (and the probe accuracy, when asked for) on a ``(G1, G2)`` map: ``values[i, j]`` at
    ``P0 + l1[i] tau_a + l2[j] tau_b``; with coarse-to-fine, ``fine`` holds the points scored off the map (the
    window around its best and the paper's segment): ``{"l1": (M,), "l2": (M,), "values": (M,), "probe_acc": (M,)
    or None}``."""

    names: tuple[str, str]
    l1: np.ndarray  # (G1,)
    l2: np.ndarray  # (G2,)
    values: np.ndarray  # (G1, G2)
    objective: str
    probe_acc: np.ndarray | None = None  # (G1, G2)
    n_samples: int = 0
    n_test: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    fine: dict[str, Any] | None = None

    def points(self, probe: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every scored point, the map's and the fine ones: ``l1 (P,)``, ``l2 (P,)`` and the objective (``probe``:
        the probe accuracy) ``(P,)``."""
        values = self.probe_acc if probe else self.values
        a, b = np.meshgrid(self.l1, self.l2, indexing="ij")
        l1, l2, v = a.ravel(), b.ravel(), np.asarray(values, dtype=float).ravel()
        if self.fine is not None and len(self.fine["l1"]):
            extra = self.fine["probe_acc"] if probe else self.fine["values"]
            l1 = np.concatenate([l1, self.fine["l1"]])
            l2 = np.concatenate([l2, self.fine["l2"]])
            v = np.concatenate([v, np.asarray(extra, dtype=float)])
        return l1, l2, v

    def at(self, w1: float, w2: float) -> float:
        """The objective at ``(w1, w2)`` where it was scored; else at the map's grid point nearest to it."""
        l1, l2, v = self.points()
        hit = np.flatnonzero((np.abs(l1 - w1) < 1e-9) & (np.abs(l2 - w2) < 1e-9))
        if hit.size:
            return float(v[hit[0]])
        return float(self.values[int(np.abs(self.l1 - w1).argmin()), int(np.abs(self.l2 - w2).argmin())])

    def best(self, probe: bool = False) -> tuple[float, float, float]:
        """``(l1, l2, value)`` of the best point scored: by the objective, or (``probe``) by the probe accuracy."""
        l1, l2, v = self.points(probe)
        i = int(np.nanargmax(v))
        return float(l1[i]), float(l2[i]), float(v[i])


def plane_prompts(stack: torch.Tensor, start: torch.Tensor, l1: np.ndarray, l2: np.ndarray) -> torch.Tensor:
    """``P0 + l1_i tau_a + l2_j tau_b`` for every grid point, ``(G1 * G2, *S)`` (row-major in ``l1``), float32."""
    taus = stack.double() - start.double()[None]
    w1 = torch.as_tensor(l1, dtype=torch.float64).reshape(-1, 1, *([1] * (stack.dim() - 1)))
    w2 = torch.as_tensor(l2, dtype=torch.float64).reshape(1, -1, *([1] * (stack.dim() - 1)))
    grid = start.double()[None, None] + w1 * taus[0][None, None] + w2 * taus[1][None, None]
    return grid.reshape(-1, *stack.shape[1:]).float()


def point_prompts(stack: torch.Tensor, start: torch.Tensor, l1: np.ndarray, l2: np.ndarray) -> torch.Tensor:
    """``P0 + l1_m tau_a + l2_m tau_b`` for the points ``(l1_m, l2_m)``: ``(M, *S)``, float32 (the same arithmetic as
    :func:`plane_prompts`, so a point gets the same prompt either way)."""
    taus = stack.double() - start.double()[None]
    shape = (-1, *([1] * (stack.dim() - 1)))
    w1 = torch.as_tensor(np.asarray(l1, dtype=float), dtype=torch.float64).reshape(shape)
    w2 = torch.as_tensor(np.asarray(l2, dtype=float), dtype=torch.float64).reshape(shape)
    return (start.double()[None] + w1 * taus[0][None] + w2 * taus[1][None]).float()


def coarse_indices(axis: np.ndarray) -> np.ndarray:
    """Every other index of a lattice ``axis``, the half that holds 0 (so 0 and 1 are on it when the lattice has
    them at an even distance), else the half that holds the first point."""
    zero = np.flatnonzero(np.abs(axis) < 1e-9)
    parity = int(zero[0]) % 2 if zero.size else 0
    return np.arange(parity, len(axis), 2)


def refine_window(best: tuple[int, int], size: int, window: int) -> list[tuple[int, int]]:
    """Lattice indices within ``window // 2`` steps of ``best = (i, j)`` in each direction, clipped to ``size``."""
    r = window // 2
    i, j = best
    return [(a, b) for a in range(max(0, i - r), min(size, i + r + 1))
            for b in range(max(0, j - r), min(size, j + r + 1))]


def segment_indices(axis: np.ndarray) -> list[tuple[int, int]]:
    """Lattice indices of the paper's segment ``l1 + l2 = 1``, ``0 <= l1 <= 1``, where both are lattice points."""
    out = []
    for i, x in enumerate(axis):
        if -1e-9 <= x <= 1 + 1e-9:
            j = np.flatnonzero(np.abs(axis - (1 - x)) < 1e-9)
            if j.size:
                out.append((i, int(j[0])))
    return out


@torch.no_grad()
def task_vector_plane(model, bank, task, a: str, b: str, *, grid: int = 21, span: tuple[float, float] = (-0.5, 1.5),
                      refine: bool = True, window: int = 5, objective: Transferability = "hscore",
                      h_variant: HScoreVariant = "shrinkage", n_samples: int | str | None = 128, seed: int = 0,
                      probe: bool = False, n_test: int = 200, max_rows: int | None = None,
                      precision: Precision | None = None,
                      callback=None, should_stop=None) -> PlaneResult:
    """The objective over the plane of sources ``a`` and ``b`` of ``bank`` (a :class:`PromptBank` that records its
    shared start) on ``task``, on a ``grid x grid`` lattice over ``span``: coarse to fine (``refine``, the module
    docstring) or every lattice point. ``probe=True`` adds the probe accuracy on ``n_test`` test images.
    ``precision``: the backbone's (None: the current one, :func:`core.model.device.precision`). ``callback(done,
    total)`` hears the progress in prompts; ``should_stop`` ends it (:class:`core.errors.StopRequested`)."""
    t0 = time.perf_counter()
    if bank.start is None:
        raise UserInputError("the task-vector plane needs the bank's shared start: " + NO_START)
    if not (isinstance(grid, int) and 3 <= grid <= 101):
        raise UserInputError(f"grid must be an integer in 3..101, got {grid!r}.")
    if a == b:
        raise UserInputError(f"the plane needs two different sources; got {a!r} twice (pick another second source).")
    if not (isinstance(window, int) and window >= 3 and window % 2 == 1):
        raise UserInputError("window must be an odd integer >= 3 (lattice points around the coarse best), got "
                             f"{window!r}.")
    pair = bank.subset([a, b])
    pair.check_compatible(model)
    stack, start = pair.stack(), pair.start
    axis = np.linspace(span[0], span[1], grid)
    tokens, y = target_tokens(model, task, None, n_samples, seed)
    test_tok = test_y = None
    if probe:
        test_tok, test_y, _ = sample_tokens(model, task, "test", n_test, seed)
        _, test_y = torch.unique(test_y, return_inverse=True)  # (the probe's classes are the train sample's)
    score = _Scorer(model, tokens, y, test_tok, test_y, objective, h_variant, max_rows, stop_flag(should_stop),
                    callback)
    coarse = coarse_indices(axis)
    refine = refine and len(coarse) ** 2 + window**2 < grid**2  # (on a small lattice, scoring it all is cheaper)
    coarse = coarse if refine else np.arange(grid)
    shape = (len(coarse), len(coarse))
    # The progress's total: the map, and (refine) the segment and a window per centre, until the window is known.
    score.total = shape[0] * shape[1] + (len(segment_indices(axis)) + (2 if probe else 1) * window**2 if refine else 0)
    fine = None
    with at_precision(precision):
        values, accs = score(plane_prompts(stack, start, axis[coarse], axis[coarse]))
        values, accs = values.reshape(shape), (accs.reshape(shape) if probe else None)
        if refine:
            centres = [np.unravel_index(int(np.nanargmax(m)), shape) for m in ([values, accs] if probe else [values])]
            wanted = [p for i, j in centres for p in refine_window((int(coarse[i]), int(coarse[j])), grid, window)]
            done = {(int(i), int(j)) for i in coarse for j in coarse}
            todo = [p for p in dict.fromkeys(wanted + segment_indices(axis)) if p not in done]
            score.total = score.done + len(todo)
            fl1, fl2 = np.array([axis[i] for i, _ in todo]), np.array([axis[j] for _, j in todo])
            fv, fa = score(point_prompts(stack, start, fl1, fl2)) if todo else (np.zeros(0), np.zeros(0))
            fine = {"l1": fl1, "l2": fl2, "values": fv, "probe_acc": fa if probe else None}
    return PlaneResult((a, b), axis[coarse], axis[coarse], values, objective, accs, int(tokens.shape[0]),
                       int(test_tok.shape[0]) if probe else 0, time.perf_counter() - t0,
                       extra={"lattice": axis, "refine": refine, "prompts": score.done}, fine=fine)


class _Scorer:
    """Scores stacks of plane prompts in batches of rows: the objective on the sample, the probe accuracy on the test
    images; counts the prompts done for the progress."""

    def __init__(self, model, tokens, y, test_tok, test_y, objective, h_variant, max_rows: int | None, stop, callback):
        self.model, self.tokens, self.y, self.test_tok, self.test_y = model, tokens, y, test_tok, test_y
        self.objective, self.h_variant, self.stop, self.callback = objective, h_variant, stop, callback
        self.max_rows = max_rows
        self.rows = tokens.shape[0] + (test_tok.shape[0] if test_tok is not None else 0)
        self.classes = int(y.max()) + 1
        self.done = 0
        self.total = 0

    def __call__(self, prompts: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        values, accs = [], []
        self.total = max(self.total, self.done + prompts.shape[0])
        per = max(1, chunk_rows(self.model, prompts, self.tokens, self.max_rows) // max(1, self.rows))
        for s in range(0, prompts.shape[0], per):
            if self.stop():
                raise StopRequested()
            chunk = prompts[s : s + per]
            feats = prompt_features(self.model, self.tokens, chunk, batch_size=self.tokens.shape[0])
            if self.test_tok is not None:
                test = prompt_features(self.model, self.test_tok, chunk, batch_size=self.test_tok.shape[0])
            with one_thread():  # small float64 solves (core.metrics.threads)
                values.extend(float(transferability(f, self.y, self.objective, self.h_variant)) for f in feats)
                if self.test_tok is not None:
                    for f, g in zip(feats, test, strict=True):
                        pred = lda_log_proba(f.double(), self.y, g.double(), self.classes).argmax(1)
                        accs.append(float((pred == self.test_y).double().mean()))
            self.done += chunk.shape[0]
            if self.callback:
                self.callback(self.done, self.total)
        return np.asarray(values), np.asarray(accs)
