"""Mixing rules: how weights turn K source prompts into one prompt.

Every source prompt tuned from one shared start ``P0`` (the bank records it) is ``P_k = P0 + tau_k``, a task vector
(Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023). The rules, each linear in its weights,
``P(w) = base + sum_m w_m B_m``:

- ``"average"`` (the paper's): ``sum_k a_k P_k`` with ``a`` on the simplex, ``= P0 + sum_k a_k tau_k``: a mixture
  shrinks every source's change by its weight (model merging's weight averaging).
- ``"task_arithmetic"``: ``P0 + sum_k l_k tau_k`` with ``l`` in the box ``[0, lambda_max]^K``, not on the simplex:
  every source keeps its full change at ``l_k = 1``, and the full-strength sum is a candidate.
- ``"layerwise"`` (deep prompts): ``P0[b] + sum_k l_kb tau_k[b]``, one weight per source and block, as layer-wise
  AdaMerging (Yang et al., ICLR 2024) learns one coefficient per task and layer, clamped to ``[0, 1]``.

TIES-Merging (Yadav et al., NeurIPS 2023) is a fixed rule, compared beside them: trim each ``tau_k`` to its largest
``density`` share of entries by magnitude, elect a sign per entry by the summed trimmed mass, and average only the
entries that agree with it (:func:`ties_merge`).

At a single source (``a = e_k``; ``l = e_k``; ``l_k. = 1``) every rule gives ``P_k`` exactly (tested): the task
vectors and the sums are computed in float64 and only then rounded to the prompts' float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import UserInputError
from ..registry import Registry

#: The mixing rules: each ``(stack (K, *S), start (*S) or None, upper) -> Rule``; ``needs_start``: the rule is
#: defined on task vectors, so the bank must record its shared start ``P0``.
MIXING_RULES: Registry = Registry("mixing rule", default="average")
Mixing = str  # a name in MIXING_RULES
NO_START = ("the bank does not record the shared start P0 its prompts were tuned from, so their task vectors P_k - P0 "
            "are undefined; rebuild it with `python -m core build-bank` (which records P0), give the start "
            "(fit(..., shared_start=P0)), or use mixing='average'.")


@dataclass(frozen=True)
class Rule:
    """A linear mixing rule: ``P(w) = base + sum_m w_m basis_m`` for weights ``w`` of ``shape`` in ``domain``."""

    name: str
    basis: torch.Tensor  # (M, *S)
    base: torch.Tensor | None  # (*S) or None (zero)
    shape: tuple[int, ...]  # the weights' shape: (K,) or (K, depth)
    domain: Literal["simplex", "box"]
    upper: float = 1.0  # the box's upper bound

    @property
    def k(self) -> int:
        return self.shape[0]

    def prompt(self, w: torch.Tensor) -> torch.Tensor:
        """``P(w)`` as float32, ``(*S)``."""
        w = torch.as_tensor(w).reshape(-1)
        if self.base is None:  # the paper's rule, exactly as it always was computed
            return torch.tensordot(w.to(self.basis.dtype).float(), self.basis.float(), dims=1)
        return (self.base + torch.tensordot(w.double(), self.basis, dims=1)).float()

    def composition(self, w: torch.Tensor) -> torch.Tensor:
        """How much of each source is in the mixture, on the simplex ``(K,)`` (what the regularisers weigh)."""
        per = w.reshape(self.k, -1).sum(1) if len(self.shape) > 1 else w
        if self.domain == "simplex":
            return per
        total = per.sum()
        return per / total if float(total.detach()) > 0 else torch.full_like(per, 1.0 / self.k)

    def single(self, i: int) -> torch.Tensor:
        """The weights that give source ``i`` alone."""
        w = torch.zeros(self.shape, dtype=torch.float64)
        w[i] = 1.0
        return w

    def candidates(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The points scored before optimising: every single source, the uniform average, and (task arithmetic)
        the full-strength sum."""
        out = {n: self.single(i) for i, n in enumerate(names)}
        out["uniform"] = torch.full(self.shape, 1.0 / self.k, dtype=torch.float64)
        if self.domain == "box":
            out["sum"] = torch.full(self.shape, min(1.0, self.upper), dtype=torch.float64)
        return out


def task_vectors(stack: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``tau_k = P_k - P0``, ``(K, *S)``, in float64."""
    if tuple(start.shape) != tuple(stack.shape[1:]):
        raise UserInputError(f"the shared start has shape {tuple(start.shape)} but the prompts have shape "
                             f"{tuple(stack.shape[1:])}; give the start the prompts were tuned from.")
    return stack.double() - start.double()[None]


def make_rule(mixing: Mixing, stack: torch.Tensor, start: torch.Tensor | None, upper: float = 1.0) -> Rule:
    """The rule ``mixing`` over ``stack: (K, *S)`` with shared start ``start`` (needed by every rule but the
    average)."""
    build = MIXING_RULES[mixing]
    if start is None and MIXING_RULES.attr(mixing, "needs_start"):
        raise UserInputError(f"mixing={mixing!r} needs the shared start: " + NO_START)
    return build(stack, start, upper)


@MIXING_RULES.register("average", help="the paper's rule: a weighted average of the prompts, weights on the simplex "
                       "(shrinks every source)", needs_start=False, domain="simplex")
def average(stack: torch.Tensor, start: torch.Tensor | None, upper: float = 1.0) -> Rule:
    return Rule("average", stack, None, (stack.shape[0],), "simplex")


@MIXING_RULES.register("task_arithmetic", help="P0 + sum_k l_k (P_k - P0), each l_k in [0, lambda_max]: every source "
                       "can keep its full change", needs_start=True, domain="box")
def task_arithmetic(stack: torch.Tensor, start: torch.Tensor, upper: float = 1.0) -> Rule:
    return Rule("task_arithmetic", task_vectors(stack, start), start.double(), (stack.shape[0],), "box", upper)


@MIXING_RULES.register("layerwise", help="task arithmetic with one weight per source and block (deep prompts)",
                       needs_start=True, domain="box")
def layerwise(stack: torch.Tensor, start: torch.Tensor, upper: float = 1.0) -> Rule:
    taus = task_vectors(stack, start)
    if stack.dim() != 4:
        raise UserInputError("mixing='layerwise' needs deep prompts (one set per block, (depth, T, D)); these are "
                             "shallow: use mixing='task_arithmetic'.")
    k, depth = stack.shape[0], stack.shape[1]
    basis = torch.zeros(k * depth, *stack.shape[1:], dtype=torch.float64)
    for i in range(k):
        for b in range(depth):
            basis[i * depth + b, b] = taus[i, b]
    return Rule("layerwise", basis, start.double(), (k, depth), "box", upper)


def ties_merge(stack: torch.Tensor, start: torch.Tensor | None, density: float = 0.2,
               scale: float = 1.0) -> torch.Tensor:
    """TIES-Merging of the sources' task vectors: ``P0 + scale * merged`` (float32, ``(*S)``), as the authors' code
    (prateeky2806/ties-merging) does it.

    Trim: keep the entries of each ``tau_k`` at or above its ``(d - int(d * density))``-th smallest magnitude (about
    the ``density`` share with the largest magnitude; all of them at density 1). Elect: the sign of the summed
    trimmed vectors per entry, a tie resolved by the sign of the whole sum. Disjoint merge: the mean of the kept
    entries whose sign agrees with the elected one (entries no source keeps stay 0)."""
    if start is None:
        raise UserInputError("TIES-Merging needs the shared start: " + NO_START)
    if not 0 < density <= 1:
        raise UserInputError(f"density must be in (0, 1], got {density!r}.")
    taus = task_vectors(stack, start).reshape(stack.shape[0], -1)
    d = taus.shape[1]
    k = d - int(d * density)
    if k < 1:
        trimmed = taus
    else:
        threshold = taus.abs().kthvalue(k, dim=1, keepdim=True).values
        trimmed = torch.where(taus.abs() >= threshold, taus, torch.zeros_like(taus))
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign[None] > 0, trimmed > 0, trimmed < 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)
    return (start.double() + scale * merged.reshape(start.shape)).float()
