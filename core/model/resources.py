"""Will a run fit in memory? Measured activation sizes, free memory, and a clear message when it will not.

The batched gradient pass keeps the activations of ``K x N`` rows alive until
its backward; that is what runs out of memory first. ``activation_bytes_per_row``
measures, once per model and prompt shape, the bytes autograd saves for one row
(``torch.autograd.graph.saved_tensors_hooks``), so the estimate follows the
real model rather than a formula. ``rows_that_fit`` turns the free memory of the
device (``torch.cuda.mem_get_info`` on a GPU, ``MemAvailable`` on the CPU) into
a number of rows; the gradient code uses it to fall back to its chunked mode,
and ``check_fits`` raises a :class:`UserInputError` naming the sizes and the fix.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch

from .device import autocast, current_precision
from ..errors import UserInputError

# Use at most this share of the free memory, leaving room for the allocator's slack and the rest of the process.
SAFETY = 0.6


def free_bytes(device: torch.device | str) -> int:
    """Bytes a run may still allocate on ``device`` (CUDA: free device memory; CPU: MemAvailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks PyTorch's caching allocator holds but does not use are free to this process too.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached))
    override = os.environ.get("HGPROMPT_MEMORY_LIMIT_MB")  # for tests and for sharing a machine
    if override:
        return int(float(override) * 2**20)
    available = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 8 * 2**30
    # In a container, /proc/meminfo shows the host; the cgroup's limit is what counts.
    left = _cgroup_bytes_left()
    return min(available, left) if left is not None else available


def _cgroup_bytes_left() -> int | None:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as fh:
                raw = fh.read().strip()
            if raw == "max" or int(raw) >= 2**60:
                return None
            with open(usage_file) as fh:
                return max(0, int(raw) - int(fh.read().strip()))
        except (OSError, ValueError):
            continue
    return None


def activation_bytes_per_row(model, prompt_shape: tuple[int, ...], n_tokens: int) -> int:
    """Bytes autograd saves for one row (one sample under one prompt) of a prompted forward."""
    return _measure(model, tuple(prompt_shape), int(n_tokens), str(model.device), model.fingerprint, current_precision())


@lru_cache(maxsize=64)
def _measure(model, prompt_shape, n_tokens, device, fingerprint, precision) -> int:
    rows = 2
    saved: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        saved[key] = max(saved.get(key, 0), t.numel() * t.element_size())
        return t

    tokens = torch.zeros(rows, n_tokens, model.embed_dim, device=model.device)
    prompt = torch.zeros(rows, *prompt_shape, device=model.device, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(model.device):
        model.forward_rows(tokens, prompt)
    # Parameters are saved too but exist once, not per row.
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = sum(v for k, v in saved.items() if k not in params)
    return max(1, total // rows)


def rows_that_fit(model, prompt_shape: tuple[int, ...], n_tokens: int) -> int:
    per_row = activation_bytes_per_row(model, prompt_shape, n_tokens)
    return int(free_bytes(model.device) * SAFETY // per_row)


def check_fits(model, rows: int, prompt_shape: tuple[int, ...], n_tokens: int, what: str, fix: str) -> None:
    """Raise a clear :class:`UserInputError` when ``rows`` rows of a prompted forward + backward will not fit."""
    per_row = activation_bytes_per_row(model, prompt_shape, n_tokens)
    need, free = rows * per_row, free_bytes(model.device)
    if need > free * SAFETY:
        where = "GPU" if torch.device(model.device).type == "cuda" else "CPU"
        raise UserInputError(
            f"{what} needs about {need / 2**30:.2f} GiB of {where} memory for its activations "
            f"({rows} rows x {per_row / 2**20:.2f} MiB) but only {free / 2**30:.2f} GiB is free; {fix}"
        )
