"""Device choice and mixed precision: CUDA when present, else CPU."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..errors import UserInputError


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
    """bf16 autocast on CUDA; a no-op on the CPU (fp32 there is both faster and exact)."""
    if enabled and device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield
