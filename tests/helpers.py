"""Helpers shared by the tests that run a sweep or a study in another process and kill it part-way."""
from __future__ import annotations

import os
import signal
import time


def without_seconds(o):
    """``o`` without its ``seconds`` entries (wall time differs between two runs of the same jobs)."""
    if isinstance(o, dict):
        return {k: without_seconds(v) for k, v in o.items() if k != "seconds"}
    if isinstance(o, list):
        return [without_seconds(v) for v in o]
    return o


def kill_after_first_job(proc, jobs, log, timeout: float) -> None:
    """Wait until a job file (``*.json``) appears under ``jobs``, then SIGKILL ``proc``'s process group (the command,
    the Ray instance it started and its workers, at once: ``proc`` must have been started with
    ``start_new_session=True``) and wait until every process of the group is gone. Killed whatever happens, so a failed
    wait never leaves a Ray instance behind; ``log`` (the process's output file) is shown when it ended early."""
    t0 = time.time()
    try:
        while not (os.path.isdir(jobs) and any(f.endswith(".json") for _, _, fs in os.walk(jobs) for f in fs)):
            assert proc.poll() is None, open(log).read()[-2000:]
            assert time.time() - t0 < timeout, f"no job finished under {jobs} in {timeout} s"
            time.sleep(0.02)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group had ended by itself
            pass
        proc.wait()
        wait_until_gone(proc.pid)  # only this group's processes: a Ray instance of the user's is left alone


def wait_until_gone(pgid: int, timeout: float = 120) -> None:
    t0 = time.time()
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.time() - t0 < timeout, f"processes of the killed group {pgid} still run after {timeout} s"
        time.sleep(0.1)
