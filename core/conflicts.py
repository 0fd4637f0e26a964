"""Gradient conflicts between source prompts and the Gradient Alignment Regulariser.

HGPrompt (Zhang et al., "Learning Optimal Prompt Ensemble for Multi-source
Visual Prompt Transfer", arXiv 2504.12311) suppresses conflicts between the
sources' gradients. For each source ``k``, ``g_k`` is the gradient of the
target loss with respect to the prompt, evaluated at the source prompt
``P_k`` on the target batch; ``C_ij = cos(g_i, g_j)``.

Regularisers (see docs/METHOD_NOTES.md for where these go beyond the paper):

- ``"conflict"`` (default): ``R(a) = sum_{i != j} a_i a_j max(0, -C_ij)``,
  the weight mass placed on conflicting pairs.
- ``"fisher"``: with the diagonal empirical Fisher ``F_k = mean_n g_{k,n}^2``
  and ``v_k = sum(F_k)``, ``R(a) = sum_k a_k (v_k - sum_j a_j v_j)^2``: the
  weighted variance of the sources' gradient scales. ``v`` is normalised by
  its mean so that lambda means the same on every backbone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .errors import UserInputError
from .gradients import prompt_gradients
from .h_score import HScoreVariant, check_labels, h_score

GradLoss = Literal["hscore", "ce"]
Regularizer = Literal["conflict", "fisher"]
REGULARIZERS = ("conflict", "fisher")
GRAD_LOSSES = ("hscore", "ce")


@dataclass
class ConflictResult:
    """Per-source gradients on the target and what is derived from them (K sources)."""

    grads: torch.Tensor  # (K, *S) gradient of the target loss at each source prompt
    cosine: torch.Tensor  # (K, K) cosine of the flattened gradients
    layer_cosine: torch.Tensor | None  # (depth, K, K) per layer, deep prompts only
    fisher: torch.Tensor | None  # (K,) v_k, total diagonal empirical Fisher
    source_hscores: torch.Tensor  # (K,) H-score of the target features under each source prompt
    features: torch.Tensor  # (K, N, D) target features under each source prompt

    def regularizer(self, alpha: torch.Tensor, kind: Regularizer = "conflict") -> torch.Tensor:
        if kind == "conflict":
            return conflict_regularizer(alpha, self.cosine)
        if kind == "fisher":
            if self.fisher is None:
                raise UserInputError("the 'fisher' regulariser needs gradient_conflicts(..., fisher=True).")
            return fisher_regularizer(alpha, self.fisher)
        raise UserInputError(f"unknown regulariser {kind!r}; choose one of {', '.join(REGULARIZERS)}.")


def cosine_matrix(grads: torch.Tensor) -> torch.Tensor:
    """``grads: (K, ...)`` -> ``(K, K)`` pairwise cosines; a zero gradient has cosine 0 with everything."""
    g = grads.reshape(grads.shape[0], -1).double()
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (g @ g.T).clamp(-1.0, 1.0).float()


def layer_cosines(grads: torch.Tensor) -> torch.Tensor:
    """Deep-prompt ``grads: (K, depth, T, D)`` -> ``(depth, K, K)`` cosines per layer."""
    return torch.stack([cosine_matrix(grads[:, layer]) for layer in range(grads.shape[1])])


def conflict_regularizer(alpha: torch.Tensor, cosine: torch.Tensor) -> torch.Tensor:
    """``sum_{i != j} alpha_i alpha_j max(0, -C_ij)`` for ``alpha: (K,)``, ``cosine: (K, K)``."""
    penalty = (-cosine.to(alpha.dtype)).clamp_min(0.0)
    penalty = penalty - torch.diag_embed(torch.diagonal(penalty))
    return alpha @ penalty @ alpha


def fisher_regularizer(alpha: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``sum_k alpha_k (v_k - sum_j alpha_j v_j)^2`` with ``v`` normalised by its mean."""
    v = v.to(alpha.dtype)
    v = v / v.mean().clamp_min(1e-30)
    return (alpha * (v - alpha @ v) ** 2).sum()


def fit_linear_heads(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 50, weight_decay: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic-regression heads for ``features: (K, N, D)`` -> ``W: (K, D, C)``, ``b: (K, C)``.

    Fitted by L-BFGS on standardised features; the K heads are independent.
    """
    f = features.detach().float()
    k, _, d = f.shape
    mu, sd = f.mean(1, keepdim=True), f.std(1, keepdim=True).clamp_min(1e-6)
    z = (f - mu) / sd
    w = torch.zeros(k, d, num_classes, device=f.device, requires_grad=True)
    b = torch.zeros(k, num_classes, device=f.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = torch.einsum("knd,kdc->knc", z, w) + b[:, None]
        loss = F.cross_entropy(logits.reshape(-1, num_classes), labels.repeat(k)) * k
        loss = loss + weight_decay * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    # Fold the standardisation into the head so it applies to raw features.
    w_raw = (w.detach() / sd.transpose(1, 2))
    b_raw = b.detach() - torch.einsum("kd,kdc->kc", mu[:, 0], w_raw)
    return w_raw, b_raw


def target_loss_fn(labels: torch.Tensor, loss: GradLoss = "hscore", h_variant: HScoreVariant = "shrinkage", heads=None):
    """The target loss per source, ``features: (K, N, D) -> (K,)``: ``-H`` or head cross-entropy."""
    if loss == "hscore":
        return lambda feats: -torch.stack([h_score(fk, labels, h_variant) for fk in feats])
    if loss == "ce":
        w, b = heads
        return lambda feats: torch.stack(
            [F.cross_entropy(feats[i] @ w[i] + b[i], labels) for i in range(feats.shape[0])]
        )
    raise UserInputError(f"unknown gradient loss {loss!r}; choose one of {', '.join(GRAD_LOSSES)}.")


def gradient_conflicts(
    model,
    images: torch.Tensor | None,
    labels: torch.Tensor,
    prompts,
    loss: GradLoss = "hscore",
    h_variant: HScoreVariant = "shrinkage",
    fisher: bool = False,
    chunk_size: int | None = None,
    tokens: torch.Tensor | None = None,
) -> ConflictResult:
    """Per-source gradients of the target loss at each source prompt, in one batched pass.

    ``images: (N, C, H, W)`` target images (or ``tokens`` already embedded by
    ``model.embed``), ``labels: (N,)``, ``prompts``: a :class:`PromptBank` or a
    stack ``(K, T, D)`` / ``(K, depth, T, D)``. ``loss``: ``"hscore"`` (the
    negative H-score, default) or ``"ce"`` (cross-entropy of a logistic
    regression head fitted on each source's features). Returns a
    :class:`ConflictResult` with the ``(K, K)`` cosine matrix, per layer for
    deep prompts.
    """
    if hasattr(prompts, "stack"):
        prompts.check_compatible(model)
        prompts = prompts.stack()
    if prompts.dim() not in (3, 4) or prompts.shape[0] < 1:
        raise UserInputError(f"prompts must be a stack (K, T, D) or (K, depth, T, D), got {tuple(prompts.shape)}.")
    model.check_prompt(prompts[0], "prompts")
    device = model.device
    if tokens is None:
        if images is None:
            raise UserInputError("give the target images (or their tokens).")
        with torch.no_grad():
            tokens = model.embed(images.to(device))
    labels = check_labels(labels, tokens.shape[0]).to(device)
    _, labels = torch.unique(labels, return_inverse=True)
    heads = None
    if loss == "ce":
        with torch.no_grad():
            feats0 = torch.cat([model.forward_tokens_batched(tokens[i : i + 256], prompts.to(device)) for i in range(0, tokens.shape[0], 256)], 1)
        heads = fit_linear_heads(feats0, labels, int(labels.max()) + 1)
    loss_fn = target_loss_fn(labels, loss, h_variant, heads)
    out = prompt_gradients(model, tokens, prompts.to(device), loss_fn, chunk_size=chunk_size, fisher=fisher)
    if loss == "hscore":
        hs = -out.losses
    else:
        hs = torch.stack([h_score(fk, labels, h_variant) for fk in out.features])
    grads = out.grads.float()
    return ConflictResult(
        grads=grads.cpu(),
        cosine=cosine_matrix(grads).cpu(),
        layer_cosine=layer_cosines(grads).cpu() if grads.dim() == 4 else None,
        fisher=None if out.fisher is None else out.fisher.cpu(),
        source_hscores=hs.detach().float().cpu(),
        features=out.features.cpu(),
    )
