"""Gradients of a feature-level objective with respect to K prompts, in one batched pass.

The K prompts are stacked along the batch axis (``PromptedViT.forward_rows``),
so one forward and one backward give every source's gradient: no loop over
sources and no ``retain_graph`` loop. Because the ViT treats batch rows
independently, each row's own copy of the prompt receives exactly that
sample's gradient of a per-sample loss: that is what ``torch.func.vmap(grad)``
computes, obtained here from the same batched graph with one more backward.
Their variance over samples is the diagonal empirical Fisher vector that the
``fishr`` regulariser matches across sources (Rame et al., ICML 2022).

With ``chunk_size`` the pass runs in two phases to bound memory: a no-grad
forward of all samples, the gradient of the objective with respect to the
features (cheap), then a forward + backward per chunk with those feature
gradients as ``grad_outputs``. The result is the same, up to float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..metrics.threads import one_thread
from ..model.device import autocast
from ..model.resources import check_fits, rows_that_fit

LossFn = Callable[[torch.Tensor], torch.Tensor]  # features (K, N, D) -> losses (K,)
SampleLossFn = Callable[[torch.Tensor], torch.Tensor]  # features (K, N, D) -> per-sample losses (K, N)


@dataclass
class PromptGradients:
    """What one batched pass gives for K prompts of shape ``S`` (``(T, D)`` or ``(depth, T, D)``)."""

    losses: torch.Tensor  # (K,) the objective at each prompt (detached)
    grads: torch.Tensor  # (K, *S) gradient of each loss with respect to its prompt
    features: torch.Tensor  # (K, N, D) the prompt-induced features (detached)
    sample_grad_var: torch.Tensor | None = None  # (K, *S) variance over samples of per-sample gradients


def prompt_gradients(
    model,
    tokens: torch.Tensor,
    prompts: torch.Tensor,
    loss_fn: LossFn,
    chunk_size: int | None = None,
    sample_loss_fn: SampleLossFn | None = None,
    on_forward: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> PromptGradients:
    """Gradients of ``loss_fn(features)`` w.r.t. each of ``prompts: (K, *S)`` on ``tokens: (N, P + L, D)``.

    ``loss_fn`` maps features ``(K, N, D)`` to losses ``(K,)``; loss ``k`` must
    depend on ``features[k]`` only (true of every objective here), which is what
    makes one backward of their sum give all K gradients.

    ``sample_loss_fn`` (optional) maps features ``(K, N, D)`` to per-sample losses
    ``(K, N)``, loss ``(k, n)`` depending on ``features[k, n]`` only. Then
    ``sample_grad_var[k] = var_n grad_P loss(k, n)`` at ``P_k`` (population
    variance, elementwise): the diagonal empirical Fisher of that loss around its
    mean gradient. It costs one more backward of the same graph.

    ``on_forward(losses (K,), features (K, N, D))`` (both detached) is called between the forward and the first
    backward: what the forward alone gives is known before the backward starts (and kept if it is stopped).
    """
    k, n = prompts.shape[0], tokens.shape[0]
    shape = tuple(prompts.shape[1:])
    device = tokens.device
    base = prompts.detach().to(device)
    if chunk_size is None:
        # Fall back to the chunked mode when all K x N rows' activations would not fit in free memory,
        # and say so clearly when not even one sample per chunk would.
        fit = rows_that_fit(model, shape, tokens.shape[1])
        if fit < k * n:
            check_fits(model, k, shape, tokens.shape[1], f"the gradient pass over {k} prompts",
                       "use fewer sources, or free memory (other runs, other programs).")
            chunk_size = max(1, fit // k)
    if chunk_size is None or chunk_size >= n:
        leaf = base.clone().requires_grad_(True)
        rows = leaf.unsqueeze(1).expand(k, n, *shape).reshape(k * n, *shape)
        x = tokens.unsqueeze(0).expand(k, *tokens.shape).reshape(k * n, *tokens.shape[1:])
        with autocast(device):
            feats = model.forward_rows(x, rows).reshape(k, n, -1)
        # The objective and its gradient with respect to the features are small float64 work: on one thread
        # (core.metrics.threads); then the backbone's backward, on every thread, from those feature gradients.
        losses, feat_grad = _loss_and_feature_grad(loss_fn, feats)
        if on_forward is not None:
            on_forward(losses, feats.detach().float())
        (grads,) = torch.autograd.grad(feats, [leaf], grad_outputs=feat_grad, retain_graph=sample_loss_fn is not None)
        var = None
        if sample_loss_fn is not None:
            _, sample_grad = _loss_and_feature_grad(sample_loss_fn, feats)
            (row_grads,) = torch.autograd.grad(feats, [rows], grad_outputs=sample_grad)
            var = row_grads.float().reshape(k, n, *shape).var(1, unbiased=False)
        return PromptGradients(losses.detach(), grads.detach(), feats.detach().float(), var)

    # Two-phase, chunked: memory is bounded by one chunk's activations.
    chunks = [slice(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]
    with torch.no_grad():
        feats = torch.cat([_forward(model, tokens[c], base) for c in chunks], dim=1).float()  # (K, N, D)
    losses, feat_grad = _loss_and_feature_grad(loss_fn, feats)  # (K,), (K, N, D)
    if on_forward is not None:
        on_forward(losses, feats)
    sample_grad = None
    if sample_loss_fn is not None:
        _, sample_grad = _loss_and_feature_grad(sample_loss_fn, feats)  # (K, N, D)
        s1 = torch.zeros(k, *shape, device=device, dtype=torch.float64)  # float64: var = E[g^2] - E[g]^2 cancels
        s2 = torch.zeros(k, *shape, device=device, dtype=torch.float64)
    grads = torch.zeros_like(base)
    for c in chunks:
        m = c.stop - c.start
        leaf = base.clone().requires_grad_(True)
        rows = leaf.unsqueeze(1).expand(k, m, *shape).reshape(k * m, *shape)
        x = tokens[c].unsqueeze(0).expand(k, m, *tokens.shape[1:]).reshape(k * m, *tokens.shape[1:])
        with autocast(device):
            f = model.forward_rows(x, rows).reshape(k, m, -1).float()
        (g,) = torch.autograd.grad(f, [leaf], grad_outputs=feat_grad[:, c], retain_graph=sample_grad is not None)
        grads += g
        if sample_grad is not None:
            (rg,) = torch.autograd.grad(f, [rows], grad_outputs=sample_grad[:, c])
            rg = rg.double().reshape(k, m, *shape)
            s1 += rg.sum(1)
            s2 += (rg**2).sum(1)
    var = None if sample_grad is None else (s2 / n - (s1 / n) ** 2).clamp_min(0.0).float()
    return PromptGradients(losses.detach(), grads.detach(), feats.detach(), var)


@one_thread()
def _loss_and_feature_grad(loss_fn, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``loss_fn(feats.float())`` and the gradient of its sum with respect to ``feats`` (in ``feats``' dtype, as
    autograd would pass it back through the cast), on one thread."""
    leaf = feats.detach().float().requires_grad_(True)
    losses = loss_fn(leaf)
    (grad,) = torch.autograd.grad(losses.sum(), [leaf])
    return losses.detach(), grad.to(feats.dtype)


def _forward(model, tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    with autocast(tokens.device):
        return model.forward_tokens_batched(tokens, prompts)
