import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(name: str):
    """A benchmark script, imported as a module from its file (the benches are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.mark.slow  # every goal job at both precisions, each between two roofline measurements
def test_speed_goals_run_tiny_at_both_precisions_with_flops_and_a_roofline(tmp_path):
    out = tmp_path / "goals.json"
    proc = subprocess.run([sys.executable, "bench/speed.py", "--quick", "--goals-only", "--goal-repeat", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    goals = json.loads(out.read_text())["goals"]
    assert set(goals["jobs"]) == {"fp32", "bf16"}
    for jobs in goals["jobs"].values():
        assert set(jobs) == {"fit", "fit_with_callback", "plane", "weight_step", "tuning_step"}
        for j in jobs.values():
            assert j["flops"] > 0 and j["seconds"] > 0 and 0 < j["fraction_of_roofline"]
            assert j["gflop_per_s"] == pytest.approx(j["flops"] / j["seconds"] / 1e9)
    assert goals["flops"]["fit_with_callback"] >= goals["flops"]["fit"]
    assert goals["jobs"]["fp32"]["plane"]["prompts"] < 441 / 3  # coarse to fine
    assert set(goals["thread_policy"]) == {"hscore", "probe_heads_7", "backbone_forward"}


@pytest.mark.slow  # three full planes and one coarse to fine
def test_plane_benchmark_compares_coarse_to_fine_with_the_full_grid_on_every_pair(tmp_path):
    out = tmp_path / "plane.json"
    proc = subprocess.run([sys.executable, "bench/plane.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["summary"]["pairs"] == 3 and data["summary"]["prompts_refined_max"] <= 121
    first = next(iter(data["pairs"].values()))
    # The real coarse-to-fine pass scores the same points to the same values as the full grid, and returns the best
    # that bench/plane.py reads from the full grid's values.
    assert first["refine_run"]["max_abs_value_change"] < 1e-5
    assert first["refine_run"]["best"][:2] == first["refined_best"][:2]
    for p in data["pairs"].values():
        assert p["value_lost"] >= 0 and p["same_point"] == (p["distance"] == 0)


@pytest.mark.slow  # four fits and four tunes
def test_precision_benchmark_runs_tiny_and_compares_both_precisions(tmp_path):
    out = tmp_path / "precision.json"
    proc = subprocess.run([sys.executable, "bench/precision.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    fits = data["targets"]["toy_a"]["fits"]["0"]
    assert fits["fp32"]["source_hscores"] != fits["bf16"]["source_hscores"]  # bf16 ran
    assert data["summary"]["fits"] == 2 and data["summary"]["tunes"] == 2 and data["summary"]["samples"] == 2
    assert data["summary"]["max_abs_hscore_change"] == max(
        f["compare"]["max_abs_hscore_change"] for t in data["targets"].values() for f in t["fits"].values())


def test_quality_benchmark_runs_tiny_and_writes_json(tmp_path):
    out = tmp_path / "quality.json"
    # --serial never imports Ray (run here with every `import ray` failing), so it runs where Ray is not installed,
    # such as a lent GPU machine (bench/gpu_check.sh).
    no_ray = ("import runpy, sys; sys.modules['ray'] = None; sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", no_ray, "bench/quality.py", "--quick", "--serial", "--store",
                           str(tmp_path / "jobs"), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["table"]) == {"random", "linear_probe", "uniform", "h_proportional", "best_hscore", "oracle",
                                  "oracle_test", "hgprompt_h_only", "hgprompt", "task_arithmetic_sum", "ties",
                                  "hgprompt_ta", "hgprompt_ta_h_only", "hgprompt_probe_ll", "hgprompt_ta_probe_ll"}
    against = data["against_selection"]  # every method minus best-by-H-score and minus the test-chosen source
    assert set(against["hgprompt_ta"]) == {"best_hscore", "oracle_test"}
    assert "best_hscore" not in against and "oracle_test" not in against  # no method minus itself
    for row in data["table"].values():
        assert 0 <= row["mean_over_targets"] <= 1
    run = data["per_target"]["toy_a"][0]
    singles = {m: v for m, v in run["methods"].items() if m.startswith("single:")}
    assert run["methods"]["oracle"]["val_acc"] == max(v["val_acc"] for v in singles.values())  # chosen on val
    assert run["methods"]["oracle_test"]["test_acc"] == max(v["test_acc"] for v in singles.values())
    assert data["oracle_selection"] == "val" and data["seeds"] == [0, 1] and len(data["targets"]) == 2
    assert data["paired"]["random"]["n"] == 4 and "| method |" in data["markdown"]

    # The README's section is generated from the JSON; with one seed (its jobs already in the store, so nothing is
    # recomputed) it says so, gives no per-target interval and marks no entry best.
    quality_section = bench("report").quality_section

    text = "\n".join(quality_section(data))
    assert "mean ± std over seeds [0, 1]" in text and "nan" not in text and "one after another" in text
    # The toy's sources are not the shipped bank's: the section says its figures come from another bank.
    assert "These figures were measured on another bank" in text
    from core import PromptBank, assets

    shipped = PromptBank.load(assets.PROMPTS_DIR).names
    assert "another bank" not in "\n".join(quality_section({**data, "sources": shipped}))
    one = tmp_path / "one.json"
    proc = subprocess.run([sys.executable, "bench/quality.py", "--quick", "--serial", "--seeds", "0",
                           "--store", str(tmp_path / "jobs"), "--out", str(one)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    single = json.loads(one.read_text())
    assert single["per_target"]["toy_a"][0] == data["per_target"]["toy_a"][0]  # read back from the store
    assert single["jobs"]["read_from_store"] == single["jobs"]["weights"] + single["jobs"]["tunes"]
    assert data["jobs"]["read_from_store"] == 0 and data["jobs"]["job_seconds"] > 0
    text = "\n".join(quality_section(single, "Full"))
    assert "one seed (0)" in text and "nan" not in text and "**" not in single["markdown"]
    assert "were read back from an earlier run's store" in text
    # --select last: the same jobs tuned to the end of the schedule, in their own JSON (keys differ, nothing read back)
    proc = subprocess.run([sys.executable, "bench/quality.py", "--quick", "--serial", "--seeds", "0", "--select",
                           "last",
                           "--store", str(tmp_path / "jobs"), "--out", str(tmp_path / "last.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads((tmp_path / "last.json").read_text())
    assert last["tune_config"]["select"] == "last" and last["profile"] == "quick-last"
    assert last["jobs"]["read_from_store"] == last["jobs"]["weights"]  # the weights are shared, the tunes are not
    epochs = last["tune_config"]["epochs"]
    assert all(m["best_epoch"] == epochs for m in last["per_target"]["toy_a"][0]["methods"].values()
               if "best_epoch" in m)
    assert "reports its last epoch" in "\n".join(quality_section(last, "Last"))
    # Both reports of the same tunes side by side, in either order; nothing for two JSONs of the same selection.
    selection_section = bench("report").selection_section

    sel = selection_section(single, last)
    assert sel == selection_section(last, single) and selection_section(single, single) == []
    row = (lambda m: f"| {m} | {100 * last['table'][m]['mean_over_targets']:.1f} | "
           f"{100 * single['table'][m]['mean_over_targets']:.1f} |")
    assert all(row(m) in sel for m in last["table"]) and len([x for x in sel if x.startswith("| ")]) == (
        2 + len(last["table"]) + len(last["paired"]))
    # A report with more seeds is compared on the seeds both hold: a seed only one of them has changes nothing.
    worse = lambda r: {**r, "seed": 1, "methods": {m: {**v, "test_acc": 0.0} for m, v in r["methods"].items()}}
    more = {**last, "seeds": [0, 1],
            "per_target": {t: runs + [worse(runs[0])] for t, runs in last["per_target"].items()}}
    sel2 = selection_section(more, single)
    assert "on seeds [0] (the ones both reports hold)" in sel2[2]
    assert sel2[3:] == sel[3:]
    # Another bank's tunes are not the same tunes: no side-by-side of two banks.
    assert selection_section({**last, "sources": ["other"]}, single) == []
    # Every method minus best_hscore and minus oracle_test, the JSON's own figures (or computed from per_target).
    against_lines = bench("report").against_lines
    rows = [x for x in against_lines(last) if x.startswith("| ") and not x.startswith("| method")]
    ag = last["against_selection"]
    assert len(rows) == len(ag) and "hgprompt" in ag and "best_hscore" not in ag
    p = ag["hgprompt"]["oracle_test"]
    assert ("| hgprompt | " in "\n".join(rows)
            and f"{100 * p['mean_diff']:+.2f} [{100 * p['ci95'][0]:+.2f}" in "\n".join(rows))
    assert against_lines({k: v for k, v in last.items() if k != "against_selection"}) == against_lines(last)


def test_another_selection_keeps_the_jobs_keys_of_the_profile_that_reports_it():
    quality = bench("quality")
    PROFILES, with_selection = quality.PROFILES, quality.with_selection
    from core.io.digest import settings_digest

    name, full_val = with_selection("full", "val")  # the full profile reports the last epoch
    assert name == "full-val" and "select" not in full_val["tune"]  # keys as before select existed: jobs read back
    assert settings_digest({"kind": "embedded"}, {**full_val["tune"], "select": "last"}) == settings_digest(
        {"kind": "embedded"}, PROFILES["full"]["tune"])
    assert with_selection("full", "last") == with_selection("full", None) == ("full", PROFILES["full"])
    assert with_selection("default", "last")[1]["tune"] == {**PROFILES["default"]["tune"], "select": "last"}


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_quality_benchmark_refuses_gpus_it_cannot_have(tmp_path):
    # On a machine without CUDA a local Ray instance has no GPU to give, so a job asking for one would wait forever.
    proc = subprocess.run([sys.executable, "bench/quality.py", "--quick", "--gpus-per-job", "0.25", "--store",
                           str(tmp_path / "jobs"), "--out", str(tmp_path / "q.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "--gpus-per-job 0.25 asks for GPUs, but CUDA sees none" in proc.stderr
    assert not (tmp_path / "q.json").exists()


def test_mixing_benchmark_runs_tiny_and_writes_json(tmp_path):
    out = tmp_path / "mixing.json"
    proc = subprocess.run([sys.executable, "bench/mixing.py", "--quick", "--serial", "--store", str(tmp_path / "jobs"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    tau = data["objective_tau"]
    for t in data["targets"]:
        per = tau["per_target"][t]
        # every single source, the uniform average, each pair's midpoint and sum, the full sum and TIES
        k = len(data["sources"])
        assert len(per["mixtures"]) == k + 1 + k * (k - 1) + 2 == len(per["probe_acc"])
        assert set(per["scores"]) == set(data["objectives"]) and len(per["tuned"]["mixtures"]) == 6
    known = data["known_answer"]
    assert set(known["regimes"]) == {"6", "all"} and known["seeds"] == [0, 1]
    assert set(known["fits"]) == {f"{r}/{o}/lam{lam}" for r in ("average", "task_arithmetic")
                                  for o in data["objectives"]
                                  for lam in ("1", "0")}
    for regime in known["regimes"].values():
        assert all(len(v) == 2 for v in regime["test_acc"].values())
        assert regime["better_single"] in known["sources"]
    w = known["fits"]["task_arithmetic/hscore/lam0"]["0"]["weights"]
    assert len(w) == len(data["sources"]) and all(0.0 <= x <= 1.0 for x in w)  # the box, not the simplex
    assert data["timing"]["weight_step_over_vpt_step"] > 0
    # All 800 images: only the designed candidates and the mixtures of the profile's full-regime objectives (hscore).
    assert {c.split("/")[1] for c in known["regimes"]["all"]["test_acc"] if c.startswith("learned:")} == {"hscore"}
    assert len([c for c in known["regimes"]["6"]["test_acc"] if c.startswith("learned:")]) == len(known["fits"])
    # The README's section is drawn from this JSON: one row per objective, the designed candidates in every regime.
    section = "\n".join(bench("report").mixing_section(data))
    assert all(f"| {o} |" in section for o in data["objectives"])
    assert (f"| sum({known['sources'][0]},{known['sources'][1]}) |" in section
            and "learned:task_arithmetic/hscore/lam0" in section)


def test_scale_benchmark_runs_tiny_and_writes_json(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, "bench/scale.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    cases = data["models"]["tiny"]
    assert [c["kind"] for c in cases[:2]] == ["shallow", "deep"] and cases[0]["init"] == {"kind": "random", "seed": 0}
    for c in cases[:2]:
        for step in ("source_pass", "weight_step", "tuning_step", "eval_forward"):
            assert c[step]["seconds"] > 0 and c[step]["flops"] > 0 and c[step]["peak_tensor_mb"] >= 0
        assert 0 < c["flops_per_row"]["forward"] < c["flops_per_row"]["forward_backward"]
    guard = cases[2]["memory_guard"]
    # The guard chose fewer rows than the pass has, kept to them, and the numbers match the unchunked pass.
    assert guard["no_grad"]["largest_forward"] <= guard["no_grad"]["rows_that_fit"] < guard["rows_unchunked"]
    assert guard["gradient"]["largest_forward_backward"] <= guard["gradient"]["rows_that_fit"] < guard["rows_unchunked"]
    assert guard["no_grad"]["hscores_max_abs_diff"] < 1e-4 and guard["gradient"]["grads_rel_diff"] < 1e-4
    projection = data["vtab1k_projection"]
    assert projection["label"].startswith("PROJECTION") and projection["targets"] == 19 and projection["seeds"] == 5
    assert set(projection["cases"]) == {"tiny/shallow", "tiny/deep"}
    assert all(c["gpu_hours"] > 0 for c in projection["cases"].values()) and data["complete"]


def test_decision_benchmark_runs_tiny_and_writes_json(tmp_path):
    from core.evaluation.decision import SHORT

    out = tmp_path / "decision.json"
    proc = subprocess.run([sys.executable, "bench/decision.py", "--quick", "--serial", "--store",
                           str(tmp_path / "jobs"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    decision = bench("decision")
    assert data["lengths"] == [1, 2] and data["seeds"] == [0, 1] and data["candidates"][0] == "best_hscore"
    assert set(data["rules"]) == {"short tune, 1 epochs", "short tune, 2 epochs", "full tune's val at epoch 0",
                                  "full tune's val at epoch 1", "full tune's val at epoch 2",
                                  "full tune's val at its end",
                                  "H-score of the initial features (train)", "probe log-likelihood, 5-fold (train)"}
    for rule in data["rules"].values():
        assert rule["pairs"] == 4 and sum(rule["chosen"].values()) == 4
        assert set(rule["minus_best_hscore"]["per_target"]) == set(data["targets"])
        assert {"met", "moonshot", "worst_target"} <= set(rule["goal"])
        for row in rule["rows"]:  # the chosen candidate's full tune is what the rule reports
            run = next(r for r in data["per_target"][row["target"]] if r["seed"] == row["seed"])
            assert row["test_acc"] == run["methods"][row["chosen"]]["test_acc"]
    for runs in data["per_target"].values():  # the registry's decision: its chosen candidate's tune, the same job
        for r in runs:
            d = r["methods"][decision.DECIDE]
            assert d["job"] == r["methods"][d["decision"]["chosen"]]["job"]
            # a short schedule as long as the recipe makes the short tunes the candidates' full tunes, computed once;
            # a shorter one (the quick recipe is 2 epochs) makes jobs of its own
            full = {c: r["methods"][c]["job"] for c in data["candidates"]}
            short_is_full = SHORT["epochs"] == data["tune_config"]["epochs"]
            assert (d["decision"]["jobs"] == full) == short_is_full
            assert short_is_full or not set(d["decision"]["jobs"].values()) & set(full.values())
    assert data["cost"]["weights_jobs_timed"] == data["jobs"]["weights"] and "| decision by |" in data["markdown"]
    designed = data["designed_sum"]["toy_a"]  # the designed target's sum of its sources' task vectors, tuned per seed
    assert designed["sources"] == ["src0", "src1"] and len(designed["test_acc"]) == 2
    assert designed["better_source"] in designed["sources"] and designed["minus_best_hscore"]["n"] == 2


def test_report_writes_every_table_to_the_docs_and_the_headline_ones_to_the_readme(tmp_path):
    report = bench("report")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n\n<!-- RESULTS:START -->\nstale\n<!-- RESULTS:END -->\n\nafter\n")
    assert report.main(str(readme), str(tmp_path / "RESULTS.md")) == 0
    text, full = readme.read_text(), (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("intro") and text.rstrip().endswith("after") and "stale" not in text
    assert "docs/RESULTS.md" in text and "## Quality at the full budget" in full and "## Speed" in full
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows and all(r in full for r in rows)  # the README's tables are the docs' tables, not other figures
    assert len(text.splitlines()) < len(full.splitlines()) / 2
