"""Times the dashboard can promise: every job's work counted in rows through the backbone, priced by a slice timed on
this machine (:func:`core.model.cost.measure_cost`), and followed while it runs.

A job's :class:`Work` is what it will run: rows forward, rows backward, images embedded. Priced now, it is the
estimate shown before the click. While the job runs, the hooks of :func:`core.model.watch.watched` report every block
of every pass; a :class:`Meter` adds up the work they stand for, so the progress bar moves inside the longest pass,
and the time left follows the pace the job actually keeps (on a loaded machine everything runs slower than the
slice said, and the bar says so after a few seconds). Each finished job also tells the process how far its pace was
from the slice's price (:func:`calibration`), so the next estimate starts closer.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from core.model.cost import BlockCost, measure_cost

PRICE_TTL = 600.0  # seconds a measured price is reused (the load changes, but each job's own pace corrects it)


@dataclass(frozen=True)
class Work:
    """What a job runs: ``forward`` rows through every block, ``backward`` rows back through every block (a forward
    with gradients counts in both), ``images`` embedded."""

    forward: float = 0
    backward: float = 0
    images: float = 0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.forward + other.forward, self.backward + other.backward, self.images + other.images)

    def __mul__(self, k: float) -> "Work":
        return Work(self.forward * k, self.backward * k, self.images * k)

    __rmul__ = __mul__

    def seconds(self, cost: BlockCost) -> float:
        return cost.seconds(self.forward, self.backward, self.images)


_PRICES: dict[tuple, tuple[float, BlockCost]] = {}
_TIMING: dict[tuple, threading.Thread] = {}  # prices being timed, by the same key
_LOCK = threading.Lock()
_PACE = [1.0, 0]  # the measured pace of finished jobs: seconds taken per second priced (a running mean), and how many


def price(model, prompt: torch.Tensor, wait: bool = True) -> BlockCost | None:
    """The cost of a row under ``prompt``'s shape on this machine, timed now (reused for :data:`PRICE_TTL` s).

    ``wait=False`` never blocks the page: without a fresh price it starts timing one in a background thread (once)
    and returns None; a later call finds it."""
    key = (model.fingerprint, tuple(prompt.shape), str(model.device))
    with _LOCK:
        kept = _PRICES.get(key)
        if kept is not None and time.monotonic() - kept[0] < PRICE_TTL:
            return kept[1]
        pending = _TIMING.get(key)
        if pending is None:
            pending = _TIMING[key] = threading.Thread(target=_time_slice, args=(key, model, prompt.detach().clone()),
                                                      name="hgprompt-price", daemon=True)
            pending.start()
    if not wait:
        return None
    pending.join()
    with _LOCK:
        kept = _PRICES.get(key)
    return kept[1] if kept is not None else measure_cost(model, prompt, rows=16, images=4)  # (the thread failed)


def _time_slice(key: tuple, model, prompt: torch.Tensor) -> None:
    try:
        cost = measure_cost(model, prompt, rows=16, images=4)
        with _LOCK:
            _PRICES[key] = (time.monotonic(), cost)
    finally:
        with _LOCK:
            _TIMING.pop(key, None)


def calibration() -> float:
    """How many seconds a priced second took in the jobs this process has finished (1 before the first)."""
    return _PACE[0]


def _learn_pace(pace: float) -> None:
    with _LOCK:
        mean, n = _PACE
        n = min(n + 1, 5)  # a running mean over about the last five jobs: the machine's load changes
        _PACE[0], _PACE[1] = mean + (pace - mean) / n, n


@dataclass
class Meter:
    """A job's priced work and the work done so far, from the hooks' reports (``tick``)."""

    cost: BlockCost
    work: Work
    done: float = 0.0  # priced seconds of the work done
    began: float | None = None  # when the first pass began (after any wait in the queue)
    pace: float = field(default_factory=calibration)  # seconds per priced second, before the job's own is known

    @property
    def planned(self) -> float:
        return max(self.work.seconds(self.cost), 1e-9)

    def estimate(self) -> float:
        """Seconds the whole job should take here."""
        return self.planned * self.pace

    def tick(self, info: dict) -> None:
        if self.began is None:
            self.began = time.monotonic()
        self.done += self.cost.of_tick(info)

    def fraction(self) -> float:
        return min(0.99, self.done / self.planned)

    def measured_pace(self) -> float | None:
        """Seconds per priced second so far, once enough has run to say (a few seconds and a twentieth of it)."""
        if self.began is None:
            return None
        elapsed = time.monotonic() - self.began
        if elapsed < 3.0 or self.done < 0.05 * self.planned:
            return None
        return elapsed / self.done

    def seconds_left(self) -> float:
        pace = self.measured_pace() or self.pace
        return max(0.0, self.planned - self.done) * pace

    def finish(self) -> None:
        """Teach the process this job's pace (only a job that ran most of its work says something)."""
        pace = self.measured_pace()
        if pace is not None and self.done >= 0.5 * self.planned:
            _learn_pace(pace)


def duration(seconds: float) -> str:
    """``45 s``, ``3.5 min``, ``1.2 h``."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------------ the work of each job the dashboard starts
CHECK_ROWS = 8  # core.model.features.check_finite_features: every prompt on a few rows


def _fit_parts(k: int, n: int, params: dict, embed: bool, announce: bool) -> tuple[Work, int]:
    """A fit's work before its candidates (embedding, the check, the sources' H-scores, the source pass), and how many
    forward-backward passes of the ``n`` rows its candidates and the step off a vertex take."""
    regularizer = params.get("regularizer", "fishr")
    first = Work(images=n if embed else 0, forward=k * CHECK_ROWS + (k * n if announce else 0))
    source = Work(forward=k * n, backward=k * n * (1 + (regularizer == "fishr")))
    if regularizer == "interference":
        source = source + Work(forward=k * (k - 1) / 2 * n)
    return first + source, 1 + (params.get("mixing") == "task_arithmetic") + 1


def fit_work(k: int, n: int, params: dict, embed: bool = True, announce: bool = True, steps: int | None = None) -> Work:
    """An :class:`HGPromptEnsemble` fit with ``params`` on ``k`` sources and ``n`` target samples, at most every step
    (``embed``: the sample's images are not embedded yet): the sources' H-scores (``announce``: a fit with a callback
    scores them first, a forward of the ``k n`` rows), the source pass (forward and backward; the Fisher vectors one
    more backward; the interference regulariser a forward of every pair's midpoint), the candidates (the uniform
    point, and the full sum for task arithmetic), the step off a vertex, and every step (one forward-backward of the
    ``n`` rows each; ``steps``: that many instead of the cap)."""
    before, passes = _fit_parts(k, n, params, embed, announce)
    passes += int(params.get("steps", 30)) if steps is None else steps
    return before + Work(forward=passes * n, backward=passes * n)


def weights_work(k: int, n: int, params: dict, fits: int, embed: bool = True) -> Work:
    """A weights job of the evaluation protocol (:func:`core.evaluation.protocol.weights_job`) on one seed: one source
    pass (with the Fisher vectors), then ``fits`` fits that share it (their candidates and every step, at most)."""
    before, passes = _fit_parts(k, n, {**params, "regularizer": "fishr"}, embed, announce=False)
    passes += int(params.get("steps", 30))
    return before + fits * Work(forward=passes * n, backward=passes * n)


def interference_work(k: int, n: int, points: int = 5, n_random: int | None = None, embed: bool = True) -> Work:
    """:func:`core.analysis.interference.interference`: one gradient pass over the ``k`` sources and the random
    prompts, and a forward of the inner points of every pair's segment."""
    m = k if n_random is None else n_random
    pairs = k * (k - 1) / 2
    return Work(images=n if embed else 0, forward=k * CHECK_ROWS + (k + m) * n + pairs * (points - 2) * n,
                backward=(k + m) * n)


def scoring_work(prompts: int, n: int, embed: bool = True) -> Work:
    """Scoring ``prompts`` prompts on ``n`` target samples without gradients (the simplex's grid, the per-class
    split, the plane's grid)."""
    return Work(images=n if embed else 0, forward=prompts * n)


def probe_work(prompts: int, sizes: dict[str, int], embedded: bool = False) -> Work:
    """``prompts`` linear probes (``tune_prompt`` with no epoch): the features of the train, val and test splits
    under each prompt (``embedded``: the splits' tokens are cached already)."""
    rows = sum(sizes.values())
    return Work(images=0 if embedded else rows, forward=prompts * (rows + CHECK_ROWS))


#: Said where an estimate will stand once its slice is timed (in the background: the page never waits for it).
TIMING = "Timing a slice of it on this machine for an estimate ..."
