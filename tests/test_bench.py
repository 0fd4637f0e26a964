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
                       "hgprompt_h_only", "hgprompt", "hgprompt_fisher"}
    for row in data["table"].values():
        assert 0 <= row["mean_over_targets"] <= 1
    run = data["per_target"]["toy_a"][0]
    assert run["methods"]["oracle"]["test_acc"] == max(run["single_source_acc"].values())
    assert "| method |" in data["markdown"]


def test_quality_jobs_keep_a_targets_seeds_in_one_worker_unless_a_worker_would_idle():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from quality import job_groups

    jobs = [(t, s) for t in ("a", "b", "c") for s in (0, 1)]
    assert job_groups(jobs, 2) == [[("a", 0), ("a", 1)], [("b", 0), ("b", 1)], [("c", 0), ("c", 1)]]
    assert job_groups(jobs, 1) == [[("a", 0), ("a", 1)], [("b", 0), ("b", 1)], [("c", 0), ("c", 1)]]
    assert job_groups(jobs, 4) == [[job] for job in jobs]  # 3 targets, 4 workers: one job each
