"""The objective of the ensemble weights, as a pure function of the weights on one target sample.

    J(w) = T( f(X; P(w)), y ) - lambda * R(c(w)),   P(w) = base + sum_m w_m B_m

``T`` is a transferability objective (:mod:`core.metrics.transferability`; the shrinkage H-score by default),
``P(w)`` a mixing rule (:mod:`core.method.mixing`; the paper's average: ``base = 0``, ``B_k = P_k``) and ``c(w)``
the mixture's composition over the sources, which the regulariser weighs. :class:`Objective` evaluates ``J`` and
its gradient with respect to ``w`` with one forward-backward of the target sample and returns a :class:`Point`.
The regulariser ``R`` depends only on the source pass, measured once (:mod:`core.method.source_pass`).

Fits on the same target sample and prompts (another lambda, another regulariser) evaluate some points in common (the
uniform point, a common start). A :class:`PointMemo` shared between their objectives keeps the H-score part of
those points, so the model runs once for them; it is explicit, owned by whoever shares it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserInputError
from ..io.digest import tensor_digest
from ..metrics.h_score import H_VARIANTS, HScoreVariant
from ..metrics.transferability import OBJECTIVES, Transferability, transferability
from ..model.tokens import Target
from .gradients import prompt_gradients
from .mixing import Rule, make_rule
from .regularizers import Regularizer
from .source_pass import SourcePass


@dataclass(frozen=True)
class Point:
    """The objective at one weight vector ``weights: (K,)`` (float64)."""

    weights: torch.Tensor
    hscore: float
    regularizer: float
    objective: float  # hscore - lambda * regularizer
    features: torch.Tensor  # (N, D) the target features under P(weights)
    grad: torch.Tensor | None = None  # (K,) dJ/dweights; None for a vertex read from the source pass


class PointMemo:
    """H-score evaluations kept for other objectives on the same target sample and prompts.

    Keyed by what an evaluation depends on (the sample's tokens and labels, the basis, the H-score variant, the chunk
    size) and the weights. Only points that every fit evaluates are put in (see :meth:`Objective.__call__`), so it
    stays a few feature matrices however long the fits run."""

    def __init__(self) -> None:
        self._points: dict[tuple, tuple[float, torch.Tensor, torch.Tensor]] = {}

    def get(self, key: tuple):
        return self._points.get(key)

    def put(self, key: tuple, value: tuple[float, torch.Tensor, torch.Tensor]) -> None:
        self._points[key] = value

    def keys(self) -> list[tuple]:
        return list(self._points)

    def __len__(self) -> int:
        return len(self._points)


def combine_prompts(weights: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k P_k`` for ``weights: (K,)`` and ``prompts: (K, *S)`` -> ``(*S)``."""
    return torch.tensordot(weights.to(prompts.dtype), prompts, dims=1)


class Objective:
    """``J`` on one target sample: ``model``, the ``target`` (:class:`core.model.tokens.Target`: frozen tokens
    ``(N, P + L, D)``, labels ``0..C-1``), a mixing ``rule`` (a :class:`core.method.mixing.Rule`, or a stack
    ``(K, *S)`` for the paper's average), the ``source`` pass, ``lam`` and the ``regularizer``; ``objective`` the
    transferability measure (``h_variant`` its H-score variant). ``vertex_values``: the objective at each single
    source (default: the source pass's H-scores).

    Calling it with weights ``w`` returns the :class:`Point` at ``w`` and changes nothing: the same weights always
    give the same point. At ``lam = 0`` the regulariser does not enter ``J``; when the source pass lacks what it
    needs (it was not measured, as nothing needed it), ``Point.regularizer`` is NaN."""

    def __init__(self, model, target: Target, rule: Rule | torch.Tensor, source: SourcePass, lam: float,
                 regularizer: Regularizer, h_variant: HScoreVariant = H_VARIANTS.default, chunk_size: int | None = None,
                 memo: PointMemo | None = None, objective: Transferability = OBJECTIVES.default,
                 vertex_values: torch.Tensor | None = None):
        self.model, self.target = model, target
        self.rule = rule if isinstance(rule, Rule) else make_rule("average", torch.as_tensor(rule).float(), None)
        self.source = source
        self.lam, self.regularizer, self.h_variant, self.chunk_size = lam, regularizer, h_variant, chunk_size
        self.objective = objective
        self.memo = memo
        self.vertex_values = source.source_hscores if vertex_values is None else vertex_values
        self._measures_r = lam != 0 or source.has(regularizer)
        # What an evaluation depends on besides the weights, hashed once per objective.
        base = self.rule.base
        self._key = (tensor_digest(target.tokens), tensor_digest(target.labels), tensor_digest(self.rule.basis),
                     None if base is None else tensor_digest(base), h_variant, chunk_size, objective)

    @property
    def k(self) -> int:
        return self.rule.k

    @property
    def basis(self) -> torch.Tensor:
        return self.rule.basis

    def prompt(self, alpha: torch.Tensor) -> torch.Tensor:
        """``P(w)``, ``(*S)`` float32."""
        return self.rule.prompt(alpha)

    def __call__(self, alpha: torch.Tensor, share: bool = False) -> Point:
        """``J`` and ``dJ/dw`` at ``w``: one forward-backward of the sample (none when the memo has it).

        ``share``: keep the objective's part in the memo for other objectives (the points every fit evaluates)."""
        alpha = alpha.detach().double()
        h, g_h, features = self._score(alpha, share)
        return self._point(alpha, h, g_h, features)

    def vertex(self, i: int) -> Point:
        """The single source ``i``, from the source pass (no forward): every regulariser is 0 at a single source."""
        h = float(self.vertex_values[i])
        return Point(self.rule.single(i), h, 0.0, h, self.source.features[i])

    def vertex_with_grad(self, i: int) -> Point:
        """The single source ``i`` with ``dJ/dw``: from the source pass's gradient when it is this objective's (the
        H-score of the same variant, ``grad_loss="hscore"``), with no forward; otherwise one evaluation, shared."""
        alpha = self.rule.single(i)
        src = self.source
        if not (self.objective == "hscore" and src.loss == "hscore" and src.h_variant == self.h_variant):
            return self(alpha, share=True)
        return self._point(alpha, float(self.vertex_values[i]), self._weight_grad(src.grads[i], alpha),
                           src.features[i])

    def _point(self, alpha: torch.Tensor, h: float, g_h: torch.Tensor, features: torch.Tensor) -> Point:
        if not self._measures_r:  # lam = 0 and nothing measured for R: it does not enter J
            return Point(alpha, h, float("nan"), h, features, g_h)
        a = alpha.clone().requires_grad_(True)
        reg = self.source.regularizer(self.rule.composition(a), self.regularizer)
        (g_r,) = torch.autograd.grad(reg, [a]) if reg.requires_grad else (torch.zeros_like(a),)
        grad = g_h - self.lam * g_r
        if not torch.isfinite(grad).all():
            raise UserInputError("the ensemble weights' gradient became non-finite; lower lr or lam, or check the "
                                 "target features.")
        return Point(alpha, h, reg.item(), h - self.lam * reg.item(), features, grad)

    def _weight_grad(self, prompt_grad: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """``dT/dw_m = <dT/dP, B_m>`` from ``prompt_grad``, the prompt gradient of ``-T`` (as the losses are)."""
        m = self.basis.shape[0]
        return -(self.basis.double() * prompt_grad.double().cpu()).reshape(m, -1).sum(1).reshape(alpha.shape)

    def _score(self, alpha: torch.Tensor, share: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
        key = (self._key, tensor_digest(alpha))
        if self.memo is not None and (hit := self.memo.get(key)) is not None:
            return hit
        p_alpha = self.prompt(alpha).to(self.model.device)
        t, variant, objective = self.target, self.h_variant, self.objective
        out = prompt_gradients(self.model, t.tokens, p_alpha[None],
                               lambda f: -transferability(f[0], t.labels, objective, variant, t.n_classes).reshape(1),
                               chunk_size=self.chunk_size)
        point = (-float(out.losses[0]), self._weight_grad(out.grads[0], alpha), out.features[0].cpu())
        if share and self.memo is not None:
            self.memo.put(key, point)
        return point
