"""Shared resources and background jobs for the dashboard.

The dashboard runs on a workspace (:class:`core.evaluation.setups.Workspace`: one backbone, one bank folder, the
targets): the one ``python -m core dashboard --backbone ... --bank ... --targets ...`` started the server on
(``HGPROMPT_WORKSPACE``), the one a session opened in the sidebar's "Model" section, or the embedded default. The
backbones, banks and tasks are loaded once per process (``st.cache_resource`` and the workspace's own caches, keyed
by the backbone's spec and weight file and the bank's files), so two workspaces on one server never mix. Heavy work runs
in a background thread per job so the page stays live and a Stop button really stops it; jobs share one process-wide
slot (a semaphore), so two users' runs are serialised and the second sees
"queued" rather than competing for the CPU or GPU. Each browser session has
its own run folder, so sessions never see or overwrite each other's runs.
"""
from __future__ import annotations

import json
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
from core.evaluation.setups import Workspace, load_backbone
from core.io.digest import settings_digest
from core.io.safe_io import DISK_ERRORS, atomic_write_bytes, load_json
from core.model.backbones import BackboneSpec
from core.model.watch import watched

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS_ROOT = os.environ.get("HGPROMPT_RUNS", os.path.join(ROOT, "runs", "dashboard"))
MAX_CONCURRENT_JOBS = int(os.environ.get("HGPROMPT_MAX_JOBS", "1"))
MAX_UPLOAD_MB = 200
MAX_SOURCES = 32
#: The folders a local path typed into the target box may be in (HGPROMPT_DATA_ROOTS, separated by os.pathsep):
#: by default the folder the server was started in and its user's home. A path elsewhere is refused without saying
#: anything about it, so a browser cannot probe the server's other folders.
DATA_ROOTS = [os.path.realpath(os.path.expanduser(p)) for p in
              os.environ.get("HGPROMPT_DATA_ROOTS", os.pathsep.join([os.getcwd(), "~"])).split(os.pathsep) if p]


WORKSPACE_ENV = "HGPROMPT_WORKSPACE"  # the workspace's JSON (or a JSON file's path), set by `python -m core dashboard`
WORKSPACE_KEY = "workspace"  # session state: the workspace this session opened in the sidebar (its to_dict())
EMBEDDED = Workspace()
DEVICE = os.environ.get("HGPROMPT_DEVICE") or None  # None: CUDA when present


def launch_workspace() -> Workspace:
    """The workspace the server was started on (``HGPROMPT_WORKSPACE``), else the embedded default."""
    return _parse_workspace(os.environ.get(WORKSPACE_ENV, ""))


def _parse_workspace(text: str) -> Workspace:
    if not text.strip():
        return EMBEDDED
    if not text.lstrip().startswith("{"):
        return Workspace.from_dict(load_json(text))
    return Workspace.from_dict(json.loads(text))


def current_workspace() -> Workspace:
    """This session's workspace: the one it opened in the sidebar, else the server's."""
    try:
        data = st.session_state.get(WORKSPACE_KEY)
    except Exception:  # outside a session (a test calling in): the server's
        data = None
    return Workspace.from_dict(data) if data else launch_workspace()


@st.cache_resource(show_spinner="Loading the backbone ...", max_entries=4)
def _backbone(key: str, spec: dict) -> PromptedViT:  # key: the spec and its weight file's stamp
    return load_backbone(BackboneSpec.from_dict(spec), DEVICE)


def backbone(ws: Workspace | None = None) -> PromptedViT:
    """The backbone of ``ws`` (default: this session's workspace), loaded once per server process."""
    spec = (ws or current_workspace()).backbone
    return _backbone(spec.key(), spec.to_dict())


@st.cache_resource(show_spinner=False)
def shipped_bank(kind: str = "shallow") -> PromptBank:
    """The embedded default's source prompts: ``shallow`` (tokens before the first block) or ``deep`` (before every
    block; empty when the assets were built without them)."""
    if kind == "deep":
        if not os.path.isdir(assets.DEEP_PROMPTS_DIR):
            return PromptBank([])
        return PromptBank.load(assets.DEEP_PROMPTS_DIR, model=backbone(EMBEDDED))
    return PromptBank.load(assets.PROMPTS_DIR, model=backbone(EMBEDDED))


def workspace_bank(kind: str = "shallow", ws: Workspace | None = None) -> PromptBank:
    """The source prompts of ``ws`` (default: this session's workspace) of one ``kind``: the embedded default's
    shipped banks, or the workspace's bank folder (its prompts under their kind, the other kind empty)."""
    ws = ws or current_workspace()
    if ws.bank is None:
        return shipped_bank(kind)
    bank = ws.load_bank(backbone(ws))  # checked against the backbone; read again when its files change
    return bank if bank[0].kind == kind else PromptBank([])


def workspace_targets(ws: Workspace | None = None) -> dict[str, str]:
    """The targets of ``ws`` (default: this session's workspace), name -> path."""
    return (ws or current_workspace()).target_paths()


def default_target(ws: Workspace | None = None) -> str | None:
    """The target a page opens on: the embedded default's (shapes_quad) among the shipped ones, else the first."""
    targets = workspace_targets(ws)
    first = assets.default_target()
    return first if first in targets else next(iter(targets), None)


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
def queue_turn() -> threading.Condition:
    """Guards :func:`waiting` and wakes the waiting jobs when a slot frees or the queue's head changes."""
    return threading.Condition()


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
        valid = len(given) == 12 and all(c in "0123456789abcdef" for c in given)
        st.session_state.sid = given if valid else uuid.uuid4().hex[:12]
    if st.query_params.get("sid") != st.session_state.sid:
        st.query_params["sid"] = st.session_state.sid
    return st.session_state.sid


def session_dir(kind: str) -> str:
    """This session's folder of ``kind`` (made when missing). On a full or read-only disk it is returned unmade:
    readers find nothing in it, writers fail with a message, and the page says why (:func:`storage_problem`)."""
    path = os.path.join(RUNS_ROOT, session_id(), kind)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        pass
    return path


def storage_problem() -> str | None:
    """Why this session's runs cannot be saved (the runs folder is on a full or read-only disk, or not writable), or
    None: checked once per browser session by writing a small file, so the first page load never fails on it."""
    if "storage_problem" not in st.session_state:
        problem = None
        try:
            folder = os.path.join(RUNS_ROOT, session_id())
            os.makedirs(folder, exist_ok=True)
            atomic_write_bytes(os.path.join(folder, ".writable"), b"ok\n")
        except (OSError, UserInputError) as exc:
            cause = exc.__cause__ if isinstance(exc, UserInputError) and isinstance(exc.__cause__, OSError) else exc
            code = getattr(cause, "errno", None)
            problem = ("Runs cannot be saved on this server: "
                       f"{DISK_ERRORS.get(code, 'its runs folder cannot be written')} "
                       f"({os.strerror(code) if code else cause.__class__.__name__}). You can look around, but Run is "
                       "off until whoever runs the server frees space or points HGPROMPT_RUNS at a writable folder.")
        st.session_state.storage_problem = problem
    return st.session_state.storage_problem


def local_path(text: str) -> str:
    """A local path typed into the dashboard, if it is inside one of :data:`DATA_ROOTS` (links resolved), else a
    :class:`UserInputError` that says where local paths may be and names nothing outside those folders."""
    if not text.strip() or "\x00" in text:
        raise UserInputError("give a local path (a VTAB-1k folder, class folders or a .npz file), without NUL bytes.")
    path = os.path.realpath(os.path.expanduser(text.strip()))
    if not any(os.path.commonpath([root, path]) == root for root in DATA_ROOTS):
        raise UserInputError(f"a local path must be inside {' or '.join(map(repr, DATA_ROOTS))} (the folders this "
                             f"server allows, HGPROMPT_DATA_ROOTS); {text.strip()[:200]!r} is not. Upload a zip "
                             "instead, or ask whoever runs the server to allow the folder.")
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
            slots, queue, turn = job_slots(), waiting(), queue_turn()
            with turn:
                queue.append(self.id)
                # First in, first out: only the job at the head of the queue takes a free slot (a semaphore alone lets
                # whichever waiter polls first take it: a job queued second once waited 126 s, one queued later 49 s).
                while not (queue[0] == self.id and slots.acquire(blocking=False)):
                    if self.stop.is_set():
                        queue.remove(self.id)
                        turn.notify_all()
                        self.status = "stopped"  # cancelled while queued
                        return
                    turn.wait(0.2)
                queue.remove(self.id)
                turn.notify_all()
            try:
                self._work()
            finally:
                slots.release()
                with turn:
                    turn.notify_all()
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
        except Exception as exc:  # shown in the page, with the traceback for a bug report
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
