"""The weight optimisers: each a small object with two steps, ``propose`` (the next weights from the current point)
and ``update`` (keep the new point or not), so the fit's loop is the same for every optimiser.

On the simplex (the paper's average):

- :class:`ExponentiatedGradient` (``"eg"``, default): mirror ascent, ``alpha <- alpha * exp(eta g / |g|_inf)``
  renormalised, with the gradient centred; monotone: a step is kept only when it raises ``J``, otherwise the step
  size halves.
- :class:`AdamOnLogits` (``"adam"``): Adam on ``theta`` with ``alpha = softmax(theta)``; every step is taken.

On a box ``[0, upper]^M`` (task arithmetic, layer-wise):

- :class:`ProjectedAscent` (``"eg"``): ``w <- clip(w + eta g / |g|_inf)`` with the gradient projected on the box,
  monotone as EG is.
- :class:`AdamOnBox` (``"adam"``): Adam on ``w``, clipped to the box after every step.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..registry import Registry
from .objective import Point

#: The weight optimisers: each ``(lr, tol, start point, domain, upper) -> WeightOptimizer`` for the rule's domain
#: (``"simplex"`` or ``"box"``); ``default_lr``: the step size when none is given.
OPTIMIZERS: Registry = Registry("weight optimiser", default="eg")
Optimizer = str  # a name in OPTIMIZERS


class WeightOptimizer(Protocol):
    step_size: float
    converged: bool

    def propose(self, cur: Point) -> torch.Tensor | None:
        """The weights to evaluate next, or None when no direction is left (then ``converged``)."""

    def update(self, cur: Point, new: Point) -> tuple[Point, bool]:
        """The point to continue from and whether ``new`` was accepted; sets ``converged``."""


class ExponentiatedGradient:
    """EG with step size ``lr`` (the largest change of a log-weight per step), halved on every rejected step.

    Converged when a kept step raises ``J`` by less than ``tol``, when the step size falls below ``lr / 64``, or
    when the centred gradient is 0."""

    def __init__(self, lr: float, tol: float):
        self.lr, self.tol = lr, tol
        self.step_size = lr
        self.converged = False

    def propose(self, cur: Point) -> torch.Tensor | None:
        g = cur.grad - cur.grad.mean()
        scale = g.abs().max()
        if scale <= 0:
            self.converged = True
            return None
        prop = cur.weights * torch.exp(self.step_size * g / scale)
        return prop / prop.sum()

    def update(self, cur: Point, new: Point) -> tuple[Point, bool]:
        if new.objective >= cur.objective:
            if new.objective - cur.objective < self.tol:
                self.converged = True
            return new, True
        self.step_size /= 2
        if self.step_size < self.lr / 64:
            self.converged = True
        return cur, False


class AdamOnLogits:
    """Adam (learning rate ``lr``) on ``theta = log(alpha)`` of the start; converged when ``J`` moves by less than
    ``tol`` over three steps."""

    def __init__(self, lr: float, tol: float, start: Point):
        self.step_size, self.tol = lr, tol
        self.theta = torch.log(start.weights).clone().requires_grad_(True)
        self._adam = torch.optim.Adam([self.theta], lr=lr)
        self._moves: list[float] = []
        self.converged = False

    def propose(self, cur: Point) -> torch.Tensor:
        self._adam.zero_grad()
        # dJ/dtheta through alpha = softmax(theta): J' = a * (g - <a, g>); Adam minimises, so the sign flips.
        a = cur.weights
        self.theta.grad = -(a * (cur.grad - (a * cur.grad).sum()))
        self._adam.step()
        return torch.softmax(self.theta.detach(), 0)

    def update(self, cur: Point, new: Point) -> tuple[Point, bool]:
        self._moves.append(abs(new.objective - cur.objective))
        if len(self._moves) >= 3 and max(self._moves[-3:]) < self.tol:
            self.converged = True
        return new, True


def projected(grad: torch.Tensor, w: torch.Tensor, upper: float) -> torch.Tensor:
    """The gradient with the components that would leave the box ``[0, upper]`` set to 0."""
    out_low = (w <= 0) & (grad < 0)
    out_high = (w >= upper) & (grad > 0)
    return torch.where(out_low | out_high, torch.zeros_like(grad), grad)


class ProjectedAscent:
    """Monotone projected gradient ascent on ``[0, upper]^M`` with step size ``lr`` (the largest change of a weight
    per step), halved on every rejected step; converged as :class:`ExponentiatedGradient` is, or when the projected
    gradient is 0 (a corner the objective pushes against)."""

    def __init__(self, lr: float, tol: float, upper: float):
        self.lr, self.tol, self.upper = lr, tol, upper
        self.step_size = lr
        self.converged = False

    def propose(self, cur: Point) -> torch.Tensor | None:
        g = projected(cur.grad, cur.weights, self.upper)
        scale = g.abs().max()
        if scale <= 0:
            self.converged = True
            return None
        return (cur.weights + self.step_size * g / scale).clamp(0.0, self.upper)

    update = ExponentiatedGradient.update


class AdamOnBox:
    """Adam (learning rate ``lr``) on the weights, clipped to ``[0, upper]`` after every step; converged as
    :class:`AdamOnLogits` is."""

    def __init__(self, lr: float, tol: float, start: Point, upper: float):
        self.step_size, self.tol, self.upper = lr, tol, upper
        self.w = start.weights.clone().requires_grad_(True)
        self._adam = torch.optim.Adam([self.w], lr=lr)
        self._moves: list[float] = []
        self.converged = False

    def propose(self, cur: Point) -> torch.Tensor:
        self._adam.zero_grad()
        self.w.grad = -cur.grad.clone()
        self._adam.step()
        with torch.no_grad():
            self.w.clamp_(0.0, self.upper)
        return self.w.detach().clone()

    update = AdamOnLogits.update


def make_optimizer(name: Optimizer, lr: float, tol: float, start: Point, domain: str = "simplex",
                   upper: float = 1.0) -> WeightOptimizer:
    return OPTIMIZERS[name](lr, tol, start, domain, upper)


@OPTIMIZERS.register("eg", help="exponentiated gradient on the simplex (projected ascent on a box); keeps a step only "
                     "when it raises the objective", default_lr=0.5)
def _eg(lr: float, tol: float, start: Point, domain: str, upper: float) -> WeightOptimizer:
    return ProjectedAscent(lr, tol, upper) if domain == "box" else ExponentiatedGradient(lr, tol)


@OPTIMIZERS.register("adam", help="Adam on the weights' logits (on a box: on the weights, clipped)", default_lr=0.1)
def _adam(lr: float, tol: float, start: Point, domain: str, upper: float) -> WeightOptimizer:
    return AdamOnBox(lr, tol, start, upper) if domain == "box" else AdamOnLogits(lr, tol, start)
