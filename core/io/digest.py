"""Digests: the one place that turns tensors and settings into cache keys and job keys.

A digest names *what a result depends on*: two calls that would compute the same thing get the same digest, any
change of a value, a shape or a dtype gives another. None of them is a security measure.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch


def tensor_digest(t: torch.Tensor | np.ndarray) -> str:
    """``shape:dtype:sha1`` of a tensor's (or array's) values, on the CPU and contiguous."""
    a = t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else np.ascontiguousarray(t)
    return f"{tuple(a.shape)}:{a.dtype}:" + hashlib.sha1(a.tobytes()).hexdigest()


def settings_digest(*parts: Any, length: int = 8) -> str:
    """A short digest of JSON-able settings (keys sorted; anything else by its ``str``)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:length]


def bytes_digest(data: bytes, length: int = 16) -> str:
    """A short SHA-256 digest of raw bytes (an uploaded file)."""
    return hashlib.sha256(data).hexdigest()[:length]
