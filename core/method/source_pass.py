"""The source pass: what the regularisers need, measured once at every source prompt on the target sample.

For each source ``k``, ``g_k`` is the gradient of the target loss with respect to the prompt, evaluated at the
source prompt ``P_k`` on the target sample (one batched pass for all K sources, :mod:`core.method.gradients`);
``C_ij = cos(g_i, g_j)`` is the gradient-conflict matrix. With ``fishr=True`` the same pass gives the Fisher
vectors ``F_k``; with ``mixing=True`` one more forward gives the measured mixing loss ``I_ij`` of every pair. The
regularisers themselves are in :mod:`core.method.regularizers`. :func:`measure_sources` measures it and gives a
:class:`SourcePass`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..control import stop_flag
from ..errors import StopRequested, UserInputError
from ..metrics.h_score import H_VARIANTS, HScoreVariant, h_score
from ..metrics.probe import fit_linear_heads
from ..model.features import prompt_features
from ..model.tokens import Target
from ..registry import Registry
from .gradients import prompt_gradients
from .regularizers import REGULARIZERS, Regularizer, fishr_gram
from .scoring import mixing_loss, segment_hscores

#: The target losses whose gradients the source pass takes: each ``(labels (N,), n_classes, h_variant, features)``
#: -> a loss ``features (K, N, D) -> (K,)``; ``features()`` gives the K sources' features where the loss needs them.
GRAD_LOSSES: Registry = Registry("gradient loss", default="hscore")
GradLoss = str  # a name in GRAD_LOSSES


@dataclass
class SourcePass:
    """What one batched pass measured at K source prompts on a target sample."""

    grads: torch.Tensor  # (K, *S) gradient of the target loss at each source prompt
    cosine: torch.Tensor  # (K, K) cosine of the flattened gradients (raw)
    layer_cosine: torch.Tensor | None  # (depth, K, K) per layer, deep prompts only
    grad_var: torch.Tensor | None  # (K, *S) diagonal empirical Fisher vector F_k (per-sample CE gradients' variance)
    source_hscores: torch.Tensor  # (K,) H-score of the target features under each source prompt
    features: torch.Tensor  # (K, N, D) target features under each source prompt
    mixing_loss: torch.Tensor | None = None  # (K, K) measured I_ij, when the interference regulariser needs it
    loss: GradLoss = GRAD_LOSSES.default  # the target loss whose gradients ``grads`` are
    h_variant: HScoreVariant = H_VARIANTS.default  # the H-score variant of ``source_hscores`` (and of the loss)

    def fishr_gram(self) -> torch.Tensor:
        """``(K, K)`` Gram matrix of the Fisher vectors scaled by their mean norm (all ``fishr`` needs)."""
        if self.grad_var is None:
            raise UserInputError("the 'fishr' regulariser needs the Fisher vectors: measure_sources(..., fishr=True).")
        return fishr_gram(self.grad_var)

    def regularizer(self, alpha: torch.Tensor, kind: Regularizer = REGULARIZERS.default) -> torch.Tensor:
        """``R(alpha)`` of regulariser ``kind``, differentiable in ``alpha: (K,)``."""
        return REGULARIZERS[kind](alpha, self)

    def has(self, kind: Regularizer) -> bool:
        """Whether this pass holds what regulariser ``kind`` needs."""
        return {None: True, "fishr": self.grad_var is not None,
                "mixing": self.mixing_loss is not None}[REGULARIZERS.attr(kind, "needs")]


def needs(regularizer: Regularizer, lam: float) -> dict[str, bool]:
    """What a fit with ``regularizer`` and ``lam`` needs the source pass to measure, as :func:`measure_sources`'s
    flags: the Fisher vectors (a second backward) and the mixing losses (a forward of every pair's midpoint) only
    when the regulariser uses them and lambda is not 0."""
    need = REGULARIZERS.attr(regularizer, "needs") if lam > 0 else None
    return {"fishr": need == "fishr", "mixing": need == "mixing"}


def cosine_matrix(grads: torch.Tensor) -> torch.Tensor:
    """``grads: (K, ...)`` -> ``(K, K)`` pairwise cosines; a zero gradient has cosine 0 with everything."""
    g = grads.reshape(grads.shape[0], -1).double()
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (g @ g.T).clamp(-1.0, 1.0).float()


def layer_cosines(grads: torch.Tensor) -> torch.Tensor:
    """Deep-prompt ``grads: (K, depth, T, D)`` -> ``(depth, K, K)`` cosines per layer."""
    return torch.stack([cosine_matrix(grads[:, layer]) for layer in range(grads.shape[1])])


def centred_cosines(grads: torch.Tensor) -> torch.Tensor:
    """Cosines ``(K, K)`` of ``grads: (K, ...)`` minus their mean over the K rows."""
    return cosine_matrix(grads - grads.mean(0, keepdim=True))


def probe_ce_per_sample(labels: torch.Tensor, num_classes: int):
    """Per-sample cross-entropy ``(K, N)`` of a probe head fitted (on the detached features) per source.

    The head is a constant of the loss: only the prompt moves the features.
    """
    def loss(feats: torch.Tensor) -> torch.Tensor:
        w, b = fit_linear_heads(feats.detach(), labels, num_classes)
        logits = torch.einsum("knd,kdc->knc", feats, w) + b[:, None]
        return F.cross_entropy(logits.permute(0, 2, 1), labels[None].expand(feats.shape[0], -1), reduction="none")

    return loss


@GRAD_LOSSES.register("hscore", help="-H: the negative H-score of each source's features", negative_hscore=True)
def _hscore_loss(labels, n_classes, h_variant, features):
    return lambda feats: -torch.stack([h_score(fk, labels, h_variant, n_classes) for fk in feats])


@GRAD_LOSSES.register("ce", help="the cross-entropy of a logistic-regression head fitted on each source's features")
def _ce_loss(labels, n_classes, h_variant, features):
    n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
    w, b = fit_linear_heads(features(), labels, n_classes)
    return lambda feats: torch.stack([F.cross_entropy(feats[i] @ w[i] + b[i], labels) for i in range(feats.shape[0])])


def target_loss_fn(labels: torch.Tensor, loss: GradLoss = GRAD_LOSSES.default,
                   h_variant: HScoreVariant = H_VARIANTS.default, features=None, n_classes: int | None = None):
    """The target loss per source, ``features: (K, N, D) -> (K,)``, of :data:`GRAD_LOSSES` entry ``loss`` (labels
    ``0..C-1``: a :class:`core.model.tokens.Target`'s, with its ``n_classes``); ``features()`` gives the sources'
    features where the loss fits something on them (``"ce"``)."""
    return GRAD_LOSSES[loss](labels, n_classes, h_variant, features)


def measure_sources(
    model,
    target: Target,
    prompts,
    loss: GradLoss = GRAD_LOSSES.default,
    h_variant: HScoreVariant = H_VARIANTS.default,
    fishr: bool = False,
    mixing: bool = False,
    chunk_size: int | None = None,
    on_forward: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    should_stop=None,
) -> SourcePass:
    """Per-source gradients of the target loss at each source prompt, in one batched pass.

    ``target``: the target sample (:func:`core.model.tokens.target_tokens`); ``prompts``: a :class:`PromptBank` or a
    stack ``(K, T, D)`` / ``(K, depth, T, D)``. ``loss``: a name in :data:`GRAD_LOSSES`. ``fishr=True`` also gives
    the Fisher vectors ``grad_var`` from per-sample probe cross-entropy gradients (one more backward of the same
    graph); ``mixing=True`` the measured mixing loss of every pair (one forward of the K (K - 1) / 2 midpoints).
    Returns a :class:`SourcePass` with the ``(K, K)`` cosine matrix, per layer for deep prompts.

    ``on_forward(source_hscores (K,), features (K, N, D))`` is called once the forward has given the sources'
    H-scores, before any backward; then ``should_stop()`` is polled, and a stop request raises
    :class:`core.errors.StopRequested` (what ``on_forward`` was given is all the pass measured).
    """
    if hasattr(prompts, "stack"):
        prompts.check_compatible(model)
        prompts = prompts.stack()
    if prompts.dim() not in (3, 4) or prompts.shape[0] < 1:
        raise UserInputError(f"prompts must be a stack (K, T, D) or (K, depth, T, D), got {tuple(prompts.shape)}.")
    model.check_prompt(prompts[0], "prompts")
    tokens, labels, n_classes = target.tokens, target.labels, target.n_classes
    stop = stop_flag(should_stop)
    loss_fn = target_loss_fn(labels, loss, h_variant, lambda: prompt_features(model, tokens, prompts), n_classes)
    sample_fn = probe_ce_per_sample(labels, n_classes) if fishr else None
    measured = {}

    def forward_done(losses: torch.Tensor, features: torch.Tensor) -> None:
        if GRAD_LOSSES.attr(loss, "negative_hscore"):  # the losses are the H-scores already
            hs = -losses
        else:
            hs = torch.stack([h_score(fk, labels, h_variant, n_classes) for fk in features])
        measured["hscores"] = hs.float().cpu()
        if on_forward is not None:
            on_forward(measured["hscores"], features)
        if stop():
            raise StopRequested()

    out = prompt_gradients(model, tokens, prompts.to(model.device), loss_fn, chunk_size=chunk_size,
                           sample_loss_fn=sample_fn, on_forward=forward_done)
    grads = out.grads.float()
    result = SourcePass(
        grads=grads.cpu(),
        cosine=cosine_matrix(grads).cpu(),
        layer_cosine=layer_cosines(grads).cpu() if grads.dim() == 4 else None,
        grad_var=None if out.sample_grad_var is None else out.sample_grad_var.cpu(),
        source_hscores=measured["hscores"],
        features=out.features.cpu(),
        loss=loss,
        h_variant=h_variant,
    )
    if mixing:
        t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
        seg = segment_hscores(model, tokens, labels, prompts, t, result.source_hscores, h_variant,
                              should_stop=stop, n_classes=n_classes)
        result.mixing_loss = mixing_loss(seg, t).float()
    return result
