"""Scoring many prompts on a target without gradients: any stack of prompts, the points along the segment between
two prompts, the mixing loss, and the grid of a simplex.

Every function here takes the target as frozen tokens and labels (:func:`core.model.tokens.target_tokens`) and runs
the prompts in batches of rows (:func:`core.model.features.prompt_features`), so memory stays bounded however many
prompts are scored.
"""
from __future__ import annotations

import numpy as np
import torch

from ..control import stop_flag
from ..errors import StopRequested, UserInputError
from ..metrics.h_score import H_VARIANTS, HScoreVariant, h_score_per_class
from ..metrics.transferability import OBJECTIVES, Transferability, transferability as score_features
from ..model.features import prompt_features
from ..model.resources import forward_rows_that_fit
from ..model.tokens import target_tokens


@torch.no_grad()
def hscores_at(model, tokens: torch.Tensor, labels: torch.Tensor, prompts: torch.Tensor,
               h_variant: HScoreVariant = H_VARIANTS.default, max_rows: int | None = None, progress=None,
               should_stop=None, objective: Transferability = OBJECTIVES.default,
               n_classes: int | None = None) -> torch.Tensor:
    """Scores ``(M,)`` of the target under each of ``prompts: (M, *S)`` (the H-score, or another ``objective``),
    batched ``max_rows`` rows at a time (default: what fits in free memory, :func:`chunk_rows`). ``n_classes``: the
    labels are a :class:`core.model.tokens.Target`'s.

    ``progress(done, total)`` is called after every batch; ``should_stop()`` is polled before each and ends the pass
    with :class:`core.errors.StopRequested`."""
    stop = stop_flag(should_stop)
    n = tokens.shape[0]
    per = max(1, chunk_rows(model, prompts, tokens, max_rows) // max(1, n))
    out = []
    for s in range(0, prompts.shape[0], per):
        if stop():
            raise StopRequested()
        feats = prompt_features(model, tokens, prompts[s : s + per], batch_size=max(1, n))
        out.extend(float(score_features(f, labels, objective, h_variant, n_classes)) for f in feats)
        if progress is not None:
            progress(len(out), prompts.shape[0])
    return torch.tensor(out, dtype=torch.float64)


#: Most rows scored between two progress reports (and stop checks), however much memory is free.
ROWS_PER_REPORT = 4096


def chunk_rows(model, prompts: torch.Tensor, tokens: torch.Tensor, max_rows: int | None = None) -> int:
    """Rows of a no-grad pass over ``prompts: (M, *S)`` on ``tokens: (N, P + L, D)`` between two progress reports:
    ``max_rows`` if given, else what one forward may take in free memory
    (:func:`core.model.resources.forward_rows_that_fit`), at most :data:`ROWS_PER_REPORT`."""
    if max_rows is not None:
        return max(1, int(max_rows))
    return min(ROWS_PER_REPORT, forward_rows_that_fit(model, tuple(prompts.shape[1:]), tokens.shape[1]))


@torch.no_grad()
def class_hscores_at(model, tokens: torch.Tensor, labels: torch.Tensor, prompts: torch.Tensor,
                     h_variant: HScoreVariant = H_VARIANTS.default) -> np.ndarray:
    """Each class's share of the H-score under each of ``prompts: (K, *S)``, ``(K, C)``; row ``k`` sums to the
    H-score under prompt ``k`` (:func:`core.metrics.h_score.h_score_per_class`): which classes a prompt makes stand
    out."""
    feats = prompt_features(model, tokens, prompts)
    return np.stack([h_score_per_class(f, labels, h_variant).double().cpu().numpy() for f in feats])


def segment_prompts(prompts: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Prompts ``(1 - t) P_i + t P_j`` for every pair ``i < j`` and every ``t``: ``(pairs * len(t), *S)``."""
    k = prompts.shape[0]
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    if not pairs:
        return prompts.new_zeros((0, *prompts.shape[1:])), pairs
    i = torch.tensor([p[0] for p in pairs])
    j = torch.tensor([p[1] for p in pairs])
    w = t.to(prompts.dtype).reshape(1, -1, *([1] * (prompts.dim() - 1)))
    seg = (1 - w) * prompts[i][:, None] + w * prompts[j][:, None]  # (pairs, len(t), *S)
    return seg.reshape(-1, *prompts.shape[1:]), pairs

def segment_hscores(model, tokens, labels, prompts: torch.Tensor, t: torch.Tensor, source_hscores: torch.Tensor,
                    h_variant: HScoreVariant = H_VARIANTS.default, progress=None, should_stop=None,
                    n_classes: int | None = None) -> torch.Tensor:
    """``(K, K, len(t))``: ``[i, j, s]`` is the H-score at ``(1 - t_s) P_i + t_s P_j`` (``t`` from 0 to 1).

    The ends come from ``source_hscores``; only the interior points are computed (one batched pass).
    """
    k = prompts.shape[0]
    inner = t[1:-1]
    seg_p, pairs = segment_prompts(prompts, inner)
    hs = hscores_at(model, tokens, labels, seg_p, h_variant, progress=progress, should_stop=should_stop,
                    n_classes=n_classes).reshape(len(pairs), len(inner)) if pairs else None
    out = torch.zeros(k, k, len(t), dtype=torch.float64)
    src = source_hscores.double()
    for i in range(k):
        out[i, i] = src[i]
    for p, (i, j) in enumerate(pairs):
        row = torch.cat([src[i : i + 1], hs[p], src[j : j + 1]])
        out[i, j] = row
        out[j, i] = row.flip(0)
    return out

def mixing_loss(segment: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``I_ij = H(midpoint) - (H_i + H_j) / 2`` from ``segment: (K, K, S)`` (``t`` must hold 0.5); diagonal 0."""
    mid = torch.nonzero(torch.isclose(t, torch.tensor(0.5, dtype=t.dtype))).flatten()
    if len(mid) != 1:
        raise UserInputError("the segment points must include the midpoint t = 0.5; use an odd number of points >= 3.")
    i = segment[:, :, mid[0]] - (segment[:, :, 0] + segment[:, :, -1]) / 2
    return i - torch.diag_embed(torch.diagonal(i))

def simplex_points(k: int, resolution: int) -> torch.Tensor:
    """Every point of the ``k``-simplex whose weights are multiples of ``1 / resolution``: ``(M, k)``, vertices
    included."""
    if resolution < 1:
        raise UserInputError(f"resolution must be >= 1, got {resolution!r}.")

    def parts(n, left):
        if n == 1:
            yield (left,)
            return
        for first in range(left, -1, -1):
            for rest in parts(n - 1, left - first):
                yield (first, *rest)

    return torch.tensor(list(parts(k, resolution)), dtype=torch.float64) / resolution


def score_prompts(model, task_or_images, prompts: torch.Tensor, labels: torch.Tensor | None = None, *,
                    objective: Transferability = OBJECTIVES.default, h_variant: HScoreVariant = H_VARIANTS.default,
                    n_samples: int | str | None = "auto", seed: int = 0) -> np.ndarray:
    """The transferability of every prompt of a stack ``(M, *S)`` (a :class:`PromptBank` too) on a target: a
    :class:`core.io.tasks.Task` (a class-stratified sample of its train split, as a fit takes it) or preprocessed
    images with ``labels``. ``objective``: a name in :data:`core.metrics.transferability.OBJECTIVES` (the H-score:
    its ``h_variant``). Returns ``(M,)``; no gradients. The package exports it as ``core.transferability``."""
    if hasattr(prompts, "stack"):
        prompts.check_compatible(model)
        prompts = prompts.stack()
    prompts = torch.as_tensor(prompts).float()
    if prompts.dim() == prompts[0].dim():
        raise UserInputError("give a stack of prompts (M, T, D) or (M, depth, T, D); for one prompt, prompt[None].")
    model.check_prompt(prompts[0], "prompts")
    target = target_tokens(model, task_or_images, labels, n_samples, seed)
    return hscores_at(model, target.tokens, target.labels, prompts, h_variant, objective=objective,
                      n_classes=target.n_classes).numpy()
