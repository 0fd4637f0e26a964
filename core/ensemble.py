"""HGPrompt: learning ensemble weights over source prompts.

Zhang et al., "Learning Optimal Prompt Ensemble for Multi-source Visual Prompt
Transfer" (arXiv 2504.12311, AAAI 2026). One weight per source prompt,
``alpha = softmax(theta)`` on the simplex, maximising

    J(alpha) = H_s( f(X; P(alpha)), y ) - lambda * R(alpha),   P(alpha) = sum_k alpha_k P_k

where ``H_s`` is the shrinkage H-score of the prompt-induced target features
and ``R`` the Gradient Alignment Regulariser (:mod:`core.conflicts`). ``R``
depends on gradients evaluated at the fixed source prompts, so it is computed
once (one batched pass over the K sources) before the loop; each step is then
a single forward-backward of the target batch with ``P(alpha)``.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch

from .control import stop_flag
from .data import stratified_subset
from .conflicts import GRAD_LOSSES, REGULARIZERS, ConflictResult, gradient_conflicts
from .errors import UserInputError
from .gradients import prompt_gradients
from .h_score import VARIANTS, h_score

Callback = Callable[[dict[str, Any]], None]


def combine_prompts(weights: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k P_k`` for ``weights: (K,)`` and ``prompts: (K, *S)`` -> ``(*S)``."""
    return torch.tensordot(weights.to(prompts.dtype), prompts, dims=1)


class HGPromptEnsemble:
    """Learn softmax ensemble weights over K source prompts for a target task.

    Parameters (stored as given; checked in :meth:`fit`):

    - ``lam``: weight of the regulariser, ``>= 0``; 0 is the H-score-only ablation.
    - ``regularizer``: ``"conflict"`` (default) or ``"fisher"``.
    - ``h_variant``: H-score variant, ``"shrinkage"`` (default), ``"pinv"`` or ``"trace_ratio"``.
    - ``grad_loss``: target loss for the per-source gradients, ``"hscore"`` or ``"ce"``.
    - ``steps``: optimisation steps; ``lr``: Adam learning rate on ``theta``.
    - ``n_samples``: target training samples used (class-stratified subset; None for all).
    - ``batch_size``: samples per step (None: all ``n_samples`` every step).
    - ``chunk_size``: bound memory by running forward/backward in chunks (same result).
    - ``seed``: makes the subset, the batches and so the result deterministic.

    After :meth:`fit`: ``weights_`` ``(K,)``, ``theta_``, ``history_`` (one dict
    per step: ``step``, ``weights``, ``hscore``, ``regularizer``, ``objective``),
    ``conflicts_`` (:class:`ConflictResult`), ``source_hscores_``, ``names_``,
    ``prompt_`` (the ensembled prompt), ``stopped_``, ``n_steps_``, ``fit_seconds_``.
    """

    def __init__(
        self,
        lam: float = 1.0,
        regularizer: str = "conflict",
        h_variant: str = "shrinkage",
        grad_loss: str = "hscore",
        steps: int = 30,
        lr: float = 0.1,
        n_samples: int | None = 128,
        batch_size: int | None = None,
        chunk_size: int | None = None,
        seed: int = 0,
    ):
        self.lam = lam
        self.regularizer = regularizer
        self.h_variant = h_variant
        self.grad_loss = grad_loss
        self.steps = steps
        self.lr = lr
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.seed = seed

    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("lam", "regularizer", "h_variant", "grad_loss", "steps", "lr", "n_samples", "batch_size", "chunk_size", "seed")}

    def _validate(self) -> None:
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise UserInputError(f"lam must be a finite number >= 0, got {self.lam!r}; use 0 for the H-score-only ablation.")
        if self.regularizer not in REGULARIZERS:
            raise UserInputError(f"regularizer must be one of {REGULARIZERS}, got {self.regularizer!r}.")
        if self.h_variant not in VARIANTS:
            raise UserInputError(f"h_variant must be one of {VARIANTS}, got {self.h_variant!r}.")
        if self.grad_loss not in GRAD_LOSSES:
            raise UserInputError(f"grad_loss must be one of {GRAD_LOSSES}, got {self.grad_loss!r}.")
        if not (isinstance(self.steps, int) and 0 <= self.steps <= 100_000):
            raise UserInputError(f"steps must be an integer in 0..100000, got {self.steps!r}.")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise UserInputError(f"lr must be a number > 0, got {self.lr!r}.")
        for name in ("n_samples", "batch_size", "chunk_size"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and v >= 2):
                raise UserInputError(f"{name} must be an integer >= 2 or None, got {v!r}.")

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
        backbone's transform). ``callback(info)`` is called after the
        conflict pass and after every step; ``should_stop()`` (or a
        ``threading.Event``) is polled before every step and ends the fit early,
        keeping everything computed so far (``stopped_`` is then True).
        ``conflicts`` reuses the gradient pass (``conflicts_``) of an earlier fit on the same prompts,
        target sample, ``grad_loss`` and ``h_variant``, e.g. to compare several ``lam`` values.
        """
        self._validate()
        t0 = time.perf_counter()
        stop = stop_flag(should_stop)
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

        images, labels = self._target(model, images, labels, task)
        device = model.device
        with torch.no_grad():
            tokens = torch.cat([model.embed(images[i : i + 256].to(device)) for i in range(0, len(images), 256)])
        labels = labels.to(device)
        _, labels = torch.unique(labels, return_inverse=True)
        n = tokens.shape[0]

        if conflicts is not None:  # the gradient pass of an earlier fit on the same prompts and target sample
            if conflicts.grads.shape[0] != k or (self.regularizer == "fisher" and conflicts.fisher is None):
                raise UserInputError(
                    f"the given conflicts are for {conflicts.grads.shape[0]} prompts"
                    + ("" if conflicts.fisher is not None else " without the Fisher term")
                    + f"; this fit has {k} prompts and regularizer={self.regularizer!r}. Drop conflicts= to recompute."
                )
            self.conflicts_ = conflicts
        else:
            self.conflicts_ = gradient_conflicts(
                model, None, labels, prompts, loss=self.grad_loss, h_variant=self.h_variant,
                fisher=self.regularizer == "fisher", chunk_size=self.chunk_size, tokens=tokens,
            )
        self.source_hscores_ = self.conflicts_.source_hscores.numpy()
        self.history_: list[dict[str, Any]] = []
        self.stopped_ = False
        if callback:
            callback({"stage": "conflicts", "step": 0, "steps": self.steps, "cosine": self.conflicts_.cosine.tolist(),
                      "source_hscores": self.source_hscores_.tolist(), "names": self.names_})

        gen = torch.Generator().manual_seed(self.seed)
        theta = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([theta], lr=self.lr)
        bank = prompts.to(device)
        reg_fn = lambda a: self.conflicts_.regularizer(a, self.regularizer)  # noqa: E731
        loss_fn = lambda f: -h_score(f[0], y_b, self.h_variant).reshape(1)  # noqa: E731

        for step in range(self.steps + 1):
            if step < self.steps and stop():
                self.stopped_ = True
            alpha = torch.softmax(theta, 0)
            p_alpha = combine_prompts(alpha.float(), bank.cpu()).to(device)
            if self.batch_size is not None and self.batch_size < n:
                idx = torch.randperm(n, generator=gen)[: self.batch_size].to(device)
                tok_b, y_b = tokens[idx], labels[idx]
            else:
                tok_b, y_b = tokens, labels
            last = step == self.steps or self.stopped_
            if last:  # the final weights get evaluated, not updated
                with torch.no_grad():
                    h = h_score(model.forward_tokens(tok_b, p_alpha), y_b, self.h_variant).double()
                reg = reg_fn(alpha.detach())
            else:
                out = prompt_gradients(model, tok_b, p_alpha.detach()[None], loss_fn, chunk_size=self.chunk_size)
                h = -out.losses[0].double()
                reg = reg_fn(alpha)
                # d(-J)/dtheta: the prompt's gradient of -H chained through P(alpha), plus lambda dR/dtheta.
                g_theta = torch.autograd.grad(
                    [p_alpha, self.lam * reg], [theta], grad_outputs=[out.grads[0].to(p_alpha.dtype), torch.ones((), dtype=reg.dtype)]
                )[0]
                if not torch.isfinite(g_theta).all():
                    raise UserInputError(
                        "the ensemble weights' gradient became non-finite; lower lr or lam, or check the target features."
                    )
                opt.zero_grad()
                theta.grad = g_theta
            entry = {
                "step": step,
                "weights": alpha.detach().tolist(),
                "hscore": float(h),
                "regularizer": float(reg.detach()),
                "objective": float(h) - self.lam * float(reg.detach()),
                "seconds": time.perf_counter() - t0,
            }
            self.history_.append(entry)
            if not last:
                opt.step()
            if callback:
                callback({"stage": "step", "steps": self.steps, "names": self.names_, **entry})
            if last:
                break

        self.theta_ = theta.detach().float().clone()
        self.weights_ = np.asarray(self.history_[-1]["weights"], dtype=np.float64)
        self.n_steps_ = len(self.history_) - 1
        self.prompt_ = combine_prompts(torch.as_tensor(self.weights_, dtype=torch.float32), prompts).cpu()
        self.ensemble_hscore_ = self.history_[-1]["hscore"]
        self.n_target_samples_ = n
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _target(self, model, images, labels, task):
        if task is not None:
            if images is not None:
                raise UserInputError("give the target either as a task or as images and labels, not both.")
            return task.sample(model, "train", self.n_samples, self.seed)
        if images is None or labels is None:
            raise UserInputError("give the target task, or the target images and their labels.")
        labels = torch.as_tensor(labels)
        if len(images) != len(labels):
            raise UserInputError(f"{len(images)} target images but {len(labels)} labels; give one label per image.")
        idx = stratified_subset(labels.numpy(), self.n_samples, self.seed)
        return images[idx], labels[idx]

    def ensemble_prompt(self) -> torch.Tensor:
        """The weighted prompt ``P(alpha*)``; the initialisation of the target prompt."""
        if not hasattr(self, "prompt_"):
            raise UserInputError("call fit() first.")
        return self.prompt_
