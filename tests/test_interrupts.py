"""Killing a run at any moment (Ctrl-C, SIGTERM, SIGKILL) never damages earlier runs, and never leaves a
half-written run that loads as if complete."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from core import UserInputError
from core.io.runs import list_runs, load_run
from core.model.toy import toy_model, toy_task

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ws(tmp_path_factory, bank):
    root = tmp_path_factory.mktemp("kill")
    toy_model().save(root / "backbone")
    toy_task("target", seed=3).save_npz(root / "target.npz")
    bank.save(root / "bank")
    return root


class _Run:
    """``python -m core learn`` as a user starts it from a terminal: SIGINT at its default (a job started with
    ``&`` from a script inherits SIGINT ignored, and then Ctrl-C never reaches Python), and its progress going to
    a file (a pipe nobody reads while waiting fills up and blocks the writer)."""

    def __init__(self, ws, steps):
        cmd = [sys.executable, "-m", "core", "learn", "--target", str(ws / "target.npz"), "--bank", str(ws / "bank"),
               "--backbone", str(ws / "backbone"), "--runs-dir", str(ws / "runs"), "--steps", str(steps), "--n-samples",
               "30",
               "--start", "uniform", "--optimizer", "adam", "--tol", "0"]  # runs every step: nothing converges early
        self.log = ws / f"stderr-{time.time_ns()}.txt"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.pid, self.send_signal = self.proc.pid, self.proc.send_signal
        self.wait, self.kill = self.proc.wait, self.proc.kill

    def stderr(self) -> str:
        return self.log.read_text()



def _digest(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


def _check(ws, complete_before):
    runs_dir = ws / "runs"
    complete = {r["id"]: r for r in list_runs(runs_dir)}
    for rid, digest in complete_before.items():  # every earlier run: still there, byte for byte, and loads
        assert rid in complete, f"earlier run {rid} disappeared"
        assert _digest(complete[rid]["path"]) == digest, f"earlier run {rid} changed"
        load_run(complete[rid]["path"])
    for name in os.listdir(runs_dir):
        path = runs_dir / name
        if name in complete:
            run = load_run(path)  # complete means every file is there and readable
            assert {"weights", "history", "metrics", "config"} <= set(run)
            assert not [f for f in os.listdir(path) if ".tmp" in f], "a complete run holds a temporary file"
        else:  # anything else is visibly incomplete and refuses to load as a result
            assert name.endswith(".partial") or name.startswith("."), name
            with pytest.raises(UserInputError):
                load_run(path)
    return {rid: _digest(r["path"]) for rid, r in complete.items()}


def test_kill_at_any_moment_loses_nothing(ws):
    proc = _Run(ws, 2)
    assert proc.wait(timeout=120) == 0, proc.stderr()
    state = _check(ws, {})
    assert len(state) == 1
    outcomes = []
    # One kill while the process is still starting, then kills at several moments after its run folder appears
    # (during the gradient pass, the steps, the writing), with every signal a user or the system sends.
    plan = [(None, 0.3, signal.SIGINT), ("run", 0.0, signal.SIGKILL), ("run", 0.05, signal.SIGINT),
            ("run", 0.3, signal.SIGTERM), ("run", 0.8, signal.SIGINT), ("run", 1.5, signal.SIGKILL),
            ("run", 2.5, signal.SIGINT), ("run", 4.0, signal.SIGKILL)]
    for wait_for, delay, sig in plan:
        before = set(os.listdir(ws / "runs"))
        proc = _Run(ws, 20000)  # far longer than the latest kill (4 s after the folder appears), on any machine
        t0 = time.time()
        while wait_for and not (set(os.listdir(ws / "runs")) - before) and time.time() - t0 < 90:
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(sig)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired as exc:  # say where it was stuck before failing
            spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
            where = subprocess.run([spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True).stdout \
                if os.path.exists(spy) else "(py-spy not installed)"
            proc.kill()
            raise AssertionError(f"{sig.name} {delay} s after {wait_for or 'start'} did not end the process in 60 s; "
                                 f"earlier kills {outcomes}; "
                                 f"stack:\n{where}\nstderr:\n{proc.stderr()[-2000:]}") from exc
        err = proc.stderr()
        started = set(os.listdir(ws / "runs")) - before
        outcomes.append((wait_for or "start", delay, sig.name, code))
        if wait_for:
            assert started, "the run folder never appeared"
        if sig == signal.SIGINT and started:  # Ctrl-C inside a run: a clear message, no traceback
            # 130, or death by SIGINT when CPython re-raises it at exit: a shell reports both as 130.
            assert code in (130, -signal.SIGINT) and "marked incomplete" in err and "Traceback" not in err, err[-2000:]
        state = _check(ws, state)
    partial = [n for n in os.listdir(ws / "runs") if n.endswith(".partial")]
    print("kills:", outcomes, "incomplete runs left marked:", len(partial))
    assert len(state) == 1, "an interrupted run was listed as complete"
    assert len(partial) == len(plan) - 1, "every run killed after its folder appeared is kept, marked incomplete"
