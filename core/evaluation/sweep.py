"""Sweeps on Ray: every job a Ray task, every finished job a file, so an interrupted sweep resumes.

Ray (Moritz et al., OSDI 2018) is the engine users already run on GPUs and clusters: ``ray.init()`` starts a
local instance by default (one CPU per job; a GPU per job where the machine has one), and ``address=`` joins an
existing cluster. A job is ``fn(payload) -> dict`` for a module-level ``fn`` (Ray ships it to its workers by
reference) and a JSON-able ``payload``; its result is written to ``store/<key>.json`` as soon as it finishes,
by an atomic rename, so a sweep killed at any moment loses at most the jobs that were running, and a rerun
skips every job whose file exists. ``serial=True`` runs the same jobs in this process, in order (what the
tests compare the Ray results against).
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import StopRequested, UserInputError
from ..io.safe_io import atomic_write_json, load_json

Progress = Callable[[int, int, str], None]  # (done, total, key of the job just finished)


@dataclass(frozen=True)
class Job:
    """One unit of a sweep: ``fn(payload)`` for the sweep's ``fn``, its result stored under ``key``."""

    key: str  # unique, used as the file name under the store: letters, digits, "-", "_", "/" and "."
    payload: dict[str, Any]


class JobStore:
    """One JSON file per finished job under ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)

    def path(self, key: str) -> str:
        if not key or ".." in key or key.startswith("/") or not all(c.isalnum() or c in "-_/.:" for c in key):
            raise UserInputError(f"job key {key!r} must be a relative name of letters, digits, '-', '_', '.', ':' and "
                                 "'/'.")
        return os.path.join(self.root, key.replace(":", "_") + ".json")

    def has(self, key: str) -> bool:
        return os.path.isfile(self.path(key))

    def get(self, key: str) -> dict[str, Any]:
        return load_json(self.path(key), max_bytes=64 * 2**20)

    def put(self, key: str, result: dict[str, Any]) -> None:
        atomic_write_json(self.path(key), result, indent=None)


class MemoryStore:
    """Finished jobs kept in memory (an evaluation in one process that need not resume)."""

    def __init__(self) -> None:
        self._results: dict[str, dict[str, Any]] = {}

    def has(self, key: str) -> bool:
        return key in self._results

    def get(self, key: str) -> dict[str, Any]:
        return self._results[key]

    def put(self, key: str, result: dict[str, Any]) -> None:
        self._results[key] = result


def run_jobs(
    fn: Callable[[dict[str, Any]], dict[str, Any]],
    jobs: list[Job],
    store: JobStore,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    gpus_per_job: float | None = None,
    serial: bool = False,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every job whose result is not in ``store`` yet; return all results by key.

    ``address``: a Ray cluster to join (None: start a local instance with ``num_cpus`` CPUs, default all).
    ``gpus_per_job``: GPUs a job asks for (None: 1 where CUDA is visible here, else 0). ``should_stop`` (serial
    only) is polled before every job; :class:`StopRequested` then ends the run, every finished job kept.
    """
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise UserInputError("two jobs share a key; every job needs its own.")
    todo = [j for j in jobs if not store.has(j.key)]
    done = len(jobs) - len(todo)
    if progress:
        progress(done, len(jobs), "")
    if todo and serial:
        for job in todo:
            if should_stop is not None and should_stop():
                raise StopRequested()
            store.put(job.key, fn(job.payload))
            done += 1
            if progress:
                progress(done, len(jobs), job.key)
    elif todo:
        import ray  # ray imported lazily (seconds to import): only a sweep that uses it pays

        if gpus_per_job is None:
            import torch

            gpus_per_job = 1 if torch.cuda.is_available() else 0
        started = start_ray(address, num_cpus)
        try:
            remote = ray.remote(num_cpus=1, num_gpus=gpus_per_job, max_retries=0)(fn)
            pending = {remote.remote(job.payload): job for job in todo}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    job = pending.pop(ref)
                    store.put(job.key, ray.get(ref))
                    done += 1
                    if progress:
                        progress(done, len(jobs), job.key)
        finally:
            if started:
                ray.shutdown()
    return {j.key: store.get(j.key) for j in jobs}


def start_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join ``address`` or start a new local Ray instance, unless one is running; True when this call started it.

    Without ``address`` the instance is always a new one (``address="local"``): a cluster that ``ray start``
    left on this machine is joined only when asked for (``address="auto"``), never by surprise.

    Workers of a local instance get this checkout on ``PYTHONPATH``; on a cluster, ship the code the Ray way
    (``runtime_env={"working_dir": ...}``, or an image that has it).
    """
    import ray

    if ray.is_initialized():
        return False
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
    os.environ.setdefault("RAY_enable_metrics_collection", "0")  # no dashboard, so no metrics agent to export to
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the folder holding core/
    env = None if address else {"env_vars": {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}}
    ray.init(address=address or "local", num_cpus=None if address else num_cpus, include_dashboard=False,
             log_to_driver=False,
             configure_logging=False, runtime_env=env)
    return True


def tqdm_progress(desc: str = "jobs") -> Progress:
    """A progress bar over jobs (on stderr), for :func:`run_jobs`."""
    from tqdm import tqdm

    bar: dict[str, Any] = {}
    t0 = time.perf_counter()

    def update(done: int, total: int, key: str) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, initial=done, desc=desc, unit="job", mininterval=2.0)
            if done < total:
                return
        bar["bar"].update(done - bar["bar"].n)
        if done >= total:
            bar["bar"].close()
            print(f"{desc}: {total} jobs in {time.perf_counter() - t0:.0f} s", flush=True)

    return update
