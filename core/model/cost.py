"""What a job costs, said before it starts and followed while it runs: rows counted, FLOPs counted, seconds measured.

A *row* is one sample under one prompt through the prompted ViT's blocks (:meth:`PromptedViT.forward_rows`). Every
job of the method is rows (:class:`Work`): forward through every block (with or without a graph), backward through
every block (each backward of a graph: the Fisher vectors' second backward counts again), and images through the
patch embedding, exactly what :func:`core.model.watch.watched` reports block by block. The counters below
(:func:`fit_work`, :func:`tune_work`, :func:`interference_work`, ...) give a job's rows from its sizes; the estimators
that know their options say theirs through them (``HGPromptEnsemble.work``, :func:`core.evaluation.protocol.seed_work`).

One price turns rows into time: :func:`row_cost` counts a row's FLOPs with PyTorch's ``FlopCounterMode`` (forward,
backward, one image's embedding) and times a forward and backward here, so a job costs its FLOPs (what the estimate
on the reference GPU is projected from) times the seconds a FLOP took here (:meth:`RowCost.seconds`). A report of
one block of one pass stands for a ``depth``-th of its rows' FLOPs (:meth:`RowCost.of_tick`), which is how the
dashboard's progress bar moves inside a pass. The time is measured on a few rows (2, or more for a small model): a
large batch runs faster a row, so an estimate errs long; a job that runs follows its own pace
(``dashboard.progress.Meter``).
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
#: Rows of the check that every prompt's features are finite (core.model.features.check_finite_features).
CHECK_ROWS = 8


@dataclass(frozen=True)
class Work:
    """Rows of a job: ``forward`` rows through every block (a forward with gradients counts here and in
    ``backward``), ``backward`` rows back through every block, ``images`` through the patch embedding."""

    forward: float = 0
    backward: float = 0
    images: float = 0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.forward + other.forward, self.backward + other.backward, self.images + other.images)

    def __mul__(self, times: float) -> "Work":
        return Work(self.forward * times, self.backward * times, self.images * times)

    __rmul__ = __mul__


# ------------------------------------------------------------------ the rows of each job
def source_pass_work(k: int, n: int, fishr: bool = False, mixing: bool = False) -> Work:
    """:func:`core.method.source_pass.measure_sources` of ``k`` sources on ``n`` samples: one forward and backward
    of the ``k n`` rows (whose forward also gives each source's H-score), one more backward for the Fisher vectors
    (``fishr``), a forward of every pair's midpoint for the mixing losses (``mixing``)."""
    return Work(forward=k * n + (k * (k - 1) // 2 * n if mixing else 0), backward=k * n * (2 if fishr else 1))


def fit_work(k: int, n: int, steps: int, *, fishr: bool = False, mixing: bool = False, candidates: int = 1,
             start: int = 1, images: int = 0, shared: bool = False) -> Work:
    """An ensemble fit of ``k`` sources on ``n`` target samples, at most: ``images`` embedded (the sample, when its
    split is not embedded yet), the check that the features are finite, the source pass (:func:`source_pass_work`;
    none when ``shared``: a weights job's fits share one), then one evaluation of the objective (a forward and
    backward of the ``n`` rows) for each of the ``candidates`` that are not single sources, ``start`` to start from
    a vertex (the step off it; one more when the source pass's gradient is not the objective's), and every one of
    the ``steps``. ``HGPromptEnsemble.work`` says these from a fit's options."""
    evaluations = candidates + start + steps
    work = Work(forward=k * min(CHECK_ROWS, n), images=images) + evaluations * Work(forward=n, backward=n)
    return work if shared else work + source_pass_work(k, n, fishr, mixing)


def tune_work(epochs: int, n_train: int, n_val: int, n_test: int, prompt: bool = True, train_accuracy: bool = True,
              images: int = 0) -> Work:
    """One tune (:func:`core.tuning.tune.tune_prompt`, the probe-fitted head): ``images`` embedded (the splits not
    embedded yet), the check of the initial prompt, the train split's features for the head, the val split before
    the first epoch and after each, ``epochs`` passes over the train split (forward and backward), the train split
    once more (the final train accuracy, unless not ``train_accuracy``) and the test split. A linear probe
    (``prompt=False``) computes each split's features once."""
    if not prompt:
        return Work(forward=n_train + n_val + n_test, images=images)
    forward = (min(CHECK_ROWS, n_train) + n_train + n_val + epochs * (n_train + n_val)
               + (n_train if train_accuracy else 0) + n_test)
    return Work(forward=forward, backward=epochs * n_train, images=images)


def probe_work(prompts: int, sizes: dict[str, int], embedded: bool = False) -> Work:
    """``prompts`` linear probes under fixed prompts (``tune_prompt`` with no epoch and no train accuracy) on a task
    of split ``sizes`` (``embedded``: its splits' tokens are cached already)."""
    n = [sizes.get(s, 0) for s in ("train", "val", "test")]
    return (prompts * tune_work(0, *n, train_accuracy=False)
            + Work(images=0 if embedded else sum(sizes.values())))


def interference_work(k: int, n: int, points: int = 5, n_random: int | None = None, embed: bool = True) -> Work:
    """:func:`core.analysis.interference.interference`: the sample embedded (``embed``), the check, one gradient
    pass over the ``k`` sources and the random prompts (``n_random``, default ``k``), and a forward of the inner
    points of every pair's segment."""
    m = k if n_random is None else n_random
    pairs = k * (k - 1) // 2
    return Work(images=n if embed else 0, forward=k * min(CHECK_ROWS, n) + (k + m) * n + pairs * (points - 2) * n,
                backward=(k + m) * n)


def scoring_work(prompts: int, n: int, embed: bool = True) -> Work:
    """Scoring ``prompts`` prompts on ``n`` target samples without gradients (the simplex's grid, the per-class
    split, the plane's grid), the sample embedded first (``embed``)."""
    return Work(images=n if embed else 0, forward=prompts * n)


# ------------------------------------------------------------------ the price of a row
@dataclass(frozen=True)
class RowCost:
    """One row's FLOPs (``forward`` through the blocks, its ``backward`` alone to the prompt), one image's through
    the embedding, and the seconds a FLOP of a forward and backward took on ``device`` (measured)."""

    forward_flops: float
    backward_flops: float
    embed_flops: float
    seconds_per_flop: float
    device: str

    def flops(self, work: Work) -> float:
        return (work.forward * self.forward_flops + work.backward * self.backward_flops
                + work.images * self.embed_flops)

    def seconds(self, work: Work) -> float:
        """``work``'s time here, at the measured seconds per FLOP."""
        return self.flops(work) * self.seconds_per_flop

    def of_tick(self, info: dict) -> float:
        """The seconds one report of :func:`core.model.watch.watched` stands for: one block of one pass (its rows'
        FLOPs over the depth), or the embedding of its rows' images."""
        rows, kind = info.get("rows", 0), info.get("pass")
        if kind == "embed":
            return rows * self.embed_flops * self.seconds_per_flop
        per_row = self.backward_flops if kind == "backward" else self.forward_flops
        return rows * per_row / max(1, info.get("depth", 1)) * self.seconds_per_flop


def n_tokens(model) -> int:
    """Tokens a row of ``model`` carries before its prompt (prefix + patches)."""
    c, h, w = model.data_config()["input_size"]
    with torch.no_grad():
        return int(model.embed(torch.zeros(1, c, h, w, device=model.device)).shape[1])


def row_cost(model, prompt_shape: tuple[int, ...], tokens: int | None = None) -> RowCost:
    """:func:`measure_row_cost`, measured once a process (a command's estimate)."""
    tokens = n_tokens(model) if tokens is None else int(tokens)
    return _row_cost(model, tuple(int(x) for x in prompt_shape), tokens, str(model.device), model.fingerprint)


@lru_cache(maxsize=32)
def _row_cost(model, prompt_shape, tokens, device, fingerprint) -> RowCost:
    return measure_row_cost(model, prompt_shape, tokens)


def measure_row_cost(model, prompt_shape: tuple[int, ...], tokens: int | None = None) -> RowCost:
    """The FLOPs of one row under a prompt of ``prompt_shape`` (counted once a process) and the seconds per FLOP
    here, timed now (the load of the machine changes: the dashboard times it again now and then)."""
    tokens = n_tokens(model) if tokens is None else int(tokens)
    shape = tuple(int(x) for x in prompt_shape)
    fwd, both, embed = _row_flops(model, shape, tokens, str(model.device), model.fingerprint)

    def run(rows: int) -> float:
        x = torch.zeros(rows, tokens, model.embed_dim, device=model.device)
        p = torch.zeros(rows, *shape, device=model.device, requires_grad=True)
        _sync(model.device)
        t0 = time.perf_counter()
        with autocast(model.device):
            out = model.forward_rows(x, p)
        out.float().sum().backward()
        _sync(model.device)
        return time.perf_counter() - t0

    run(1)  # warm-up
    rows, seconds = 2, run(2)
    while seconds < 0.25 and rows < 256:  # a small model: time enough rows to be measurable
        rows *= 4
        seconds = run(rows)
    return RowCost(fwd, both - fwd, embed, seconds / max(1.0, both * rows), str(model.device))


@lru_cache(maxsize=32)
def _row_flops(model, prompt_shape, tokens, device, fingerprint) -> tuple[float, float, float]:
    """One row's FLOPs forward, forward and backward, and one image's through the embedding (counted, not timed:
    the counter is slow)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, tokens, model.embed_dim, device=model.device)
    p = torch.zeros(1, *prompt_shape, device=model.device, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        with autocast(model.device):
            out = model.forward_rows(x, p)
        forward = counter.get_total_flops()
        out.float().sum().backward()
    both = counter.get_total_flops()
    c, h, w = model.data_config()["input_size"]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.embed(torch.zeros(1, c, h, w, device=model.device))
    return float(forward), float(both), float(counter.get_total_flops())


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
        rows = f"{w.forward:.0f} rows forward, {w.backward:.0f} backward" + (
            f", {w.images:.0f} images embedded" if w.images else "")
        text = (f"about {_si(self.flops)}FLOP ({rows}, at {_si(self.row.forward_flops)}FLOP a row forward), "
                f"~{_duration(self.seconds)} on this {where}")
        if not self.row.device.startswith("cuda"):
            text += f"; ~{_duration(self.gpu_seconds)} on {GPU_REFERENCE[0]}"
        if self.long:
            return (f"warning: this run is long: {text}. A GPU (--device cuda)" + (f" or {shorter}" if shorter else "")
                    + " would shorten it; Ctrl-C stops it and keeps the run folder, marked incomplete.")
        return f"estimate: {text}."


def estimate(model, work: Work, prompt_shape: tuple[int, ...], tokens: int | None = None) -> Estimate:
    """The cost of ``work`` on ``model`` under prompts of ``prompt_shape``."""
    row = row_cost(model, prompt_shape, tokens)
    return Estimate(work, row.flops(work), row.seconds(work), row)


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
