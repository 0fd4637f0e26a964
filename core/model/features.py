"""Prompt-induced features: the one helper that runs frozen tokens through the prompted backbone without gradients."""
from __future__ import annotations

import torch

from ..errors import UserInputError
from .device import autocast
from .resources import forward_rows_that_fit


@torch.no_grad()
def prompt_features(model, tokens: torch.Tensor, prompts: torch.Tensor | None = None, batch_size: int = 256,
                    prompts_per_pass: int | None = None) -> torch.Tensor:
    """Pooled features of frozen tokens ``(N, P + L, D)``: ``(N, D)`` with no prompt (``prompts=None``), or
    ``(K, N, D)`` under each of a stack of prompts ``(K, T, D)`` / ``(K, depth, T, D)``; float32, on the tokens' device.

    Runs ``batch_size`` tokens under ``prompts_per_pass`` prompts at a time (default: all K), fewer when those rows
    would not fit in free memory (:func:`core.model.resources.forward_rows_that_fit`: the same features, in more
    forwards), at the current precision (float32, or bf16 autocast: :func:`core.model.device.precision`), as training
    does; the features come back as float32 either way. No gradients (``torch.no_grad``, not inference mode: a probe
    head is fitted on these features afterwards).
    """
    n = tokens.shape[0]
    batch_size, prompts_per_pass = _rows_per_forward(model, tokens, prompts, batch_size, prompts_per_pass)
    if prompts is None:
        out = []
        for i in range(0, n, batch_size):
            with autocast(tokens.device):
                out.append(model.forward_rows(tokens[i : i + batch_size], None).float())
        return torch.cat(out) if out else torch.empty(0, model.embed_dim, device=tokens.device)
    prompts = prompts.to(tokens.device)
    if n == 0:
        return torch.empty(prompts.shape[0], 0, model.embed_dim, device=tokens.device)
    per = prompts.shape[0] if prompts_per_pass is None else max(1, int(prompts_per_pass))
    groups = []
    for s in range(0, prompts.shape[0], per):
        chunk = []
        for i in range(0, n, batch_size):
            with autocast(tokens.device):
                chunk.append(model.forward_tokens_batched(tokens[i : i + batch_size], prompts[s : s + per]).float())
        groups.append(torch.cat(chunk, dim=1))
    return torch.cat(groups)


def _rows_per_forward(model, tokens: torch.Tensor, prompts: torch.Tensor | None, batch_size: int,
                      prompts_per_pass: int | None) -> tuple[int, int | None]:
    """``(batch_size, prompts_per_pass)`` cut so that one forward's rows (their product) fit in free memory."""
    batch_size = max(1, int(batch_size))
    if tokens.shape[0] == 0:
        return batch_size, prompts_per_pass
    fit = forward_rows_that_fit(model, None if prompts is None else tuple(prompts.shape[1:]), tokens.shape[1])
    if prompts is None:
        return min(batch_size, fit), prompts_per_pass
    per = prompts.shape[0] if prompts_per_pass is None else max(1, int(prompts_per_pass))
    batch_size = min(batch_size, tokens.shape[0])
    if per * batch_size <= fit:
        return batch_size, prompts_per_pass
    if per <= fit:
        return max(1, fit // per), per
    return 1, fit


def check_finite_features(model, tokens: torch.Tensor, prompts: torch.Tensor, names: list[str] | None = None,
                          rows: int = 8) -> None:
    """Refuse, by name, a prompt of ``prompts: (K, *S)`` under which the backbone's features are not finite (a
    prompt of huge values overflows the blocks): one forward of ``rows`` samples under every prompt."""
    feats = prompt_features(model, tokens[:rows], prompts)
    bad = [k for k in range(prompts.shape[0]) if not torch.isfinite(feats[k]).all()]
    if bad:
        k = bad[0]
        name = names[k] if names else f"prompt {k}"
        raise UserInputError(
            f"{name!r} makes the backbone's features overflow (NaN or infinite; its largest value is "
            f"{float(prompts[k].abs().max()):.3g})"
            + (f", and so do {len(bad) - 1} other prompt(s)" if len(bad) > 1 else "")
            + "; use prompts tuned on this backbone (tuned prompts have values of order 1).")
