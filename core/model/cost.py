"""What a run will cost, said before it starts: FLOPs counted on the model, seconds measured on this device.

A *row* is one sample under one prompt through the prompted ViT (:meth:`PromptedViT.forward_rows`). Every pass of
the method is rows: a forward without gradients (scores, evaluations), or a forward and a backward to the prompt
(the source pass, a weight step, a tuning step). :func:`row_cost` counts one row's FLOPs with PyTorch's
``FlopCounterMode`` (forward, and forward + backward) and times that same pass here, so a command's estimate is its
rows (:class:`Work`) times two measured numbers, not a formula of the architecture. The time is measured on a few
rows (2, or more for a small model, after the counted pass as a warm-up): a large batch runs faster a row, so the
estimate errs long.

The dashboard prices and follows its jobs in the same units, block by block: :func:`measure_cost` times a small slice
(a few rows forward without and with gradients, a few images through the embedding) as seconds per row and block
(:class:`BlockCost`), which scales to a job's rows before it starts and, fed the reports of
:func:`core.model.watch.watched` (every block and its rows), lets a progress bar move with the passes and the time
left follow the pace actually measured.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import torch

from .device import autocast

#: The GPU an estimate is also given for: an H100 SXM's dense bf16 peak (989 TFLOP/s) at an assumed 40 % of it.
GPU_REFERENCE = ("an H100 at 40 % of its bf16 peak", 989e12 * 0.4)
#: Past this many seconds here, the estimate is a warning with what would make the run shorter.
WARN_SECONDS = 30 * 60


@dataclass
class Work:
    """Rows of a run: ``forward`` without gradients, ``backward`` through a forward and a backward to the prompt,
    ``backward_again`` through one more backward of a graph already built (the Fisher vectors' pass)."""

    forward: int = 0
    backward: int = 0
    backward_again: int = 0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.forward + other.forward, self.backward + other.backward,
                    self.backward_again + other.backward_again)

    def __mul__(self, times: int) -> "Work":
        return Work(self.forward * times, self.backward * times, self.backward_again * times)

    __rmul__ = __mul__


@dataclass(frozen=True)
class RowCost:
    """One row's FLOPs (forward; forward + backward to the prompt) and the seconds a FLOP of a forward + backward
    took on ``device`` (measured)."""

    forward_flops: float
    backward_flops: float
    seconds_per_flop: float
    device: str

    def flops(self, work: Work) -> float:
        return (work.forward * self.forward_flops + work.backward * self.backward_flops
                + work.backward_again * (self.backward_flops - self.forward_flops))


def fit_work(k: int, n: int, steps: int, fishr: bool = True) -> Work:
    """The rows of an ensemble fit of ``k`` sources on ``n`` target samples: the check that the features are finite
    (8 samples), the source pass (one forward and backward of ``k x n`` rows, whose forward also gives each source's
    H-score; one more backward for the Fisher vectors when the fit's regulariser uses them), and at most ``steps`` + 2
    evaluations of the objective (the candidates, then one per step), ``n`` rows each."""
    return (Work(forward=8 * k) + Work(backward=k * n, backward_again=k * n if fishr else 0)
            + Work(backward=(steps + 2) * n))


def tune_work(epochs: int, n_train: int, n_val: int, n_test: int, prompt: bool = True) -> Work:
    """The rows of one tune: ``epochs`` passes over the train split (forward and backward), the val split after each
    epoch and before the first, the train split twice (the probe head's features, the final train accuracy), the
    test split once. A linear probe (``prompt=False``) computes each split's features once."""
    if not prompt:
        return Work(forward=n_train + n_val + n_test)
    return Work(forward=epochs * n_val + 2 * n_train + n_val + n_test, backward=epochs * n_train)


def evaluation_work(k: int, n: int, steps: int, fits: int, prompt_tunes: int, probes: int, epochs: int, n_train: int,
                    n_val: int, n_test: int) -> Work:
    """The rows of one (target, seed) of the evaluation protocol (:mod:`core.evaluation.protocol`): its weights job
    (one source pass of ``k`` sources on ``n`` samples with the Fisher vectors, then ``fits`` ensemble fits that share
    it, each at most ``steps`` + 2 evaluations) and its tune jobs (``prompt_tunes`` prompt tunes, ``probes`` linear
    probes)."""
    fit = Work(forward=8 * k, backward=(steps + 2) * n)
    return (Work(backward=k * n, backward_again=k * n) + fit * fits
            + tune_work(epochs, n_train, n_val, n_test) * prompt_tunes
            + tune_work(epochs, n_train, n_val, n_test, prompt=False) * probes)


def n_tokens(model) -> int:
    """Tokens a row of ``model`` carries before its prompt (prefix + patches)."""
    c, h, w = model.data_config()["input_size"]
    with torch.no_grad():
        return int(model.embed(torch.zeros(1, c, h, w, device=model.device)).shape[1])


def row_cost(model, prompt_shape: tuple[int, ...], tokens: int | None = None) -> RowCost:
    """FLOPs of one row under a prompt of ``prompt_shape`` and the measured seconds per FLOP here (cached)."""
    tokens = n_tokens(model) if tokens is None else int(tokens)
    return _row_cost(model, tuple(int(x) for x in prompt_shape), tokens, str(model.device), model.fingerprint)


@lru_cache(maxsize=32)
def _row_cost(model, prompt_shape, tokens, device, fingerprint) -> RowCost:
    from torch.utils.flop_counter import FlopCounterMode

    def run(rows: int, counter=None) -> tuple[float, float]:
        x = torch.zeros(rows, tokens, model.embed_dim, device=model.device)
        p = torch.zeros(rows, *prompt_shape, device=model.device, requires_grad=True)
        _sync(model.device)
        t0 = time.perf_counter()
        with autocast(model.device):
            out = model.forward_rows(x, p)
        forward = counter.get_total_flops() if counter is not None else 0
        out.float().sum().backward()
        _sync(model.device)
        return forward, time.perf_counter() - t0

    with FlopCounterMode(display=False) as counter:  # one row, counted (its time is not used: the counter is slow)
        fwd, _ = run(1, counter)
    both = counter.get_total_flops()
    rows, seconds = 2, run(2)[1]
    while seconds < 0.25 and rows < 256:  # a small model: time enough rows to be measurable
        rows *= 4
        seconds = run(rows)[1]
    return RowCost(float(fwd), float(both), seconds / max(1.0, both * rows), device)


def _sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Estimate:
    """A run's FLOPs and its time here (from :class:`RowCost`), with the work they came from."""

    work: Work
    flops: float
    seconds: float
    row: RowCost

    @property
    def gpu_seconds(self) -> float:
        return self.flops / GPU_REFERENCE[1]

    @property
    def long(self) -> bool:
        return self.seconds > WARN_SECONDS

    def message(self, shorter: str = "") -> str:
        """One paragraph: the FLOPs, the time here and on the reference GPU; past :data:`WARN_SECONDS` a warning
        that says what would make it shorter (``shorter``, e.g. "--n-samples 256")."""
        where = "GPU" if self.row.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
        w = self.work
        text = (f"about {_si(self.flops)}FLOP ({w.forward} rows forward, {w.backward} forward + backward, at "
                f"{_si(self.row.forward_flops)}FLOP a row forward), ~{_duration(self.seconds)} on this {where}")
        if not self.row.device.startswith("cuda"):
            text += f"; ~{_duration(self.gpu_seconds)} on {GPU_REFERENCE[0]}"
        if self.long:
            return (f"warning: this run is long: {text}. A GPU (--device cuda)" + (f" or {shorter}" if shorter else "")
                    + " would shorten it; Ctrl-C stops it and keeps the run folder, marked incomplete.")
        return f"estimate: {text}."


def estimate(model, work: Work, prompt_shape: tuple[int, ...], tokens: int | None = None) -> Estimate:
    """The cost of ``work`` rows on ``model`` under prompts of ``prompt_shape``."""
    row = row_cost(model, prompt_shape, tokens)
    flops = row.flops(work)
    return Estimate(work, flops, flops * row.seconds_per_flop, row)


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.0f} "


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 1 else "1 s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------ block by block (the dashboard's prices and pace)
@dataclass(frozen=True)
class BlockCost:
    """Seconds per row and block: ``forward`` (no gradients), ``backward`` (the backward of a forward that kept
    its graph); ``embed`` seconds per image through the embedding; ``depth`` blocks."""

    forward: float
    backward: float
    embed: float
    depth: int

    def seconds(self, forward_rows: float = 0, backward_rows: float = 0, images: float = 0) -> float:
        """Seconds for ``forward_rows`` rows through every block forward, ``backward_rows`` rows back through every
        block (a forward with gradients counts once in each), and ``images`` images embedded."""
        return self.depth * (forward_rows * self.forward + backward_rows * self.backward) + images * self.embed

    def of_tick(self, info: dict) -> float:
        """The seconds of work one report of :func:`core.model.watch.watched` stands for (one block of one pass)."""
        rows = info.get("rows", 0)
        if info.get("pass") == "embed":
            return rows * self.embed
        return rows * (self.backward if info.get("pass") == "backward" else self.forward)


def _now(device: torch.device) -> float:
    """The time once the device has finished what it was given (CUDA runs asynchronously)."""
    _sync(device)
    return time.perf_counter()


def measure_cost(model, prompt: torch.Tensor, rows: int = 32, images: int = 8) -> BlockCost:
    """Time a slice: ``rows`` rows under ``prompt`` (``(T, D)`` or ``(depth, T, D)``), forward without gradients
    and forward-backward to the prompt, and ``images`` random images through the embedding (each after an untimed
    warm-up of a few rows). About a second on the embedded default on 2 CPU cores."""
    device = model.device
    size = tuple(model.backbone.patch_embed.img_size)
    with torch.no_grad():
        model.embed(torch.rand(2, 3, *size, device=device))  # warm-up
        t0 = _now(device)
        tokens = model.embed(torch.rand(images, 3, *size, device=device))
        embed = (_now(device) - t0) / images
    tokens = tokens[torch.arange(rows, device=device) % images]
    p = prompt.detach().float().to(device)
    rows_of = lambda m: p.unsqueeze(0).expand(m, *p.shape)  # noqa: E731
    with torch.no_grad(), autocast(device):
        model.forward_rows(tokens[:4], rows_of(4))  # warm-up
        t0 = _now(device)
        model.forward_rows(tokens, rows_of(rows))
        forward = _now(device) - t0
    leaf = p.clone().requires_grad_(True)
    with autocast(device):
        t0 = _now(device)
        feats = model.forward_rows(tokens, leaf.unsqueeze(0).expand(rows, *p.shape))
    t1 = _now(device)
    torch.autograd.grad(feats.float().sum(), [leaf])
    backward = _now(device) - t1
    depth = max(1, model.depth)
    forward = max(forward, t1 - t0)  # (a forward that keeps its graph costs at least one that does not)
    return BlockCost(forward / (rows * depth), backward / (rows * depth), embed, depth)
