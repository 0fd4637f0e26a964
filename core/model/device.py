"""Device choice and the frozen backbone's precision: CUDA when present, else CPU; float32 or bf16 autocast.

The precision is a setting of a fit, a tune or an interference run (their ``precision`` option); they enter
:func:`precision` for their duration, and every forward of the backbone (:func:`autocast`'s call sites: the feature
extractor, the gradient pass, the tuning step) reads it from there. Only the backbone's forward (and the backward
through it) runs in bf16: its outputs are cast back to float32 at once, and every metric (H-score solves, probe
heads, LogME) runs in float32 or float64 as before. The frozen tokens are embedded in float32 whatever the
precision, so the token cache holds one copy for both.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator

import torch

from ..errors import UserInputError
from ..registry import Registry

#: The precisions of the frozen backbone's passes; an entry is the autocast dtype (None: float32 throughout).
PRECISIONS: Registry = Registry("precision", default="fp32")
PRECISIONS.add("fp32", None, help="float32 throughout (exact; the reference)")
PRECISIONS.add("bf16", torch.bfloat16, help="the frozen backbone's forward and backward under bf16 autocast, for "
               "hardware with fast bf16 matrix units (GPUs, CPUs with AMX); H-scores and probes stay in "
               "float32/float64. On a CPU without AMX it was slower than fp32 here and moved mixtures' weights "
               "(docs/METHOD_NOTES.md, Precision)")
Precision = str  # a name in PRECISIONS
#: The precision of every forward when no fit, tune or run has set one (docs/METHOD_NOTES.md, "Precision").
DEFAULT_PRECISION: Precision = PRECISIONS.default

# A context variable, not a global: each thread (a dashboard session's fit, a Ray job) has its own.
_CURRENT: contextvars.ContextVar[str] = contextvars.ContextVar("hgprompt_precision", default=DEFAULT_PRECISION)


def check_precision(mode: str) -> str:
    if mode not in PRECISIONS:
        raise UserInputError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {mode!r}.")
    return PRECISIONS.check(mode)


@contextlib.contextmanager
def precision(mode: Precision | None) -> Iterator[None]:
    """Run the block's backbone forwards at ``mode`` (``None``: leave the current precision as it is)."""
    if mode is None:
        yield
        return
    token = _CURRENT.set(check_precision(mode))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_precision() -> str:
    """The precision the backbone's forwards run at here (:func:`precision`'s, or :data:`DEFAULT_PRECISION`)."""
    return _CURRENT.get()


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"`` picks CUDA when available, else CPU; other names are checked."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserInputError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device {device!r} was asked for but no CUDA GPU is visible; use --device cpu.")
    if dev.type not in ("cpu", "cuda"):
        raise UserInputError(f"device {device!r} is not supported; use 'auto', 'cpu' or 'cuda[:N]'.")
    return dev


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """The backbone's forward at the current precision on ``device``: bf16 autocast (CPU or CUDA) under
    ``precision("bf16")``, plain float32 under ``"fp32"``. Callers cast the outputs back with ``.float()``."""
    dtype = PRECISIONS[current_precision()]
    if enabled and dtype is not None:
        with torch.autocast(torch.device(device).type, dtype=dtype):
            yield
    else:
        yield


def runs_at_own_precision(method):
    """Decorate a method of an object with a ``precision`` attribute (an estimator's option): the call runs at it."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with precision(getattr(self, "precision", None)):
            return method(self, *args, **kwargs)

    return wrapper
