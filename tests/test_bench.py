import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_speed_benchmark_runs_tiny_and_writes_json(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, "bench/speed.py", "--quick", "--no-maps", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [c["K"] for c in data["cases_by_K"]] == [2, 3]
    for c in data["cases_by_K"] + data["cases_by_N"]:
        assert c["ratio_ensemble_over_vpt_step"] > 0 and c["speedup_batched_vs_loop"] > 0
        assert c["batched_grads"]["peak_mb"] >= 0
    assert data["utilisation"]["prompted_fwd_bwd_flops"] > 0
    assert data["environment"]["torch"]


def test_quality_benchmark_runs_tiny_and_writes_json(tmp_path):
    out = tmp_path / "quality.json"
    proc = subprocess.run([sys.executable, "bench/quality.py", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    methods = set(data["table"])
    assert methods == {"random", "linear_probe", "uniform", "best_hscore", "oracle", "h_proportional",
                       "hgprompt_h_only", "hgprompt", "hgprompt_conflict"}
    for row in data["table"].values():
        assert 0 <= row["mean_over_targets"] <= 1
    run = data["per_target"]["toy_a"][0]
    assert run["methods"]["oracle"]["test_acc"] == max(run["single_source_acc"].values())
    assert "| method |" in data["markdown"]


def test_quality_workers_run_their_own_targets_seeds_in_order_then_take_the_last_job_left():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from quality import next_job

    jobs = [(t, s) for t in ("a", "b", "c") for s in (0, 1)]
    claimed = [False] * len(jobs)

    def take(worker):
        i = next_job(worker, 2, jobs, claimed)
        if i is not None:
            claimed[i] = True
        return None if i is None else jobs[i]

    # worker 0 owns a and c, worker 1 owns b: each runs its targets' seeds in order
    assert [take(0), take(1), take(0), take(1)] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert take(1) == ("c", 1)  # worker 1 is out of jobs: it takes the one worker 0 would reach last
    assert take(0) == ("c", 0) and take(0) is None and take(1) is None


def test_quality_benchmark_runs_on_two_worker_processes(tmp_path):
    out = tmp_path / "quality.json"
    proc = subprocess.run([sys.executable, "bench/quality.py", "--quick", "--workers", "2", "--seeds", "0", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["workers"] == 2 and [r["seed"] for r in data["per_target"]["toy_a"]] == [0, 1]
    ran = sorted(tuple(j) for jobs in data["jobs_by_worker"].values() for j in jobs)
    assert ran == [("toy_a", 0), ("toy_a", 1)]  # each job once (which worker runs which depends on start-up)


def test_method_benchmark_runs_tiny_and_writes_json(tmp_path):
    out = tmp_path / "method.json"
    proc = subprocess.run([sys.executable, "bench/method.py", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    run = data["per_target"]["toy_a"][0]
    assert set(run["fits"]) == set(data["fits"])
    for f in run["fits"].values():
        assert f["reaches_best_candidate"] and f["objective"] >= f["best_vertex"] - 1e-3
    assert set(run["interference"]["spearman"]) == {"raw", "centred", "derivative"}
    assert len(data["pair_accuracies"]["toy_a"]["pairs"]) == 3
    assert data["summary"]["fits_reaching_best_candidate"] == f"{len(data['fits'])}/{len(data['fits'])}"
    assert data["timing"]["ratio_weight_step_over_vpt_step"] > 0
