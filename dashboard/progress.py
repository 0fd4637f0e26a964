"""Times the dashboard can promise: every job's work counted in rows (:class:`core.model.cost.Work`, by the counters
of :mod:`core.model.cost`), priced on this machine (:func:`core.model.cost.measure_row_cost`), and followed while it
runs.

Priced now, a job's work is the estimate shown before the click; the price is timed in a background thread so that
the page never waits for it (:func:`price`). While the job runs, the hooks of :func:`core.model.watch.watched` report
every block of every pass; a :class:`Meter` adds up the seconds they stand for, so the progress bar moves inside the
longest pass, and the time left follows the pace the job actually keeps (on a loaded machine everything runs slower
than the price said, and the bar says so after a few seconds). Each finished job also tells the process how far its
pace was from its price (:func:`calibration`), so the next estimate starts closer.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from core.model.cost import RowCost, Work, measure_row_cost

PRICE_TTL = 600.0  # seconds a measured price is reused (the load changes, but each job's own pace corrects it)


_PRICES: dict[tuple, tuple[float, RowCost]] = {}
_TIMING: dict[tuple, threading.Thread] = {}  # prices being timed, by the same key
_LOCK = threading.Lock()
_PACE = [1.0, 0]  # the measured pace of finished jobs: seconds taken per second priced (a running mean), and how many


def price(model, prompt: torch.Tensor, wait: bool = True) -> RowCost | None:
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
    return kept[1] if kept is not None else measure_row_cost(model, tuple(prompt.shape))  # (the thread failed)


def _time_slice(key: tuple, model, prompt: torch.Tensor) -> None:
    try:
        cost = measure_row_cost(model, tuple(prompt.shape))
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

    cost: RowCost
    work: Work
    done: float = 0.0  # priced seconds of the work done
    began: float | None = None  # when the first pass began (after any wait in the queue)
    pace: float = field(default_factory=calibration)  # seconds per priced second, before the job's own is known

    @property
    def planned(self) -> float:
        return max(self.cost.seconds(self.work), 1e-9)

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


#: Said where an estimate will stand once its slice is timed (in the background: the page never waits for it).
TIMING = "Timing a slice of it on this machine for an estimate ..."
