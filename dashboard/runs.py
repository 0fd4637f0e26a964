"""An ensemble run as the dashboard holds it: computed in a job, served from the server's cache, or read back from
its run folder after a reload."""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time

import numpy as np

from core import HGPromptEnsemble, PromptBank, SourcePrompt, UserInputError
from core.runs import RunWriter, list_runs, load_run, write_ensemble
from dashboard.state import Job, digest, finished_runs, job_slots, load_task, runs_in_flight

# A run's settings (the fit's parameters) and the sidebar's defaults: a run with these on the default target is what
# a class clicks, and what the lesson runs.
DEFAULTS = {"regularizer": "fishr", "lam": 1.0, "h_variant": "shrinkage", "start": "best", "optimizer": "eg",
            "steps": 30, "lr": 0.5, "n_samples": 256, "seed": 0}


def run_key(model, bank: PromptBank, task_path: str, params: dict) -> str:
    """What a run's result depends on: the backbone, the prompts' values, the target file, the settings and seed."""
    stat = os.stat(task_path)
    prompts = [hashlib.sha1(sp.prompt.detach().contiguous().numpy().tobytes()).hexdigest() for sp in bank]
    return digest(model.fingerprint, bank.names, prompts, os.path.realpath(task_path), stat.st_size, stat.st_mtime_ns,
                  sorted(params.items()))


def copy_run(done: dict, folder: str) -> dict:
    """A finished run copied into this session's run folder under a new id, marked as served from the cache."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    new_id = f"{stamp}-learn-{os.urandom(3).hex()}"
    path = os.path.join(folder, new_id)
    shutil.copytree(done["run_path"], path)
    return {**done, "id": new_id, "run_path": path, "served_from": done["id"]}


def run_ensemble(job: Job, model, bank: PromptBank, task, task_path: str, params: dict, folder: str,
                 key: str | None = None) -> dict:
    """The job: fit, write the run folder, and keep the result in the server's cache when it ran to its end."""
    try:
        return _fit_and_write(job, model, bank, task, task_path, params, folder, key)
    finally:  # only now: until the finished run is in the cache, an identical request follows this job
        if key is not None and runs_in_flight().get(key) is job:
            runs_in_flight().pop(key, None)


def _fit_and_write(job: Job, model, bank: PromptBank, task, task_path: str, params: dict, folder: str,
                   key: str | None) -> dict:
    ens = HGPromptEnsemble(**params).fit(model, bank, task=task, callback=job.report, should_stop=job.stop)
    config = {**params, "sources": bank.names, "target": task.name, "target_path": task_path,
              "backbone_name": model.name, "backbone_fingerprint": model.fingerprint, "source": "dashboard"}
    with RunWriter(folder, "learn", config) as run:
        write_ensemble(run, ens, model)
        run.write_json("metrics.json", {"ensemble_hscore": ens.ensemble_hscore_, "seconds": ens.fit_seconds_,
                                        "stopped": ens.stopped_})
    c = ens.conflicts_
    res = {
        "id": os.path.basename(run.path), "run_path": run.path, "params": params, "names": ens.names_,
        "weights": ens.weights_.tolist(), "history": ens.history_, "cosine": c.cosine.numpy(),
        "layer_cosine": None if c.layer_cosine is None else c.layer_cosine.numpy(),
        "source_hscores": ens.source_hscores_.tolist(), "ensemble_hscore": ens.ensemble_hscore_,
        "prompt": ens.prompt_, "stack": bank.stack(), "target": task.name, "target_path": task_path,
        "stopped": ens.stopped_, "seconds": ens.fit_seconds_, "start": ens.start_, "converged": ens.converged_,
        "candidates": ens.candidates_, "warnings": ens.warnings_, "n_classes": task.num_classes,
    }
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
    st.session_state.lam_running = params["lam"]
    with _START:
        done = finished_runs().get(key)
        if done is not None and os.path.isdir(done["run_path"]):
            st.session_state[result_key] = copy_run(done, folder)
            return False
        lead = runs_in_flight().get(key)
        if lead is not None and not lead.finished:
            job = Job("ensemble", lambda job: _follow(job, lead, model, bank, task, task_path, params, folder, key),
                      heavy=False)
            job.progress = lead.progress  # the leading run's steps, live
        else:
            job = Job("ensemble", lambda job: run_ensemble(job, model, bank, task, task_path, params, folder, key))
            runs_in_flight()[key] = job
        st.session_state[job_key] = job.start()
    return True


def _follow(job: Job, lead: Job, model, bank, task, task_path: str, params: dict, folder: str, key: str) -> dict:
    """Wait for an identical run another session started, then take a copy of it; compute it after all when that run
    was stopped or failed."""
    while not lead.finished:
        if job.stop.wait(0.2):
            raise UserInputError("stopped while waiting for an identical run of another session; nothing was saved.")
    if lead.status == "done":
        return copy_run(lead.result, folder)
    job.progress = []
    with job_slots():
        return run_ensemble(job, model, bank, task, task_path, params, folder, key)


def result_from_disk(path: str, pool: dict[str, SourcePrompt]) -> dict:
    """A run folder read back into the result the views draw (after a reload, or from another tab).

    ``pool`` maps prompt names to the prompts this session can see; the sources' stack (needed by the feature maps
    and the interference lab) is rebuilt from it and is None when a source is no longer there."""
    run = load_run(path)
    cfg, w = run["config"], run["weights"]
    names = w["names"]
    stack = PromptBank(pool[n] for n in names).stack() if all(n in pool for n in names) else None
    target_path = cfg.get("target_path")
    n_classes = load_task(target_path).num_classes if target_path and os.path.exists(target_path) else None
    return {
        "id": os.path.basename(path.rstrip("/")), "run_path": path, "params": {k: cfg[k] for k in DEFAULTS if k in cfg},
        "names": names, "weights": w["weights"], "history": run["history"], "cosine": np.asarray(w["cosine"]),
        "layer_cosine": None if w.get("layer_cosine") is None else np.asarray(w["layer_cosine"]),
        "source_hscores": w["source_hscores"], "ensemble_hscore": w["ensemble_hscore"],
        "prompt": SourcePrompt.load(os.path.join(path, "ensemble.safetensors")).prompt, "stack": stack,
        "target": cfg.get("target"), "target_path": target_path, "stopped": w.get("stopped", False),
        "seconds": run.get("metrics", {}).get("seconds", 0.0), "start": w.get("start"), "converged": w.get("converged"),
        "candidates": w.get("candidates"), "warnings": w.get("warnings", []), "n_classes": n_classes,
        "restored": True, "tuning": run.get("tuning"),
    }


def latest_result(folder: str, pool: dict[str, SourcePrompt]) -> dict | None:
    """The newest complete ensemble run in ``folder`` that can be read back, or None."""
    for r in list_runs(folder):
        if r.get("command") != "learn":
            continue
        try:
            return result_from_disk(r["path"], pool)
        except (UserInputError, KeyError, OSError):
            continue
    return None
