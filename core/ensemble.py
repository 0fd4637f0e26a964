"""HGPrompt: learning ensemble weights over source prompts.

Zhang et al., "Learning Optimal Prompt Ensemble for Multi-source Visual Prompt
Transfer" (arXiv 2504.12311, AAAI 2026). One weight per source prompt, ``alpha``
on the probability simplex, maximising

    J(alpha) = H_s( f(X; P(alpha)), y ) - lambda * R(alpha),   P(alpha) = sum_k alpha_k P_k

where ``H_s`` is the shrinkage H-score of the prompt-induced target features
and ``R`` a regulariser from the sources' gradients (:mod:`core.conflicts`).
``R`` depends only on quantities at the fixed source prompts, so it is
computed once, before the loop; each step is then one forward-backward of the
target sample with ``P(alpha)``.

The fit reads as its stages: prepare the target, the source pass, the
candidates (every single source and the uniform point), optimise from the best
candidate, finish. ``J`` is non-convex on the simplex; the optimiser keeps the
best point it has evaluated, vertices included, so the result is never worse
than the best single source or the uniform average.
"""
from __future__ import annotations

import hashlib
import math
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch

from .conflicts import GRAD_LOSSES, ConflictResult, check_regularizer, gradient_conflicts
from .control import stop_flag
from .data import stratified_subset
from .errors import UserInputError
from .gradients import prompt_gradients
from .h_score import VARIANTS, h_score, ledoit_wolf_shrinkage, resolve_n_samples, sample_size_warning
from .interference import hscores_at, target_tokens

Callback = Callable[[dict[str, Any]], None]
OPTIMIZERS = ("eg", "adam")
DEFAULT_LR = {"eg": 0.5, "adam": 0.1}


def combine_prompts(weights: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k P_k`` for ``weights: (K,)`` and ``prompts: (K, *S)`` -> ``(*S)``."""
    return torch.tensordot(weights.to(prompts.dtype), prompts, dims=1)


class HGPromptEnsemble:
    """Learn ensemble weights on the simplex over K source prompts for a target task.

    Parameters (stored as given; checked in :meth:`fit`):

    - ``lam``: weight of the regulariser, ``>= 0``; 0 is the H-score-only ablation.
    - ``regularizer``: ``"fishr"`` (default), ``"conflict"`` or ``"interference"`` (:mod:`core.conflicts`).
    - ``h_variant``: H-score variant, ``"shrinkage"`` (default), ``"pinv"`` or ``"trace_ratio"``.
    - ``grad_loss``: target loss of the gradients whose cosines are reported, ``"hscore"`` or ``"ce"``.
    - ``optimizer``: ``"eg"`` (exponentiated gradient on the simplex, a step is kept only when it raises
      ``J``, else the step size halves) or ``"adam"`` (Adam on ``theta`` with ``alpha = softmax(theta)``).
    - ``start``: ``"best"`` (default) starts from the best candidate; ``"uniform"`` from the uniform point
      (to watch the whole trajectory). Either way the best point evaluated is returned.
    - ``steps``: most optimisation steps; the fit ends earlier once converged (``tol``).
    - ``lr``: step size (EG: the largest change of a log-weight per step; Adam: its learning rate);
      None for the optimiser's default (0.5 for EG, 0.1 for Adam).
    - ``tol``: converged when a kept step raises ``J`` by less than ``tol`` (EG), or ``J`` changes by less
      than ``tol`` over three steps (Adam), or the EG step size falls below ``lr / 64``.
    - ``n_samples``: target training samples (class-stratified subset); ``"auto"`` (default): enough that
      N > D (:func:`core.h_score.default_n_samples`); None for all.
    - ``chunk_size``: bound memory by running forward/backward in chunks (same result).
    - ``seed``: makes the subset and so the result deterministic.

    After :meth:`fit`: ``weights_`` ``(K,)``, ``history_`` (one dict per step: ``step``, ``weights``,
    ``hscore``, ``regularizer``, ``objective``, ``accepted``, ``step_size``; the last row is the returned
    point), ``candidates_`` (objective of each single source and of the uniform point), ``start_`` (the
    candidate the optimiser started from), ``converged_``, ``conflicts_`` (:class:`ConflictResult`),
    ``source_hscores_``, ``names_``, ``prompt_`` (the ensembled prompt), ``shrinkage_`` (the Ledoit-Wolf
    coefficient of the H-score at the returned point), ``warnings_``, ``stopped_``, ``n_steps_``,
    ``fit_seconds_``.
    """

    def __init__(
        self,
        lam: float = 1.0,
        regularizer: str = "fishr",
        h_variant: str = "shrinkage",
        grad_loss: str = "hscore",
        optimizer: str = "eg",
        start: str = "best",
        steps: int = 30,
        lr: float | None = None,
        tol: float = 1e-4,
        n_samples: int | str | None = "auto",
        chunk_size: int | None = None,
        seed: int = 0,
    ):
        self.lam = lam
        self.regularizer = regularizer
        self.h_variant = h_variant
        self.grad_loss = grad_loss
        self.optimizer = optimizer
        self.start = start
        self.steps = steps
        self.lr = lr
        self.tol = tol
        self.n_samples = n_samples
        self.chunk_size = chunk_size
        self.seed = seed

    PARAMS = ("lam", "regularizer", "h_variant", "grad_loss", "optimizer", "start", "steps", "lr", "tol", "n_samples",
              "chunk_size", "seed")

    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.PARAMS}

    def _validate(self) -> None:
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise UserInputError(f"lam must be a finite number >= 0, got {self.lam!r}; use 0 for the H-score-only ablation.")
        check_regularizer(self.regularizer)
        if self.h_variant not in VARIANTS:
            raise UserInputError(f"h_variant must be one of {VARIANTS}, got {self.h_variant!r}.")
        if self.grad_loss not in GRAD_LOSSES:
            raise UserInputError(f"grad_loss must be one of {GRAD_LOSSES}, got {self.grad_loss!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise UserInputError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if self.start not in ("best", "uniform"):
            raise UserInputError(f"start must be 'best' (the best single source or the uniform point) or 'uniform', got {self.start!r}.")
        if not (isinstance(self.steps, int) and 0 <= self.steps <= 100_000):
            raise UserInputError(f"steps must be an integer in 0..100000, got {self.steps!r}.")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise UserInputError(f"lr must be a number > 0 (or None for the optimiser's default), got {self.lr!r}.")
        if not (isinstance(self.tol, (int, float)) and math.isfinite(self.tol) and self.tol >= 0):
            raise UserInputError(f"tol must be a number >= 0, got {self.tol!r}.")
        if self.n_samples != "auto" and self.n_samples is not None and not (isinstance(self.n_samples, int) and self.n_samples >= 2):
            raise UserInputError(f"n_samples must be 'auto', an integer >= 2 or None (all), got {self.n_samples!r}.")
        if self.chunk_size is not None and not (isinstance(self.chunk_size, int) and self.chunk_size >= 1):
            raise UserInputError(f"chunk_size must be an integer >= 1 or None, got {self.chunk_size!r}.")

    # -------------------------------------------------------------------- fit
    def fit(
        self,
        model,
        prompts,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        task=None,
        callback: Callback | None = None,
        should_stop: Any = None,
        names: list[str] | None = None,
        conflicts: ConflictResult | None = None,
    ) -> "HGPromptEnsemble":
        """Learn the weights of ``prompts`` (a :class:`PromptBank` or a stack ``(K, *S)``) on a target.

        The target is either ``images: (N, C, H, W)`` with ``labels: (N,)``, or
        a :class:`core.data.Task` (its train split, preprocessed with the
        backbone's transform). ``callback(info)`` is called with every source's
        H-score before the source pass (stage ``"sources"``), after it, and after every step; ``should_stop()`` (or a ``threading.Event``)
        is polled before every step and ends the fit early, keeping the best
        point so far (``stopped_`` is then True). ``conflicts`` reuses the
        source pass (``conflicts_``) of an earlier fit on the same prompts and
        target sample, e.g. to compare several ``lam`` values.
        """
        self._validate()
        self._t0 = time.perf_counter()
        stop = stop_flag(should_stop)
        self.lr_ = self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]
        bank = self._prepare_prompts(model, prompts, names)
        self._prepare_target(model, images, labels, task)
        # What an H-score evaluation depends on besides the weights: the key of the points shared between fits.
        self._points_key = (_digest(self._tokens), _digest(self._labels), _digest(bank), self.h_variant, self.chunk_size)
        if callback:
            self._announce_sources(model, bank, callback)
        self._source_pass(model, bank, conflicts)
        if callback:
            callback({"stage": "conflicts", "step": 0, "steps": self.steps, "cosine": self.conflicts_.cosine.tolist(),
                      "source_hscores": self.source_hscores_.tolist(), "names": self.names_,
                      "candidates": self.candidates_})
        start = self._candidates(model, bank)
        self._optimise(model, bank, start, callback, stop)
        self._finish(bank)
        return self

    # ------------------------------------------------------------ the stages
    def _prepare_prompts(self, model, prompts, names) -> torch.Tensor:
        if hasattr(prompts, "stack"):
            prompts.check_compatible(model)
            names = names or prompts.names
            prompts = prompts.stack()
        prompts = torch.as_tensor(prompts).float()
        if prompts.dim() not in (3, 4):
            raise UserInputError(f"prompts must be a stack (K, T, D) or (K, depth, T, D), got {tuple(prompts.shape)}.")
        k = prompts.shape[0]
        if k < 1:
            raise UserInputError("give at least one source prompt.")
        model.check_prompt(prompts[0], "prompts")
        self.names_ = list(names) if names is not None else [f"source_{i}" for i in range(k)]
        if len(self.names_) != k:
            raise UserInputError(f"{len(self.names_)} names for {k} prompts; give one name per prompt.")
        return prompts

    def _prepare_target(self, model, images, labels, task) -> None:
        """Embed a class-stratified sample of the target once: every later pass starts from these tokens."""
        if task is not None:
            if images is not None:
                raise UserInputError("give the target either as a task or as images and labels, not both.")
            n = self._n_samples(model, len(task.splits["train"]))
            self._tokens, self._labels = target_tokens(model, task, None, n, self.seed)
        else:
            if images is None or labels is None:
                raise UserInputError("give the target task, or the target images and their labels.")
            labels = torch.as_tensor(labels)
            if len(images) != len(labels):
                raise UserInputError(f"{len(images)} target images but {len(labels)} labels; give one label per image.")
            idx = stratified_subset(labels.numpy(), self._n_samples(model, len(labels)), self.seed)
            self._tokens, self._labels = target_tokens(model, images[idx], labels[idx], None, self.seed)
        self.n_target_samples_ = int(self._tokens.shape[0])
        self.warnings_: list[str] = []
        msg = sample_size_warning(self.n_target_samples_, model.embed_dim, self.h_variant)
        if msg:
            self.warnings_.append(msg)
            if self.h_variant == "pinv":  # no signal at all; the shrinkage estimate is only less reliable
                warnings.warn(msg, stacklevel=3)

    def _n_samples(self, model, available: int) -> int | None:
        return resolve_n_samples(self.n_samples, model.embed_dim, available)

    def _announce_sources(self, model, bank: torch.Tensor, callback) -> None:
        """For a live view: every source's H-score from one forward pass (no gradients), before the gradient pass.

        The best of them is the best point evaluated so far, reported as ``weights``. Only when a callback is given:
        it costs one batched forward of the K prompts (about a second for the embedded default on 2 CPU cores)."""
        with torch.no_grad():
            h = hscores_at(model, self._tokens, self._labels, bank.to(self._tokens.device), self.h_variant)
        best = int(h.argmax())
        callback({"stage": "sources", "step": 0, "steps": self.steps, "names": self.names_,
                  "source_hscores": h.tolist(), "weights": [float(i == best) for i in range(len(h))],
                  "hscore": float(h[best])})

    def _source_pass(self, model, bank: torch.Tensor, conflicts: ConflictResult | None) -> None:
        """Gradients (and what the regulariser needs) at every source prompt, in one batched pass."""
        k = bank.shape[0]
        if conflicts is not None:  # the source pass of an earlier fit on the same prompts and target sample
            if conflicts.grads.shape[0] != k or not conflicts.has(self.regularizer):
                raise UserInputError(
                    f"the given conflicts are for {conflicts.grads.shape[0]} prompts and do not hold what "
                    f"regularizer={self.regularizer!r} needs; this fit has {k} prompts. Drop conflicts= to recompute."
                )
            self.conflicts_ = conflicts
        else:
            self.conflicts_ = gradient_conflicts(
                model, None, self._labels, bank, loss=self.grad_loss, h_variant=self.h_variant,
                fishr=self.regularizer == "fishr", chunk_size=self.chunk_size, tokens=self._tokens,
            )
            if self.regularizer == "interference":
                from .interference import mixing_loss, segment_hscores

                t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
                seg = segment_hscores(model, self._tokens, self._labels, bank, t, self.conflicts_.source_hscores, self.h_variant)
                self.conflicts_.mixing_loss = mixing_loss(seg, t).float()
        self.source_hscores_ = self.conflicts_.source_hscores.numpy()
        # Every regulariser is 0 at a vertex: a single source's objective is its H-score.
        self.candidates_ = {name: float(h) for name, h in zip(self.names_, self.source_hscores_)}

    def _candidates(self, model, bank: torch.Tensor) -> tuple[str, torch.Tensor]:
        """Evaluate the uniform point; return the best candidate (its name and the point to start from)."""
        k = bank.shape[0]
        uniform = torch.full((k,), 1.0 / k, dtype=torch.float64)
        self._best = None
        self._uniform = self._evaluate(model, bank, uniform, share=True)
        self.candidates_["uniform"] = self._uniform["objective"]
        for i, name in enumerate(self.names_):
            vertex = torch.zeros(k, dtype=torch.float64)
            vertex[i] = 1.0
            self._keep({"alpha": vertex, "objective": self.candidates_[name], "hscore": float(self.source_hscores_[i]),
                        "regularizer": 0.0, "features": self.conflicts_.features[i]})
        self._keep(self._uniform)
        best = max(self.candidates_, key=self.candidates_.get) if self.start == "best" else "uniform"
        if best == "uniform" or k == 1:
            return best, uniform
        return best, torch.eye(k, dtype=torch.float64)[self.names_.index(best)]

    def _optimise(self, model, bank: torch.Tensor, start: tuple[str, torch.Tensor], callback, stop) -> None:
        self.start_, alpha = start
        k = bank.shape[0]
        self.history_: list[dict[str, Any]] = []
        self.stopped_ = self.converged_ = False
        cur = self._uniform if self.start_ == "uniform" else self._evaluate(model, bank, alpha, share=True)
        if self.start_ != "uniform" and k > 1:
            # At a vertex e_i the objective's slope towards vertex j is g_j - g_i. When no slope is positive the
            # vertex is a first-order maximum on the simplex and the fit ends there; otherwise the optimiser starts
            # a little inside (EG cannot leave an exact vertex: zero weights stay zero).
            i = int(alpha.argmax())
            if float((cur["grad"] - cur["grad"][i]).max()) <= 0:
                self.converged_ = True
                self._record(0, cur, True, self.lr_, callback)
                return
            # Step off the vertex towards the vertices the objective rises towards, in proportion to the slope
            # (EG then stays on their face: the others' weights stay zero).
            slope = (cur["grad"] - cur["grad"][i]).clamp_min(0.0)
            inside = (1.0 - 0.05) * alpha + 0.05 * slope / slope.sum()
            cur = self._evaluate(model, bank, inside)
        self._keep(cur)
        step_size = self.lr_
        theta = torch.log(cur["alpha"]).clone().requires_grad_(True)
        adam = torch.optim.Adam([theta], lr=self.lr_) if self.optimizer == "adam" else None
        recent: list[float] = []
        self._record(0, cur, True, step_size, callback)
        if k == 1 or self.steps == 0:
            self.converged_ = k == 1
            return
        for step in range(1, self.steps + 1):
            if stop():
                self.stopped_ = True
                break
            if adam is None:  # exponentiated gradient, monotone: keep a step only when it raises J
                g = cur["grad"] - cur["grad"].mean()
                scale = g.abs().max()
                if scale <= 0:
                    self.converged_ = True
                    break
                prop = cur["alpha"] * torch.exp(step_size * g / scale)
                prop = prop / prop.sum()
                new = self._evaluate(model, bank, prop)
                self._keep(new)
                accepted = new["objective"] >= cur["objective"]
                if accepted:
                    gain = new["objective"] - cur["objective"]
                    cur = new
                    if gain < self.tol:
                        self.converged_ = True
                else:
                    step_size /= 2
                    if step_size < self.lr_ / 64:
                        self.converged_ = True
            else:  # Adam on the logits; the best point seen is kept apart
                adam.zero_grad()
                # dJ/dtheta through alpha = softmax(theta): J' = a * (g - <a, g>).
                a = cur["alpha"]
                theta.grad = -(a * (cur["grad"] - (a * cur["grad"]).sum()))
                adam.step()
                new = self._evaluate(model, bank, torch.softmax(theta.detach(), 0))
                self._keep(new)
                recent.append(abs(new["objective"] - cur["objective"]))
                cur, accepted = new, True
                if len(recent) >= 3 and max(recent[-3:]) < self.tol:
                    self.converged_ = True
            self._record(step, cur, accepted, step_size, callback)
            if self.converged_:
                break

    def _finish(self, bank: torch.Tensor) -> None:
        best = self._best
        self.weights_ = best["alpha"].numpy().astype(np.float64)
        if not np.array_equal(self.weights_, np.asarray(self.history_[-1]["weights"])):
            self._record(self.history_[-1]["step"] + 1, best, True, float("nan"), None, final=True)
        self.history_[-1]["final"] = True
        self.n_steps_ = len(self.history_) - 1
        self.prompt_ = combine_prompts(torch.as_tensor(self.weights_, dtype=torch.float32), bank).cpu()
        self.ensemble_hscore_ = best["hscore"]
        self.objective_ = best["objective"]
        f = best["features"].double()
        self.shrinkage_ = float(ledoit_wolf_shrinkage(f - f.mean(0, keepdim=True))) if self.h_variant == "shrinkage" else None
        self.theta_ = torch.log(best["alpha"].clamp_min(1e-30)).float()
        self.fit_seconds_ = time.perf_counter() - self._t0
        del self._tokens, self._best, self._uniform

    # --------------------------------------------------------------- helpers
    def _evaluate(self, model, bank: torch.Tensor, alpha: torch.Tensor, share: bool = False) -> dict[str, Any]:
        """``J`` at ``alpha`` and its gradient with respect to ``alpha``: one forward-backward of the sample.

        ``share``: keep the H-score part on the source pass for other fits (the points every lambda evaluates)."""
        alpha = alpha.detach().double()
        h, g_h, features = self._hscore_at(model, bank, alpha, share)
        a = alpha.clone().requires_grad_(True)
        reg = self.conflicts_.regularizer(a, self.regularizer)
        (g_r,) = torch.autograd.grad(reg, [a]) if reg.requires_grad else (torch.zeros_like(a),)
        grad = g_h - self.lam * g_r
        if not torch.isfinite(grad).all():
            raise UserInputError("the ensemble weights' gradient became non-finite; lower lr or lam, or check the target features.")
        return {"alpha": alpha, "hscore": h, "regularizer": reg.item(), "objective": h - self.lam * reg.item(),
                "grad": grad, "features": features}

    def _hscore_at(self, model, bank: torch.Tensor, alpha: torch.Tensor, share: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
        """H at ``alpha``, its gradient with respect to ``alpha`` and the features: one forward-backward of the sample.

        With ``share``, kept in the source pass's ``evaluations`` under the target sample, the prompts and ``alpha``:
        another fit that reuses this source pass (another ``lam``) gets the point without a second pass. Only the
        uniform point and the start are kept (the optimiser's later points depend on lambda), so the memory stays
        a few feature matrices per source pass however long the fits run.
        """
        key = (self._points_key, _digest(alpha))
        memo = self.conflicts_.evaluations
        if key in memo:
            return memo[key]
        p_alpha = combine_prompts(alpha.float(), bank).to(model.device)
        labels = self._labels
        out = prompt_gradients(model, self._tokens, p_alpha[None],
                               lambda f: -h_score(f[0], labels, self.h_variant).reshape(1), chunk_size=self.chunk_size)
        # dH/dalpha_k = <dH/dP, P_k>, and the prompt gradient is of -H.
        g_h = -(bank.double() * out.grads[0].double().cpu()).reshape(bank.shape[0], -1).sum(1)
        point = (-float(out.losses[0]), g_h, out.features[0].cpu())
        if share:
            memo[key] = point
        return point

    def _keep(self, point: dict[str, Any]) -> None:
        if self._best is None or point["objective"] > self._best["objective"]:
            self._best = point

    def _record(self, step: int, point: dict[str, Any], accepted: bool, step_size: float, callback, final: bool = False) -> None:
        entry = {"step": step, "weights": point["alpha"].tolist(), "hscore": point["hscore"],
                 "regularizer": point["regularizer"], "objective": point["objective"], "accepted": bool(accepted),
                 "step_size": step_size, "seconds": time.perf_counter() - self._t0}
        if final:
            entry["final"] = True
        self.history_.append(entry)
        if callback:
            callback({"stage": "step", "steps": self.steps, "names": self.names_, **entry})

    def ensemble_prompt(self) -> torch.Tensor:
        """The weighted prompt ``P(alpha*)``; the initialisation of the target prompt."""
        if not hasattr(self, "prompt_"):
            raise UserInputError("call fit() first.")
        return self.prompt_


def _digest(t: torch.Tensor) -> str:
    """A digest of a tensor's shape and values (a cache key part)."""
    a = t.detach().cpu().contiguous()
    return f"{tuple(a.shape)}:{a.dtype}:" + hashlib.sha1(a.numpy().tobytes()).hexdigest()
