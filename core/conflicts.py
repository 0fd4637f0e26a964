"""The per-source gradient pass and the regularisers built on it.

HGPrompt (Zhang et al., "Learning Optimal Prompt Ensemble for Multi-source
Visual Prompt Transfer", arXiv 2504.12311) regularises the ensemble weights
with what the sources' gradients on the target say. For each source ``k``,
``g_k`` is the gradient of the target loss with respect to the prompt,
evaluated at the source prompt ``P_k`` on the target sample;
``C_ij = cos(g_i, g_j)``.

Regularisers (docs/METHOD_NOTES.md says where each goes beyond the paper):

- ``"fishr"`` (the final abstract's "matching gradient variances ... based on
  Hessian and Fisher information", read as Fishr, Rame et al., ICML 2022):
  ``F_k`` is the diagonal empirical Fisher *vector* at ``P_k``, the variance over
  target samples of the per-sample gradients of the cross-entropy of a probe
  head fitted on the target features under ``P_k``;
  ``R(a) = sum_k a_k ||F_k - sum_j a_j F_j||^2`` with the ``F_k`` scaled by their
  mean norm, so lambda has one scale on every backbone.
- ``"conflict"`` (the first abstract's gradient-conflict reading):
  ``R(a) = sum_{i != j} a_i a_j max(0, -C_ij)`` on the raw cosines. Raw cosines
  share a prompt-independent direction (see :mod:`core.interference`), so on
  many targets no pair is negative and this ``R`` is identically 0.
- ``"interference"`` (ours, resting on the measured quantity):
  ``R(a) = sum_{i != j} a_i a_j max(0, -I_ij)`` with ``I_ij = H((P_i + P_j)/2)
  - (H_i + H_j)/2`` the measured mixing loss of the pair.

All three are 0 at every vertex (a single source), so a vertex's objective is
its H-score whatever lambda is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from .errors import UserInputError
from .gradients import prompt_gradients
from .h_score import HScoreVariant, check_labels, h_score

GradLoss = Literal["hscore", "ce"]
Regularizer = Literal["fishr", "conflict", "interference"]
REGULARIZERS = ("fishr", "conflict", "interference")
GRAD_LOSSES = ("hscore", "ce")
RETIRED = {"fisher": "the scalar 'fisher' regulariser (one number per source) was retired: it lost the direction of the "
                     "Fisher and drove the weight off the most useful source. Use regularizer='fishr', the per-parameter "
                     "(vector) reading of the same idea."}


def check_regularizer(kind: str) -> str:
    if kind in RETIRED:
        raise UserInputError(RETIRED[kind])
    if kind not in REGULARIZERS:
        raise UserInputError(f"regularizer must be one of {REGULARIZERS}, got {kind!r}.")
    return kind


@dataclass
class ConflictResult:
    """Per-source gradients on the target and what is derived from them (K sources)."""

    grads: torch.Tensor  # (K, *S) gradient of the target loss at each source prompt
    cosine: torch.Tensor  # (K, K) cosine of the flattened gradients (raw)
    layer_cosine: torch.Tensor | None  # (depth, K, K) per layer, deep prompts only
    grad_var: torch.Tensor | None  # (K, *S) diagonal empirical Fisher vector F_k (per-sample CE gradients' variance)
    source_hscores: torch.Tensor  # (K,) H-score of the target features under each source prompt
    features: torch.Tensor  # (K, N, D) target features under each source prompt
    mixing_loss: torch.Tensor | None = None  # (K, K) measured I_ij, when the interference regulariser needs it
    # H-score evaluations of the points every fit on this source pass evaluates (the uniform one, a common start),
    # kept for fits that reuse it (HGPromptEnsemble.fit(conflicts=...), e.g. another lambda: H does not depend on it).
    evaluations: dict = field(default_factory=dict, repr=False, compare=False)

    def fishr_gram(self) -> torch.Tensor:
        """``(K, K)`` Gram matrix of the Fisher vectors scaled by their mean norm (all ``fishr`` needs)."""
        if self.grad_var is None:
            raise UserInputError("the 'fishr' regulariser needs gradient_conflicts(..., fishr=True).")
        f = self.grad_var.reshape(self.grad_var.shape[0], -1).double()
        f = f / f.norm(dim=1).mean().clamp_min(1e-30)
        return f @ f.T

    def regularizer(self, alpha: torch.Tensor, kind: Regularizer = "fishr") -> torch.Tensor:
        check_regularizer(kind)
        if kind == "conflict":
            return conflict_regularizer(alpha, self.cosine)
        if kind == "fishr":
            return fishr_regularizer(alpha, self.fishr_gram())
        if self.mixing_loss is None:
            raise UserInputError("the 'interference' regulariser needs the measured mixing losses (core.interference).")
        return pair_penalty(alpha, self.mixing_loss)

    def has(self, kind: Regularizer) -> bool:
        """Whether this pass holds what regulariser ``kind`` needs."""
        return {"conflict": True, "fishr": self.grad_var is not None, "interference": self.mixing_loss is not None}[kind]


def cosine_matrix(grads: torch.Tensor) -> torch.Tensor:
    """``grads: (K, ...)`` -> ``(K, K)`` pairwise cosines; a zero gradient has cosine 0 with everything."""
    g = grads.reshape(grads.shape[0], -1).double()
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (g @ g.T).clamp(-1.0, 1.0).float()


def layer_cosines(grads: torch.Tensor) -> torch.Tensor:
    """Deep-prompt ``grads: (K, depth, T, D)`` -> ``(depth, K, K)`` cosines per layer."""
    return torch.stack([cosine_matrix(grads[:, layer]) for layer in range(grads.shape[1])])


def pair_penalty(alpha: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``sum_{i != j} alpha_i alpha_j max(0, -M_ij)`` for ``alpha: (K,)``, ``matrix: (K, K)``."""
    penalty = (-matrix.to(alpha.dtype)).clamp_min(0.0)
    penalty = penalty - torch.diag_embed(torch.diagonal(penalty))
    return alpha @ penalty @ alpha


def conflict_regularizer(alpha: torch.Tensor, cosine: torch.Tensor) -> torch.Tensor:
    """The weight mass on conflicting pairs, ``sum_{i != j} alpha_i alpha_j max(0, -C_ij)``."""
    return pair_penalty(alpha, cosine)


def fishr_regularizer(alpha: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``sum_k alpha_k ||F_k - sum_j alpha_j F_j||^2`` from the Gram matrix ``gram[i, j] = <F_i, F_j>``.

    Expanding the square with ``sum alpha = 1``: ``sum_k alpha_k G_kk - alpha^T G alpha``.
    """
    g = gram.to(alpha.dtype)
    return (alpha * torch.diagonal(g)).sum() - alpha @ g @ alpha


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


def probe_ce_per_sample(labels: torch.Tensor, num_classes: int):
    """Per-sample cross-entropy ``(K, N)`` of a probe head fitted (on the detached features) per source.

    The head is a constant of the loss: only the prompt moves the features.
    """
    def loss(feats: torch.Tensor) -> torch.Tensor:
        w, b = fit_linear_heads(feats.detach(), labels, num_classes)
        logits = torch.einsum("knd,kdc->knc", feats, w) + b[:, None]
        return F.cross_entropy(logits.permute(0, 2, 1), labels[None].expand(feats.shape[0], -1), reduction="none")

    return loss


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
    fishr: bool = False,
    chunk_size: int | None = None,
    tokens: torch.Tensor | None = None,
    fisher: bool | None = None,
) -> ConflictResult:
    """Per-source gradients of the target loss at each source prompt, in one batched pass.

    ``images: (N, C, H, W)`` target images (or ``tokens`` already embedded by
    ``model.embed``), ``labels: (N,)``, ``prompts``: a :class:`PromptBank` or a
    stack ``(K, T, D)`` / ``(K, depth, T, D)``. ``loss``: ``"hscore"`` (the
    negative H-score, default) or ``"ce"`` (cross-entropy of a logistic
    regression head fitted on each source's features). ``fishr=True`` also
    gives the Fisher vectors ``grad_var`` from per-sample probe cross-entropy
    gradients (one more backward of the same graph). Returns a
    :class:`ConflictResult` with the ``(K, K)`` cosine matrix, per layer for
    deep prompts.
    """
    if fisher is not None:
        raise UserInputError("gradient_conflicts(fisher=...) was renamed: pass fishr=True for the Fisher vectors.")
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
    n_classes = int(labels.max()) + 1
    heads = None
    if loss == "ce":
        with torch.no_grad():
            feats0 = torch.cat([model.forward_tokens_batched(tokens[i : i + 256], prompts.to(device)) for i in range(0, tokens.shape[0], 256)], 1)
        heads = fit_linear_heads(feats0, labels, n_classes)
    loss_fn = target_loss_fn(labels, loss, h_variant, heads)
    sample_fn = probe_ce_per_sample(labels, n_classes) if fishr else None
    out = prompt_gradients(model, tokens, prompts.to(device), loss_fn, chunk_size=chunk_size, sample_loss_fn=sample_fn)
    if loss == "hscore":
        hs = -out.losses
    else:
        hs = torch.stack([h_score(fk, labels, h_variant) for fk in out.features])
    grads = out.grads.float()
    return ConflictResult(
        grads=grads.cpu(),
        cosine=cosine_matrix(grads).cpu(),
        layer_cosine=layer_cosines(grads).cpu() if grads.dim() == 4 else None,
        grad_var=None if out.sample_grad_var is None else out.sample_grad_var.cpu(),
        source_hscores=hs.detach().float().cpu(),
        features=out.features.cpu(),
    )
