"""Frozen tokens: a task's images through the backbone's (frozen) embedding, computed once and kept with the task.

The embedding (patch embedding, position embedding, pre-norm) does not depend on the prompt, so every pass over a
target starts from the same tokens. They are kept in the task's :class:`core.io.tasks.TaskCache` under a
:class:`TokenKey` that names what they depend on. A task made by ``Task.resplit(seed)`` takes its tokens from its
parent's (the same images through the same frozen layers), so a sweep over seeds embeds each target once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserInputError
from ..metrics.h_score import class_labels, resolve_n_samples

EMBED_BATCH = 256


@dataclass(frozen=True)
class TokenKey:
    """The frozen tokens of one split of one task, for one backbone on one device."""

    split: str
    backbone: str  # the backbone's weight fingerprint
    device: str
    resplit: int | None  # the task's resplit seed (None: the task's own split)


def preprocess_name(model) -> str:
    """The name of ``model``'s preprocessing, the key of a task's preprocessed images."""
    return f"backbone:{model.fingerprint}"


def split_images(model, task, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, C, H, W)`` of a task split preprocessed for ``model`` (cached with the task) and labels ``(N,)``."""
    return task.tensors(split, model.transform(), preprocess_name(model))


@torch.no_grad()
def embed_images(model, images: torch.Tensor, batch_size: int = EMBED_BATCH) -> torch.Tensor:
    """Tokens ``(N, P + L, D)`` of preprocessed images ``(N, C, H, W)`` on the model's device, in batches."""
    device = model.device
    return torch.cat([model.embed(images[i : i + batch_size].to(device)) for i in range(0, len(images), batch_size)])


def _key(model, task, split: str) -> TokenKey:
    return TokenKey(split, model.fingerprint, str(model.device), task.resplit_seed)


def split_tokens(model, task, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen tokens ``(N, P + L, D)`` and labels ``(N,)`` of a task split, on the model's device; cached."""
    labels = torch.as_tensor(task.splits[split].labels, dtype=torch.long, device=model.device)
    return task.cache.get_or_compute(_key(model, task, split), lambda: _embed_split(model, task, split)), labels


def _embed_split(model, task, split: str) -> torch.Tensor:
    if task.parent is not None:  # a resplit: the parent's tokens, indexed
        if split == "test":
            return split_tokens(model, task.parent, "test")[0]
        pooled = torch.cat([split_tokens(model, task.parent, s)[0] for s in ("train", "val")])
        return pooled[torch.as_tensor(task.pooled_index[split], device=pooled.device)]
    return embed_images(model, split_images(model, task, split)[0])


def cached_tokens(model, task, split: str) -> torch.Tensor | None:
    """The frozen tokens of a task split if they have been embedded for this model already, else None."""
    return task.cache.get(_key(model, task, split))


def sample_tokens(model, task, split: str, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Tokens and labels of a class-stratified sample of ``n`` images of a split (all when None), and their indices.

    From the split's cached tokens when there are some (always for a resplit task: its parent's); otherwise only the
    sample's images are embedded (and nothing is kept)."""
    idx = task.subsample(split, n, seed)
    labels = torch.as_tensor(task.splits[split].labels[idx], dtype=torch.long, device=model.device)
    if task.parent is not None or cached_tokens(model, task, split) is not None:
        tokens = split_tokens(model, task, split)[0]
        return tokens[torch.as_tensor(idx, device=tokens.device)], labels, idx
    return embed_images(model, split_images(model, task, split)[0][idx]), labels, idx


@dataclass(frozen=True, eq=False)
class Target:
    """A target sample, checked once where it enters (:func:`target_tokens`) and passed down as it is.

    ``tokens: (N, P + L, D)`` frozen tokens on the model's device, ``labels: (N,)`` long, renamed ``0 .. C - 1``,
    ``n_classes`` ``C`` (at least 2, and fewer than N). Unpacks as ``tokens, labels``."""

    tokens: torch.Tensor
    labels: torch.Tensor
    n_classes: int

    def __iter__(self):
        return iter((self.tokens, self.labels))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def target_tokens(model, task_or_images, labels, n_samples: int | str | None, seed: int) -> Target:
    """The :class:`Target` of a :class:`core.io.tasks.Task` (a class-stratified sample of its train split,
    ``n_samples`` images, ``"auto"`` as :func:`core.metrics.h_score.default_n_samples`) or of preprocessed images
    ``(N, C, H, W)`` with their ``labels`` (all of them): frozen tokens, labels renamed ``0..C-1``, ``C``."""
    if hasattr(task_or_images, "splits"):
        if labels is not None:
            raise UserInputError("give the target either as a task or as images and labels, not both.")
        task = task_or_images
        n = resolve_n_samples(n_samples, model.embed_dim, len(task.splits["train"]))
        tokens, labels, _ = sample_tokens(model, task, "train", n, seed)
    else:
        if labels is None:
            raise UserInputError("give the labels of the target images.")
        tokens = embed_images(model, task_or_images)
    y, _, c = class_labels(torch.as_tensor(labels).to(model.device), tokens.shape[0])
    return Target(tokens, y, c)
