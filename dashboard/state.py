"""Shared resources and background jobs for the dashboard.

The backbone, the shipped bank and tasks are loaded once per process
(``st.cache_resource``). Heavy work runs in a background thread per job so the
page stays live and a Stop button really stops it; jobs share one process-wide
slot (a semaphore), so two users' runs are serialised and the second sees
"queued" rather than competing for the CPU or GPU. Each browser session has
its own run folder, so sessions never see or overwrite each other's runs.
"""
from __future__ import annotations

import os
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import streamlit as st
import torch

from core import PromptBank, PromptedViT, Task, UserInputError, assets
from core.errors import StopRequested
from core.io.digest import settings_digest
from core.model.watch import watched

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS_ROOT = os.environ.get("HGPROMPT_RUNS", os.path.join(ROOT, "runs", "dashboard"))
MAX_CONCURRENT_JOBS = int(os.environ.get("HGPROMPT_MAX_JOBS", "1"))
MAX_UPLOAD_MB = 200
MAX_SOURCES = 32


@st.cache_resource(show_spinner="Loading the backbone ...")
def backbone() -> PromptedViT:
    assets.require()
    return PromptedViT.from_directory(assets.BACKBONE_DIR)


@st.cache_resource(show_spinner=False)
def shipped_bank(kind: str = "shallow") -> PromptBank:
    """The shipped source prompts: ``shallow`` (tokens before the first block) or ``deep`` (before every block; empty
    when the assets were built without them)."""
    if kind == "deep":
        if not os.path.isdir(assets.DEEP_PROMPTS_DIR):
            return PromptBank([])
        return PromptBank.load(assets.DEEP_PROMPTS_DIR, model=backbone())
    return PromptBank.load(assets.PROMPTS_DIR, model=backbone())


@st.cache_resource(show_spinner=False, max_entries=32)
def load_task(path: str) -> Task:
    return Task.load(path)


@st.cache_resource(show_spinner=False)
def job_slots() -> threading.Semaphore:
    return threading.Semaphore(MAX_CONCURRENT_JOBS)


@st.cache_resource(show_spinner=False)
def waiting() -> list:
    """The ids of the jobs waiting for a slot, oldest first (a job's place in the queue is its index here)."""
    return []


@st.cache_resource(show_spinner=False)
def live_jobs() -> dict:
    """Every job of this server that has not finished, by id (queued or running): what a queued job waits for."""
    return {}


@st.cache_resource(show_spinner=False)
def runs_in_flight() -> dict:
    """Ensemble runs started on this server and not finished yet, by the same digest as :func:`finished_runs`: a
    session asking for an identical run while one is computing waits for that one instead of queueing its own."""
    return {}


@st.cache_resource(show_spinner=False)
def finished_runs() -> dict:
    """Finished ensemble runs of this server by a digest of everything they depend on (a run is deterministic for its
    backbone, prompts, target, settings and seed): an identical run is served from here instead of computed again."""
    return {}


def session_id() -> str:
    """This browser session's id, kept in the page's URL (``?sid=``): a reload, or a second tab on the same URL,
    finds the same run folder and so lists the same runs."""
    if "sid" not in st.session_state:
        given = st.query_params.get("sid", "")
        st.session_state.sid = given if len(given) == 12 and all(c in "0123456789abcdef" for c in given) else uuid.uuid4().hex[:12]
    if st.query_params.get("sid") != st.session_state.sid:
        st.query_params["sid"] = st.session_state.sid
    return st.session_state.sid


def session_dir(kind: str) -> str:
    path = os.path.join(RUNS_ROOT, session_id(), kind)
    os.makedirs(path, exist_ok=True)
    return path


def runs_dir() -> str:
    return session_dir("runs")


def digest(*parts: Any) -> str:
    """A cache key of the dashboard's own (in-session) caches: a digest of the parts' ``repr``."""
    return settings_digest(*[repr(p) for p in parts], length=16)


@dataclass
class BackgroundJob:
    """A computation the page started in a background thread, with progress, a stop flag and a result (not to be
    confused with a sweep's :class:`core.evaluation.sweep.Job`, a unit of work for Ray).

    Given the ``model`` it runs on, the job runs inside :func:`core.model.watch.watched`: a Stop is answered at the
    next block of any pass (the job then ends "stopped", with what its target returned, or None when it raised
    :class:`core.errors.StopRequested`), and with a ``meter`` (:class:`dashboard.progress.Meter`) every block moves
    its progress. ``estimate``: the seconds it should take, for a job without a meter (a tuning)."""

    kind: str
    target: Callable[["BackgroundJob"], Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    status: str = "queued"  # queued -> running -> done | stopped | failed
    progress: list[dict] = field(default_factory=list)
    result: Any = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    stop: threading.Event = field(default_factory=threading.Event)
    heavy: bool = True  # takes one of the job slots; a light job (waiting on another job) runs at once
    model: Any = None
    meter: Any = None
    estimate: float | None = None
    began: float | None = None  # when it started running (after its wait in the queue)

    def start(self) -> "BackgroundJob":
        live_jobs()[self.id] = self
        threading.Thread(target=self._run, name=f"hgprompt-{self.kind}-{self.id}", daemon=True).start()
        return self

    def _run(self) -> None:
        try:
            if not self.heavy:
                return self._work()
            slots, queue = job_slots(), waiting()
            queue.append(self.id)
            try:
                while not slots.acquire(timeout=0.2):
                    if self.stop.is_set():
                        self.status = "stopped"  # cancelled while queued
                        return
            finally:
                queue.remove(self.id)
            try:
                self._work()
            finally:
                slots.release()
        finally:
            live_jobs().pop(self.id, None)

    def _work(self) -> None:
        try:
            self.status, self.began = "running", time.time()
            if self.model is not None:
                with watched(self.model, self.stop, self.tick):
                    self.result = self.target(self)
            else:
                self.result = self.target(self)
            self.status = "stopped" if self.stop.is_set() else "done"
            if self.meter is not None and self.status == "done":
                self.meter.finish()
        except StopRequested:
            self.status = "stopped"
        except UserInputError as exc:
            self.error, self.status = str(exc), "failed"
        except Exception as exc:  # noqa: BLE001 - shown in the page, with the traceback for a bug report
            if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(exc):
                self.error = (f"the run ran out of memory ({exc.__class__.__name__}); use fewer target samples or "
                              "sources, or wait for other runs to finish.")
            else:
                self.error = f"{exc.__class__.__name__}: {exc}\n\n{traceback.format_exc(limit=4)}"
            self.status = "failed"

    def tick(self, info: dict) -> None:
        """A report of :func:`core.model.watch.watched`: one block of one pass."""
        if self.meter is not None:
            self.meter.tick(info)

    @property
    def queue_position(self) -> int | None:
        """1 for the next job to start, None when not waiting."""
        queue = waiting()
        return queue.index(self.id) + 1 if self.id in queue else None

    @property
    def finished(self) -> bool:
        return self.status in ("done", "stopped", "failed")

    def report(self, info: dict) -> None:
        self.progress.append(info)

    def seconds_left(self) -> float | None:
        """Seconds this job still needs: its whole ``estimate`` less the time it has run, else its meter's (all of it
        while queued; at the pace it keeps while running); None when it has neither."""
        if self.finished:
            return 0.0
        if self.estimate is not None:
            return self.estimate if self.began is None else max(0.0, self.estimate - (time.time() - self.began))
        if self.meter is not None:
            return self.meter.estimate() if self.status == "queued" else self.meter.seconds_left()
        return None

    def wait_ahead(self) -> tuple[float | None, list["BackgroundJob"]]:
        """Seconds before this queued job starts, from what is ahead of it (the running jobs' time left and the
        estimates of the jobs queued before it, shared over the slots), and those jobs; None when one of them has
        no estimate."""
        jobs = live_jobs()
        queue = list(waiting())
        mine = queue.index(self.id) if self.id in queue else len(queue)
        ahead = [j for j in jobs.values() if j.heavy and j.status == "running"]
        ahead += [jobs[i] for i in queue[:mine] if i in jobs]
        left = [j.seconds_left() for j in ahead]
        if any(v is None for v in left):
            return None, ahead
        return sum(left) / max(1, MAX_CONCURRENT_JOBS), ahead
