import os
import subprocess
import sys

import pytest

from core import UserInputError
from core.cli import main
from core.io.runs import RunWriter, list_runs, load_run
from core.model.toy import toy_task


def test_failed_run_is_marked_incomplete_and_earlier_runs_survive(tmp_path):
    with RunWriter(tmp_path, "learn", {"a": 1}) as ok:
        ok.write_json("metrics.json", {"x": 1})
    with pytest.raises(RuntimeError):
        with RunWriter(tmp_path, "learn", {"a": 2}) as bad:
            bad.write_json("metrics.json", {"x": 2})
            raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt):
        with RunWriter(tmp_path, "learn", {"a": 3}):
            raise KeyboardInterrupt
    complete = list_runs(tmp_path)
    assert [r["id"] for r in complete] == [ok.run_id]
    assert load_run(complete[0]["path"])["metrics"] == {"x": 1}
    everything = list_runs(tmp_path, include_incomplete=True)
    notes = sorted(r["note"] for r in everything if r["status"] == "incomplete")
    assert notes == ["failed: RuntimeError: boom", "interrupted"]
    with pytest.raises(UserInputError, match="incomplete"):
        load_run(bad.path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from core.model.toy import toy_model

    root = tmp_path_factory.mktemp("cli")
    toy_model().save(root / "backbone")
    for i, name in enumerate(("src_a", "src_b", "target")):
        toy_task(name, seed=10 * i).save_npz(root / f"{name}.npz")
    return root


def _run(ws, *args):
    return main([*args, "--backbone", str(ws / "backbone"), "--runs-dir", str(ws / "runs")])


def test_cli_end_to_end(workspace, capsys):
    ws = workspace
    assert _run(ws, "build-bank", "--task", str(ws / "src_a.npz"), "--task", str(ws / "src_b.npz"),
                "--out", str(ws / "bank"), "--epochs", "2", "--tokens", "4") == 0
    # the prompts, and the shared start they were tuned from with the record that names it (task vectors need it)
    assert sorted(os.listdir(ws / "bank")) == ["_bank.json", "_start.safetensors", "src_a.json", "src_a.safetensors",
                                               "src_b.json", "src_b.safetensors"]
    assert _run(ws, "learn", "--target", str(ws / "target.npz"), "--bank", str(ws / "bank"), "--steps", "3",
                "--n-samples", "30", "--start", "uniform", "--optimizer", "adam", "--tol", "0") == 0
    out = capsys.readouterr().out
    assert "src_a" in out and "weight" in out
    assert _run(ws, "tune", "--target", str(ws / "target.npz"), "--bank", str(ws / "bank"), "--init", "hgprompt",
                "--steps", "2", "--n-samples", "30", "--epochs", "1") == 0
    assert _run(ws, "baselines", "--target", str(ws / "target.npz"), "--bank", str(ws / "bank"), "--methods",
                "random,uniform,hgprompt", "--seeds", "0", "1", "--steps", "2", "--n-samples", "30", "--epochs",
                "1") == 0
    # the initial prompt chosen by a short tune of each candidate (the estimator's choose_by), then tuned in full
    assert _run(ws, "tune", "--target", str(ws / "target.npz"), "--bank", str(ws / "bank"), "--init", "hgprompt",
                "--mixing", "task_arithmetic", "--lam", "0", "--choose-by", "short_tune", "--steps", "2",
                "--n-samples", "30", "--epochs", "1") == 0
    assert "kept '" in capsys.readouterr().out
    assert _run(ws, "interference", "--target", str(ws / "target.npz"), "--bank", str(ws / "bank"), "--n-samples", "30",
                "--points", "5") == 0
    assert "mixing loss" in capsys.readouterr().out
    runs = {r["command"]: r for r in list_runs(ws / "runs")}
    assert set(runs) == {"build-bank", "learn", "tune", "baselines", "interference"}
    inter = load_run(runs["interference"]["path"])["interference"]
    assert len(inter["mixing_loss"]) == 2 and len(inter["segment"][0][1]) == 5 and inter["n_samples"] == 30
    learn = load_run(runs["learn"]["path"])
    # 3 steps, + the best point if earlier
    assert learn["weights"]["names"] == ["src_a", "src_b"] and len(learn["history"]) in (4, 5)
    assert {"python", "torch", "timm"} <= set(learn["env"])
    assert learn["config"]["backbone_fingerprint"]
    files = set(os.listdir(runs["learn"]["path"]))
    assert {"config.json", "env.json", "weights.json", "history.csv", "history.json", "ensemble.safetensors",
            "ensemble.json", "metrics.json", "run.json"} <= files
    assert not any(f.endswith((".pt", ".pth", ".pkl")) for f in files)
    table = load_run(runs["baselines"]["path"])["metrics"]
    assert set(table) == {"random", "uniform", "hgprompt"} and table["hgprompt"]["n"] == 2


@pytest.mark.parametrize("setup,match", [
    ("pickle", "pickle"),
    ("target_missing", "neither a path nor a shipped task"),
    ("bad_init", "--init 'magic'"),
])
def test_cli_user_errors_exit_2_without_traceback(workspace, tmp_path, capsys, setup, match):
    import pickle

    ws = workspace
    bank = tmp_path / "bank"
    bank.mkdir()
    target = str(ws / "target.npz")
    args = ["learn"]
    if setup == "pickle":
        (bank / "p.safetensors").write_bytes(pickle.dumps({"a": 1}))
        (bank / "p.json").write_text("{}")
    else:
        if not (ws / "bank").exists():
            pytest.skip("needs the end-to-end bank")
        bank = ws / "bank"
        if setup == "target_missing":
            target = "no_such_task"
        else:
            args = ["tune", "--init", "magic"]
    code = _run(ws, *args, "--target", target, "--bank", str(bank))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and match in err and "Traceback" not in err


def test_module_entry_point_exit_code(workspace):
    proc = subprocess.run([sys.executable, "-m", "core", "learn", "--target", "nope", "--backbone",
                           str(workspace / "backbone")],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "error:" in proc.stderr


def test_environment_record_reads_versions_without_importing():
    """Importing umap (numba) to read its version cost every dashboard run 3.5 s."""
    code = ("import sys; from core.io.runs import environment; e = environment(); "
            "assert e['umap'] and e['sklearn'] and e['timm'], e; assert 'umap' not in sys.modules; print('ok')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-1000:]
