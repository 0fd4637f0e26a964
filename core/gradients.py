"""Gradients of a feature-level objective with respect to K prompts, in one batched pass.

The K prompts are stacked along the batch axis (``PromptedViT.forward_rows``),
so one forward and one backward give every source's gradient: no loop over
sources and no ``retain_graph``. Because the ViT treats batch rows
independently, the gradient with respect to each row's own copy of the prompt
is that sample's contribution; summing the rows gives the usual gradient, and
their squares give the diagonal empirical Fisher, at no extra backward pass.

With ``chunk_size`` the pass runs in two phases to bound memory: a no-grad
forward of all samples, the gradient of the objective with respect to the
features (cheap), then a forward + backward per chunk with those feature
gradients as ``grad_outputs``. The result is the same, exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .device import autocast

LossFn = Callable[[torch.Tensor], torch.Tensor]  # features (K, N, D) -> losses (K,)


@dataclass
class PromptGradients:
    """What one batched pass gives for K prompts of shape ``S`` (``(T, D)`` or ``(depth, T, D)``)."""

    losses: torch.Tensor  # (K,) the objective at each prompt (detached)
    grads: torch.Tensor  # (K, *S) gradient of each loss with respect to its prompt
    features: torch.Tensor  # (K, N, D) the prompt-induced features (detached)
    fisher: torch.Tensor | None = None  # (K,) sum of the diagonal empirical Fisher, when asked for


def prompt_gradients(
    model,
    tokens: torch.Tensor,
    prompts: torch.Tensor,
    loss_fn: LossFn,
    chunk_size: int | None = None,
    fisher: bool = False,
) -> PromptGradients:
    """Gradients of ``loss_fn(features)`` w.r.t. each of ``prompts: (K, *S)`` on ``tokens: (N, P + L, D)``.

    ``loss_fn`` maps features ``(K, N, D)`` to losses ``(K,)``; loss ``k`` must
    depend on ``features[k]`` only (true of every objective here), which is what
    makes one backward of their sum give all K gradients. ``fisher=True`` also
    returns ``v_k = sum_params mean_n (N * g_{k,n})^2``, where ``g_{k,n}`` is
    sample ``n``'s contribution to the gradient (for a mean of per-sample
    losses, ``N * g_{k,n}`` is exactly that sample's gradient).
    """
    k, n = prompts.shape[0], tokens.shape[0]
    shape = tuple(prompts.shape[1:])
    device = tokens.device
    base = prompts.detach().to(device)
    if chunk_size is None:
        # Fall back to the chunked mode when all K x N rows' activations would not fit in free memory,
        # and say so clearly when not even one sample per chunk would.
        from .resources import check_fits, rows_that_fit

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
        losses = loss_fn(feats.float())
        inputs = [leaf, rows] if fisher else [leaf]
        out = torch.autograd.grad(losses.sum(), inputs)
        fisher_v = _fisher(out[1].reshape(k, n, -1), n) if fisher else None
        return PromptGradients(losses.detach(), out[0].detach(), feats.detach().float(), fisher_v)

    # Two-phase, chunked: memory is bounded by one chunk's activations.
    chunks = [slice(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]
    with torch.no_grad():
        feats = torch.cat([_forward(model, tokens[c], base) for c in chunks], dim=1).float()  # (K, N, D)
    leaf_f = feats.clone().requires_grad_(True)
    losses = loss_fn(leaf_f)
    (feat_grad,) = torch.autograd.grad(losses.sum(), [leaf_f])  # (K, N, D)
    grads = torch.zeros_like(base)
    fisher_v = torch.zeros(k, device=device) if fisher else None
    for c in chunks:
        m = c.stop - c.start
        leaf = base.clone().requires_grad_(True)
        rows = leaf.unsqueeze(1).expand(k, m, *shape).reshape(k * m, *shape)
        x = tokens[c].unsqueeze(0).expand(k, m, *tokens.shape[1:]).reshape(k * m, *tokens.shape[1:])
        with autocast(device):
            f = model.forward_rows(x, rows).reshape(k, m, -1)
        inputs = [leaf, rows] if fisher else [leaf]
        out = torch.autograd.grad(f.float(), inputs, grad_outputs=feat_grad[:, c])
        grads += out[0]
        if fisher:
            fisher_v += _fisher(out[1].reshape(k, m, -1), n) * (m / n)
    return PromptGradients(losses.detach(), grads.detach(), feats.detach(), fisher_v)


def _forward(model, tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    with autocast(tokens.device):
        return model.forward_tokens_batched(tokens, prompts)


def _fisher(row_grads: torch.Tensor, n: int) -> torch.Tensor:
    """``row_grads: (K, M, P)`` per-sample contributions -> ``(K,)`` sum over P of mean over M of ``(n g)^2``."""
    return ((row_grads.float() * n) ** 2).mean(1).sum(-1)
