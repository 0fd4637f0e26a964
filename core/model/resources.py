"""Will a run fit in memory? Measured activation sizes, free memory, and a clear message when it will not.

The batched gradient pass keeps the activations of ``K x N`` rows alive until
its backward; that is what runs out of memory first. ``activation_bytes_per_row``
measures, once per model and prompt shape, the bytes autograd saves for one row
(``torch.autograd.graph.saved_tensors_hooks``), so the estimate follows the
real model rather than a formula. ``rows_that_fit`` turns the free memory of the
device (``torch.cuda.mem_get_info`` on a GPU, ``MemAvailable`` on the CPU) into
a number of rows; the gradient code uses it to fall back to its chunked mode,
and ``check_fits`` raises a :class:`UserInputError` naming the sizes and the fix.

A pass without gradients keeps no activations: its peak is one block's temporaries (the MLP's hidden layer, the
attention's queries, keys and values) on top of the rows' tokens. ``forward_bytes_per_row`` measures that peak
(:class:`LiveTensorBytes`: every tensor an operation makes, counted until it is freed) at two row counts, and
``forward_rows_that_fit`` gives the rows one no-grad forward may take; every no-grad pass
(:func:`core.model.features.prompt_features`, and so the H-scores of many prompts, the plane, the tuning's
evaluations) is cut to it.
"""
from __future__ import annotations

import os
import weakref
from functools import lru_cache
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

from ..errors import UserInputError
from .device import autocast, current_precision

# Use at most this share of the free memory, leaving room for the allocator's slack and the rest of the process.
SAFETY = 0.6


def free_bytes(device: torch.device | str) -> int:
    """Bytes a run may still allocate on ``device`` (CUDA: free device memory; CPU: MemAvailable, or the container's
    limit), lowered to ``HGPROMPT_MEMORY_LIMIT_MB`` when that is set (for sharing a machine, and for tests)."""
    device = torch.device(device)
    limit = _override_bytes()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks PyTorch's caching allocator holds but does not use are free to this process too.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        free = int(free + max(0, cached))
        return free if limit is None else min(limit, free)
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
    return min(x for x in (available, left, limit) if x is not None)


def _override_bytes() -> int | None:
    override = os.environ.get("HGPROMPT_MEMORY_LIMIT_MB")
    if not override:
        return None
    try:
        mb = float(override)
    except ValueError:
        raise UserInputError(f"HGPROMPT_MEMORY_LIMIT_MB={override!r} is not a number of MiB; set it to e.g. 4096, or "
                             "unset it.") from None
    if not mb > 0:
        raise UserInputError(f"HGPROMPT_MEMORY_LIMIT_MB={override!r} must be a positive number of MiB; set it to e.g. "
                             "4096, or unset it.")
    return int(mb * 2**20)


def _cgroup_bytes_left() -> int | None:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
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
    return _measure(model, tuple(prompt_shape), int(n_tokens), str(model.device), model.fingerprint,
                    current_precision())


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


def gradient_bytes_per_row(model, prompt_shape: tuple[int, ...], n_tokens: int) -> int:
    """Bytes one row of a prompted forward + backward holds at its peak: the activations autograd saves, plus the
    temporaries of the block being computed (:func:`forward_bytes_per_row`)."""
    return (activation_bytes_per_row(model, prompt_shape, n_tokens)
            + forward_bytes_per_row(model, prompt_shape, n_tokens))


def rows_that_fit(model, prompt_shape: tuple[int, ...], n_tokens: int) -> int:
    per_row = gradient_bytes_per_row(model, prompt_shape, n_tokens)
    return int(free_bytes(model.device) * SAFETY // per_row)


def check_fits(model, rows: int, prompt_shape: tuple[int, ...], n_tokens: int, what: str, fix: str) -> None:
    """Raise a clear :class:`UserInputError` when ``rows`` rows of a prompted forward + backward will not fit."""
    per_row = gradient_bytes_per_row(model, prompt_shape, n_tokens)
    need, free = rows * per_row, free_bytes(model.device)
    if need > free * SAFETY:
        where = "GPU" if torch.device(model.device).type == "cuda" else "CPU"
        raise UserInputError(
            f"{what} needs about {need / 2**30:.2f} GiB of {where} memory for its activations "
            f"({rows} rows x {per_row / 2**20:.2f} MiB) but only {free / 2**30:.2f} GiB is free; {fix}"
        )


# ------------------------------------------------------------------ passes without gradients
class LiveTensorBytes(TorchDispatchMode):
    """Bytes held by the tensors that operations make inside the block, counted until each is freed; ``peak`` is the
    most held at once. A storage shared by views counts once; tensors that existed before the block (parameters, the
    caller's inputs) and views of them count nothing. Works the same on every device (it reads no allocator)."""

    def __init__(self, exclude: Callable[[], list[torch.Tensor]] = list):
        super().__init__()
        self.live = self.peak = 0
        self._exclude = exclude
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [live tensors, bytes]

    def __enter__(self):
        self._known = {t.untyped_storage().data_ptr() for t in self._exclude()}
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if ptr == 0 or ptr in self._known:
            return
        entry = self._storages.get(ptr)
        if entry is None:
            entry = self._storages[ptr] = [0, size]
            self.live += size
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self._storages.get(ptr)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._storages[ptr]
            self.live -= entry[1]


def peak_tensor_bytes(fn: Callable[[], object], exclude: Callable[[], list[torch.Tensor]] = list) -> int:
    """The peak bytes of the tensors ``fn()`` makes (see :class:`LiveTensorBytes`), outside any mode a caller has
    entered (a FLOP counter around the caller does not count this measurement)."""
    with _disable_current_modes():
        mode = LiveTensorBytes(exclude)
        with mode:
            out = fn()
        del out
    return mode.peak


def forward_bytes_per_row(model, prompt_shape: tuple[int, ...] | None, n_tokens: int) -> int:
    """Peak bytes one more row (one sample under one prompt; ``prompt_shape=None``: no prompt) adds to a forward
    without gradients, measured: the peak at 2 rows less the peak at 1 (what does not grow with the rows,
    such as the weights, cancels)."""
    shape = None if prompt_shape is None else tuple(int(x) for x in prompt_shape)
    return _measure_forward(model, shape, int(n_tokens), str(model.device), model.fingerprint)


@lru_cache(maxsize=64)
def _measure_forward(model, prompt_shape, n_tokens, device, fingerprint) -> int:
    def run(rows: int) -> int:
        def forward():
            # counted: a pass copies its rows
            tokens = torch.zeros(rows, n_tokens, model.embed_dim, device=model.device)
            prompts = None if prompt_shape is None else torch.zeros(rows, *prompt_shape, device=model.device)
            with torch.no_grad(), autocast(model.device):
                return model.forward_rows(tokens, prompts)

        return peak_tensor_bytes(forward, lambda: [*model.parameters(), *model.buffers()])

    return max(1, run(2) - run(1))


def forward_rows_that_fit(model, prompt_shape: tuple[int, ...] | None, n_tokens: int) -> int:
    """Rows one forward without gradients may take in the free memory (at least 1)."""
    per_row = forward_bytes_per_row(model, prompt_shape, n_tokens)
    return max(1, int(free_bytes(model.device) * SAFETY // per_row))
