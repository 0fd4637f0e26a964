import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import kill_after_first_job, without_seconds

from core import UserInputError
from core.evaluation.summary import best_entries, epoch0_fraction
from core.evaluation.sweep import Job, JobStore, run_jobs, start_ray
from core.metrics.stats import bootstrap_ci, paired

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def square(payload):
    return {"y": payload["x"] ** 2}


def test_store_round_trip_and_bad_keys(tmp_path):
    store = JobStore(tmp_path)
    store.put("a/b:c", {"v": 1})
    assert store.has("a/b:c") and store.get("a/b:c") == {"v": 1}
    assert not [f for f in os.listdir(tmp_path / "a") if f.endswith(".tmp")]  # written by an atomic rename
    for bad in ("../x", "/abs", "", "a b"):
        with pytest.raises(UserInputError, match="job key"):
            store.path(bad)


def test_finished_jobs_are_never_run_again(tmp_path):
    store = JobStore(tmp_path)
    jobs = [Job(f"j{i}", {"x": i}) for i in range(4)]
    store.put("j1", {"y": "kept"})
    seen = []
    out = run_jobs(square, jobs, store, serial=True, progress=lambda d, t, k: seen.append((d, t, k)))
    assert out["j1"] == {"y": "kept"} and out["j3"] == {"y": 9}
    assert seen[0] == (1, 4, "") and seen[-1][:2] == (4, 4)
    with pytest.raises(UserInputError, match="share a key"):
        run_jobs(square, jobs + jobs[:1], store, serial=True)


def test_without_an_address_a_new_local_instance_is_started_never_a_running_cluster(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    assert start_ray(None, 2) and start_ray("ray://head:10001", 2)
    (local, cluster) = calls
    assert local["address"] == "local" and local["num_cpus"] == 2  # ray.init() alone would join `ray start`'s
    assert cluster["address"] == "ray://head:10001" and cluster["num_cpus"] is None and cluster["runtime_env"] is None


def test_epoch0_share_reads_the_validation_curve_whatever_epoch_was_reported():
    tunes = {"a": {"val_curve": [0.8, 0.7, 0.75], "best_epoch": 2},  # reported at the end (select="last"), peaked at 0
             "b": {"val_curve": [0.7, 0.8, 0.8], "best_epoch": 1},
             "c": {"val_curve": [0.8, 0.8, 0.7], "best_epoch": 0}}  # a tie keeps the first, as selection does
    assert epoch0_fraction(tunes) == 2 / 3


def test_paired_bootstrap_and_counts():
    a, b = [0.8, 0.7, 0.9, 0.6], [0.7, 0.7, 0.8, 0.65]
    p = paired(a, b)
    assert p["mean_diff"] == pytest.approx(0.0375) and (p["wins"], p["ties"], p["losses"]) == (2, 1, 1)
    lo, hi = p["ci95"]
    assert lo <= p["mean_diff"] <= hi
    assert bootstrap_ci([0.1] * 5) == pytest.approx((0.1, 0.1))
    assert bootstrap_ci(np.random.default_rng(0).normal(1.0, 0.1, 200))[0] > 0.9


def test_a_best_entry_is_marked_only_when_its_interval_excludes_the_runner_up():
    def runs(acc_a, acc_b):
        return [{"methods": {"a": {"test_acc": x}, "b": {"test_acc": y}}} for x, y in zip(acc_a, acc_b, strict=False)]

    clear = runs([0.9, 0.91, 0.92, 0.9, 0.93], [0.8, 0.8, 0.81, 0.8, 0.82])
    close = runs([0.9, 0.8, 0.92, 0.8, 0.93], [0.85, 0.85, 0.85, 0.86, 0.85])
    assert best_entries({"t1": clear, "t2": close}, methods=("a", "b")) == {"t1": ["a"], "t2": []}
    # One or two seeds mark nothing, however large the difference (one gives no interval at all).
    assert best_entries({"t1": clear[:1], "t2": clear[:2], "t3": clear[:3]}, methods=("a", "b")) == \
        {"t1": [], "t2": [], "t3": ["a"]}

    def with_c(job_of_c):
        return [{"methods": {"a": {**r["methods"]["a"], "job": f"a{i}"}, "b": {**r["methods"]["b"], "job": f"b{i}"},
                             "c": {**r["methods"]["a"], "job": job_of_c(i)}}} for i, r in enumerate(clear)]

    # A method that is the same tune as the best on every seed is marked with it, against the best other tune;
    # judged against its own copy, nothing would ever be marked.
    assert best_entries({"t1": with_c(lambda i: f"a{i}")}, methods=("a", "b", "c")) == {"t1": ["a", "c"]}
    near = with_c(lambda i: f"c{i}")  # the same accuracies from another tune: it is the runner-up, nothing is best
    assert best_entries({"t1": near}, methods=("a", "b", "c")) == {"t1": []}
    assert all(np.isnan(paired([0.9], [0.8])["ci95"]))




def _quality(*args, **kw):
    return subprocess.Popen([sys.executable, "bench/quality.py", "--quick", *args], cwd=ROOT, **kw)


@pytest.mark.slow
def test_ray_sweep_equals_the_serial_one_and_resumes_after_a_kill(tmp_path):
    serial = tmp_path / "serial.json"
    assert _quality("--serial", "--store", str(tmp_path / "s"), "--out", str(serial),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait(timeout=600) == 0
    store = tmp_path / "r"
    log = open(tmp_path / "killed.log", "w")
    proc = _quality("--store", str(store), "--out", str(tmp_path / "never.json"), stdout=log, stderr=log,
                    start_new_session=True)
    kill_after_first_job(proc, store / "tune", tmp_path / "killed.log", timeout=300)
    done = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(store) for f in fs
            if f.endswith(".json")}
    assert done and not (tmp_path / "never.json").exists()
    resumed = tmp_path / "resumed.json"
    assert _quality("--store", str(store), "--out", str(resumed)).wait(timeout=600) == 0
    for path, mtime in done.items():
        assert os.stat(path).st_mtime_ns == mtime, f"{path} was computed again"
    a, b = json.loads(serial.read_text()), json.loads(resumed.read_text())
    assert without_seconds(a["per_target"]) == without_seconds(b["per_target"]) and a["paired"] == b["paired"]
    assert b["engine"]["name"] == "ray" and b["engine"]["version"] and a["engine"]["serial"]
    assert b["oracle_selection"] == "val" and 0 <= b["epoch0_fraction"] <= 1
    assert set(b["paired"]) >= {"random", "linear_probe", "uniform", "oracle"}
    assert {"mean_diff", "ci95", "wins", "ties", "losses"} <= set(b["paired"]["oracle"])


def test_a_resplit_task_reuses_the_parents_tokens_exactly():
    import torch

    from core.evaluation.setups import load_setup
    from core.model.tokens import TokenKey, embed_images, split_images, split_tokens

    model, _, tasks = load_setup({"kind": "toy"})
    task = tasks["toy_a"]
    child = task.resplit(3)
    assert task.resplit(3) is child and child.parent is task and child.resplit_seed == 3  # made once per seed
    pooled = torch.cat([split_tokens(model, task, s)[0] for s in ("train", "val")])
    for split in ("train", "val", "test"):
        tok, y = split_tokens(model, child, split)
        expected = split_tokens(model, task, "test")[0] if split == "test" else pooled[child.pooled_index[split]]
        assert torch.equal(tok, expected)  # the parent's tokens, bit for bit
        assert torch.equal(y, torch.as_tensor(child.splits[split].labels))
        # ... which are the tokens of the child's own images, up to float rounding (another batch composition)
        torch.testing.assert_close(tok, embed_images(model, split_images(model, child, split)[0]), rtol=1e-5, atol=1e-6)
    key = TokenKey("train", model.fingerprint, str(model.device), 3)
    assert key in child.cache and TokenKey("train", model.fingerprint, str(model.device), None) in task.cache
