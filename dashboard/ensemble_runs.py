"""Ensemble runs in the dashboard: fitted in a background job, served from the server's cache when another session
already ran the same, or read back from the session's run folder after a reload. Every one of them reaches the page
as a :class:`dashboard.run_result.RunResult` read from its folder."""
from __future__ import annotations

import os
import shutil
import threading
import time
from typing import Callable

from core import HGPromptEnsemble, PromptBank, UserInputError
from core.io.digest import tensor_digest
from core.io.runs import PARTIAL, RunWriter, list_runs
from core.io.safe_io import SCHEMAS, atomic_write_json, load_json
from core.method.record import EnsembleRecord
from core.metrics.h_score import resolve_n_samples
from core.model.tokens import cached_tokens
from core.model.watch import watched
from core.options import options
from dashboard.progress import TIMING, Meter, duration, price
from dashboard.run_result import RunResult
from dashboard.state import BackgroundJob, digest, finished_runs, job_slots, load_task, runs_in_flight


def defaults() -> dict:
    """The settings a run starts from: the estimator's defaults for every option the sidebar shows (what a class
    clicks on the default target, and what the lesson runs)."""
    return {name: opt.default for name, opt in options(HGPromptEnsemble).items() if opt.spec.ui}


def fit_meter(model, bank: PromptBank, task, params: dict, steps: int | None = None, wait: bool = True) -> Meter | None:
    """A fit's work on this machine, priced now (every step of its cap, or ``steps``): what its estimate says and
    its progress bar follows (``wait=False``: None while the price is being timed)."""
    n = resolve_n_samples(params.get("n_samples", "auto"), model.embed_dim, len(task.splits["train"]))
    est = HGPromptEnsemble(**{**params, **({} if steps is None else {"steps": steps})})
    work = est.work(len(bank), n, images=n if cached_tokens(model, task, "train") is None else 0)
    cost = price(model, bank.stack()[0], wait)
    return None if cost is None else Meter(cost, work)


def fit_estimate(model, bank: PromptBank, task, params: dict) -> str:
    """What a fit should take here, said before Run: up to its first step, and per step (most fits converge within a
    few, many at their start)."""
    before = fit_meter(model, bank, task, params, steps=0, wait=False)
    if before is None:
        return TIMING
    step = fit_meter(model, bank, task, params, steps=1).estimate() - before.estimate()
    cap = int(params.get("steps", 30))
    return (f"About {duration(before.estimate())} on this machine up to the first step, then about {duration(step)} a "
            f"step, at most {cap} (a fit ends once converged, often at its start): timed just now on a slice of it.")


def run_key(model, bank: PromptBank, task_path: str, params: dict) -> str:
    """What a run's result depends on: the backbone, the prompts' values, the target file, the settings and seed."""
    stat = os.stat(task_path)
    prompts = [tensor_digest(sp.prompt) for sp in bank]
    return digest(model.fingerprint, bank.names, prompts, os.path.realpath(task_path), stat.st_size, stat.st_mtime_ns,
                  sorted(params.items()))


def copy_run(done: RunResult, folder: str) -> RunResult:
    """A finished run copied into this session's run folder under a new id (its ``run.json`` says so, and which run it
    copies: two copies of one run are two runs to every list), marked as served from the cache."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    new_id = f"{stamp}-learn-{os.urandom(3).hex()}"
    path = os.path.join(folder, new_id)
    scratch = path + PARTIAL  # copied under ID.partial and renamed when its run.json is its own: never half a copy
    try:
        shutil.copytree(done.run_path, scratch)
        info = load_json(os.path.join(scratch, "run.json"), schema=SCHEMAS["run"])
        atomic_write_json(os.path.join(scratch, "run.json"), {**info, "id": new_id, "served_from": done.id})
        os.replace(scratch, path)
    except (OSError, shutil.Error, UserInputError) as exc:  # a full disk: said, and no half copy is left
        shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(exc, UserInputError):
            raise
        why = getattr(exc, "strerror", None) or exc.__class__.__name__  # never the server's paths
        raise UserInputError(f"the run could not be copied into this session's folder ({why}); free space on the "
                             "runs folder's disk.") from exc
    return done.copied(new_id, path)


def run_ensemble(job: BackgroundJob, model, bank: PromptBank, task, task_path: str, params: dict, folder: str,
                 key: str | None = None) -> dict:
    """The job: fit, write the run folder, and keep the result in the server's cache when it ran to its end."""
    try:
        return _fit_and_write(job, model, bank, task, task_path, params, folder, key)
    finally:  # only now: until the finished run is in the cache, an identical request follows this job
        if key is not None and runs_in_flight().get(key) is job:
            runs_in_flight().pop(key, None)


def _fit_and_write(job: BackgroundJob, model, bank: PromptBank, task, task_path: str, params: dict, folder: str,
                   key: str | None) -> dict:
    ens = HGPromptEnsemble(**params).fit(model, bank, task=task, callback=job.report, should_stop=job.stop)
    config = {**params, "sources": bank.names, "source_digests": [tensor_digest(sp.prompt) for sp in bank],
              "target": task.name, "target_path": task_path,
              "backbone_name": model.name, "backbone_fingerprint": model.fingerprint, "source": "dashboard"}
    with RunWriter(folder, "learn", config) as run:
        EnsembleRecord.from_fit(ens).write(run, model)
        run.write_json("metrics.json", {"ensemble_hscore": ens.ensemble_hscore_, "seconds": ens.fit_seconds_,
                                        "stopped": ens.stopped_})
    res = RunResult.from_folder(run.path, bank=bank, n_classes=task.num_classes)
    if key is not None and not ens.stopped_:
        cache = finished_runs()
        while len(cache) >= 64:  # the oldest go first; their run folders stay on disk
            cache.pop(next(iter(cache)))
        cache[key] = res
    return res


_START = threading.Lock()  # two sessions clicking Run at the same moment: one leads, the other follows


def start_or_serve(model, bank: PromptBank, task_path: str, params: dict, folder: str, job_key: str,
                   result_key: str) -> bool:
    """Start a run as a background job under ``st.session_state[job_key]``; True when a job was started.

    A run is deterministic for its inputs, so an identical run is never computed twice on a server: finished, a copy
    of it (in ``folder``) goes straight into ``st.session_state[result_key]``; still computing, this session's job
    follows it (showing its progress, taking no job slot) and gets a copy when it ends."""
    import streamlit as st

    task = load_task(task_path)
    key = run_key(model, bank, task_path, params)
    st.session_state.pop(result_key, None)
    st.session_state.lam_running = params.get("lam", 0.0)
    st.session_state.mixing_running = params.get("mixing", "average")
    with _START:
        done = finished_runs().get(key)
        if done is not None and os.path.isdir(done.run_path):
            st.session_state[result_key] = copy_run(done, folder)
            return False
        lead = runs_in_flight().get(key)
        if lead is not None and not lead.finished:
            job = BackgroundJob("ensemble",
                                lambda job: _follow(job, lead, model, bank, task, task_path, params, folder, key),
                      heavy=False)
            job.progress, job.meter = lead.progress, lead.meter  # the leading run's steps and progress, live
        else:
            job = BackgroundJob("ensemble",
                                lambda job: run_ensemble(job, model, bank, task, task_path, params, folder, key),
                                model=model, meter=fit_meter(model, bank, task, params))
            runs_in_flight()[key] = job
        st.session_state[job_key] = job.start()
    return True


def _follow(job: BackgroundJob, lead: BackgroundJob, model, bank, task, task_path: str, params: dict, folder: str,
            key: str) -> dict:
    """Wait for an identical run another session started, then take a copy of it; compute it after all when that run
    was stopped or failed."""
    while not lead.finished:
        if job.stop.wait(0.2):
            raise UserInputError("stopped while waiting for an identical run of another session; nothing was saved.")
    if lead.status == "done":
        return copy_run(lead.result, folder)
    job.progress, job.meter = [], fit_meter(model, bank, task, params)
    with job_slots(), watched(model, job.stop, job.tick):
        return run_ensemble(job, model, bank, task, task_path, params, folder, key)


def latest_result(folder: str, banks: Callable[[list[str]], PromptBank | None],
                  fingerprint: str | None = None) -> RunResult | None:
    """The newest complete ensemble run in ``folder`` that can be read back (of the backbone with ``fingerprint``
    when given: a run of another workspace is not this one's), or None."""
    for r in list_runs(folder):
        if r.get("command") != "learn":
            continue
        if fingerprint is not None and r["config"].get("backbone_fingerprint") != fingerprint:
            continue
        try:
            return RunResult.from_folder(r["path"], banks, restored=True)
        except (UserInputError, KeyError, OSError):
            continue
    return None
