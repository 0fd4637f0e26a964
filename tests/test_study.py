"""Your own models: a backbone, a bank and a suite of targets brought by the user (a tiny random ViT saved as a folder,
five tiny VTAB-1k-format tasks written in the test), run through the study command (leave-one-out, serial and on Ray,
killed and resumed), read back by the Study page, and opened in the dashboard."""
import json
import os
import subprocess
import sys
import time

import pytest
from helpers import kill_after_first_job, without_seconds

from core import UserInputError
from core.cli import main
from core.evaluation.setups import Workspace, resolve_targets
from core.model.backbones import BackboneSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(ROOT, "dashboard", "app.py")
# The smallest protocol that still has a weights method, a selection and the test-chosen bound: about 3 tunes per
# (target, seed).
FAST = ["--methods", "uniform,best_hscore,oracle_test,hgprompt", "--seeds", "0", "1", "--epochs", "1", "--batch-size",
        "8", "--tokens", "2",
        "--steps", "2", "--n-samples", "12", "--singles", "2", "--threads", "1"]



# --------------------------------------------------------------- the backbone
def test_a_backbone_spec_names_one_backbone_in_json_and_refuses_flags_that_do_not_apply(vtab_suite, tmp_path):
    folder = BackboneSpec.from_args(vtab_suite["backbone"])
    assert folder.kind == "folder" and os.path.isabs(folder.source)
    assert BackboneSpec.from_dict(json.loads(json.dumps(folder.to_dict()))) == folder
    assert BackboneSpec.from_args(None).kind == "embedded" and BackboneSpec.from_dict({}) == BackboneSpec()
    timm = BackboneSpec.from_args("vit_tiny_patch16_224", img_size=32, init_seed=3)
    assert timm.kind == "timm" and timm.to_dict()["init_seed"] == 3 and "random weights (seed 3)" in timm.describe()
    assert folder.key() != timm.key() and folder.key() == BackboneSpec.from_args(vtab_suite["backbone"]).key()
    with open(os.path.join(vtab_suite["backbone"], "config.json")) as fh:
        assert folder.load("cpu").fingerprint == json.load(fh)["fingerprint"]
    with pytest.raises(UserInputError, match="--img-size applies to a timm model name only; the saved backbone folder"):
        BackboneSpec.from_args(vtab_suite["backbone"], img_size=224)
    with pytest.raises(UserInputError, match="is not a folder with a saved backbone"):
        BackboneSpec.from_args(str(tmp_path / "nothing" / "here"))
    with pytest.raises(UserInputError, match=r"--checkpoint '.*missing\.safetensors' does not exist"):
        BackboneSpec.from_args("vit_tiny_patch16_224", checkpoint=str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserInputError, match="--init-seed draws random weights; it cannot go with --checkpoint"):
        BackboneSpec("vit_tiny_patch16_224", pretrained=True, init_seed=0)


# --------------------------------------------------------------- the targets
def test_targets_are_tasks_or_folders_of_tasks_and_anything_else_is_named_with_the_fix(vtab_suite, tmp_path):
    from core.model.toy import toy_task

    suite = resolve_targets([vtab_suite["suite"]])
    assert list(suite) == ["pos_a", "pos_b", "pos_c", "pos_d", "pos_e"]
    assert resolve_targets([vtab_suite["tasks"][0]]) == {"pos_a": vtab_suite["tasks"][0]}
    toy_task("extra").save_npz(tmp_path / "extra.npz")
    both = resolve_targets([vtab_suite["tasks"][1], str(tmp_path / "extra.npz")])
    assert list(both) == ["pos_b", "extra"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("no task here")
    with pytest.raises(UserInputError, match=r"--targets '.*notes' is not a task or a folder of tasks: it holds no "
                                             r"train800\.txt .* Give a VTAB-1k folder"):
        resolve_targets([str(tmp_path / "notes")])
    (tmp_path / "other" / "pos_a").mkdir(parents=True)
    (tmp_path / "other" / "pos_a" / "train800.txt").write_text("")
    with pytest.raises(UserInputError, match="two targets are named 'pos_a'"):
        resolve_targets([vtab_suite["suite"], str(tmp_path / "other" / "pos_a")])


def test_a_target_that_cannot_be_read_is_named_by_target_and_path(tmp_path):
    bad = tmp_path / "broken"
    (bad / "images").mkdir(parents=True)
    for f in ("train800.txt", "val200.txt", "test.txt"):
        (bad / f).write_text("images/missing.png 0\n")
    ws = Workspace(targets=resolve_targets([str(bad)]))
    with pytest.raises(UserInputError, match=r"target 'broken' \(.*broken\) is not a task: train800.txt line 1: image "
                                             r"'images/missing.png' does not exist"):
        ws.tasks()["broken"]


def test_a_bank_of_another_backbone_is_refused_naming_the_folder_and_the_fix(vtab_suite, tmp_path):
    from core.model.toy import toy_bank, toy_model

    other = toy_model(seed=7)
    toy_bank(other).save(tmp_path / "bank")
    ws = Workspace(BackboneSpec.from_args(vtab_suite["backbone"]), str(tmp_path / "bank"),
                   resolve_targets([vtab_suite["suite"]]))
    with pytest.raises(UserInputError, match=r"the bank '.*bank' does not fit the backbone \(the saved backbone in .*, "
                                             r"fingerprint [0-9a-f]{16}\): prompt 'src0' was tuned on .* Open the "
                                             r"backbone "
                                             r"the bank was tuned on, or make a bank for this one"):
        ws.load_bank(ws.load_backbone("cpu"))
    with pytest.raises(UserInputError, match="needs a bank of prompts tuned on it: give --bank DIR"):
        Workspace(BackboneSpec.from_args(vtab_suite["backbone"]))


def test_a_leave_one_out_suite_of_one_task_is_refused_before_anything_runs(vtab_suite, tmp_path, capsys):
    code = main(["study", "--backbone", vtab_suite["backbone"], "--leave-one-out", "--targets", vtab_suite["tasks"][0],
                 "--serial", "--out", str(tmp_path / "one"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "--leave-one-out needs a suite of at least two targets, got 1 (pos_a)" in err
    assert "Give more --targets" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "one" / "jobs")  # nothing was computed


# --------------------------------------------------------------- the study
@pytest.fixture(scope="module")
def serial_study(vtab_suite, tmp_path_factory):
    """The leave-one-out study of the five tasks on 2 seeds, every job in this process (the bank built first)."""
    out = tmp_path_factory.mktemp("study") / "serial"
    assert main(["study", "--backbone", vtab_suite["backbone"], "--leave-one-out", "--targets", vtab_suite["suite"],
                 "--serial", "--out", str(out), *FAST]) == 0
    return out


@pytest.mark.slow
def test_a_leave_one_out_study_gives_each_target_the_other_tasks_prompts(serial_study, vtab_suite):
    data = json.loads((serial_study / "study.json").read_text())
    names = ["pos_a", "pos_b", "pos_c", "pos_d", "pos_e"]
    assert data["targets"] == names and data["seeds"] == [0, 1] and data["leave_one_out"]
    assert sorted(f for f in os.listdir(serial_study / "bank") if f.endswith(".safetensors")) == [
        "_start.safetensors", *[f"{n}.safetensors" for n in names]]  # one prompt per task, one shared start
    assert data["bank"]["built"] and set(data["bank"]["metrics"]) == set(names)
    for t in names:
        assert data["sources_by_target"][t] == [n for n in names if n != t]
        for run in data["per_target"][t]:
            assert list(run["source_hscores"]) == [n for n in names if n != t]  # its job got the other four
    matrix = data["weights"]["hgprompt"]
    assert matrix["targets"] == names and matrix["sources"] == names and matrix["kind"] == "weights"
    for i, row in enumerate(matrix["values"]):
        assert row[i] is None and sum(v for v in row if v is not None) == pytest.approx(1.0)  # own left out
    chosen = data["weights"]["best_hscore"]
    assert chosen["kind"] == "chosen" and all(sum(v for v in row if v is not None) == pytest.approx(1.0)
                                              for row in chosen["values"])
    # every method against selection and the test-chosen source, pooled and per target, in the JSON and the tables
    p = data["against"]["hgprompt"]["best_hscore"]
    assert p["n"] == 10 and set(p["per_target"]) == set(names) and p["per_target"]["pos_a"]["n"] == 2
    assert set(data["against"]) == {"uniform", "hgprompt"} and set(data["table"]) == {"uniform", "best_hscore",
                                                                                       "oracle_test", "hgprompt"}
    md = (serial_study / "results.md").read_text()
    assert "## Every method minus best_hscore" in md and "## Every method minus oracle_test" in md and "| pos_e |" in md
    lines = (serial_study / "results.csv").read_text().splitlines()
    assert lines[0] == "target,seed,method,test_acc,val_acc,best_epoch,chosen,job" and len(lines) == 1 + 5 * 2 * 4


def _study(out, *extra, **kw):
    return subprocess.Popen([sys.executable, "-m", "core", "study", "--backbone", kw.pop("backbone"), "--leave-one-out",
                             "--targets", kw.pop("suite"), "--out", str(out), *FAST, *extra], cwd=ROOT, **kw)



@pytest.mark.slow
def test_a_study_on_ray_killed_and_run_again_resumes_and_equals_the_serial_one(serial_study, vtab_suite, tmp_path):
    out = tmp_path / "ray"
    log = open(tmp_path / "killed.log", "w")
    proc = _study(out, "--num-cpus", "2", backbone=vtab_suite["backbone"], suite=vtab_suite["suite"], stdout=log,
                  stderr=log, start_new_session=True)
    kill_after_first_job(proc, out / "jobs" / "tune", tmp_path / "killed.log", timeout=900)
    done = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, fs in os.walk(out / "jobs") for f in fs if f.endswith(".json")}
    assert done and not (out / "study.json").exists()
    again = _study(out, "--num-cpus", "2", backbone=vtab_suite["backbone"], suite=vtab_suite["suite"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert again.wait(timeout=900) == 0, again.stderr.read()[-3000:]
    for path, mtime in done.items():
        assert os.stat(path).st_mtime_ns == mtime, f"{path} was computed again"
    ray, serial = json.loads((out / "study.json").read_text()), json.loads((serial_study / "study.json").read_text())
    assert ray["engine"] == {"serial": False, "address": "local"} and serial["engine"]["serial"]
    assert 0 < ray["jobs"]["read_from_store"] < ray["jobs"]["weights"] + ray["jobs"]["tunes"]
    for key in ("per_target", "table", "against", "weights", "sources_by_target"):
        assert without_seconds(ray[key]) == without_seconds(serial[key]), key
    body = lambda path: path.read_text().split("\n", 3)[3]
    assert body(out / "results.md") == body(serial_study / "results.md")


# ------------------------------------------------------------ the dashboard
@pytest.fixture
def app(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    import dashboard.state as state

    monkeypatch.setenv("HGPROMPT_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(state, "RUNS_ROOT", str(tmp_path / "runs"))
    return AppTest.from_file(APP, default_timeout=180)


@pytest.mark.slow
def test_the_study_page_shows_the_sources_each_target_uses_the_intervals_and_the_jobs(app, serial_study):
    at = app.run()
    at.switch_page("app_pages/study.py").run()
    assert not at.exception and any("No study yet" in i.value for i in at.info)
    at.text_input(key="study_folder").set_value(str(serial_study)).run()
    assert not at.exception, [e.message for e in at.exception]
    data = json.loads((serial_study / "study.json").read_text())
    (fig,) = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    heat = fig["data"][0]
    assert (heat["type"] == "heatmap" and heat["y"] == data["targets"]
            and heat["x"] == data["weights"]["hgprompt"]["sources"])
    assert fig["layout"]["title"]["text"].startswith("hgprompt: what each target takes from each source")
    assert [row[i] for i, row in enumerate(heat["text"])] == [""] * 5  # the target's own prompt: blank
    assert at.selectbox(key="study_method").value == "hgprompt"
    at.selectbox(key="study_method").set_value("best_hscore").run()
    (fig,) = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert "share of seeds that chose it" in fig["layout"]["title"]["text"]
    frames = [d.value for d in at.dataframe]  # the results table, then every method minus each reference
    table, against = frames[0], frames[1]
    assert list(table["method"]) == ["uniform", "best_hscore", "oracle_test (upper bound)", "hgprompt"]
    assert list(table.columns) == ["method", *data["targets"], "mean"]
    p = data["against"]["hgprompt"]["best_hscore"]
    assert any("minus best_hscore" in m.value for m in at.markdown) and "pos_e" in against.columns
    row = against[against["method"] == "hgprompt"].iloc[0]
    assert row["pooled (points) [95 % interval]"].startswith(f"{100 * p['mean_diff']:+.1f} [{100 * p['ci95'][0]:+.1f}")
    assert {"Download results.csv", "Download results.md"} <= {d.label for d in at.get("download_button")}
    # drill-down: one target's seeds, its methods and jobs, a stored job's JSON
    at.selectbox(key="study_target").set_value("pos_c").run()
    assert any("Sources of pos_c: pos_a, pos_b, pos_d, pos_e" in c.value for c in at.caption)
    methods = [d.value for d in at.dataframe][-1]  # seed 1's methods on pos_c
    assert set(methods["method"]) >= {"uniform", "hgprompt", "best_hscore"}
    run = data["per_target"]["pos_c"][1]["methods"]
    assert list(methods["test acc"]) == [run[m]["test_acc"] for m in methods["method"]]
    jobs = at.selectbox(key="study_job").options
    assert any(k.startswith("weights/pos_c/0/") for k in jobs) and any(k.startswith("source/pos_c/") for k in jobs)
    at.selectbox(key="study_job").set_value(next(k for k in jobs if k.startswith("weights/pos_c/1/"))).run()
    shown = json.loads(at.json[0].value)
    assert set(shown["source_hscores"]) == {"pos_a", "pos_b", "pos_d", "pos_e"}
    # a folder that is not a study says so
    at.text_input(key="study_folder").set_value(str(serial_study / "bank")).run()
    assert any("holds no study.json" in e.value for e in at.error)


@pytest.mark.slow
def test_the_dashboard_opened_on_a_workspace_runs_every_view_on_it(app, serial_study, vtab_suite, monkeypatch):
    """The workspace the CLI hands the app (HGPROMPT_WORKSPACE): the user's backbone, the leave-one-out bank, two of
    the suite's targets; a run on it, every tab of the result; the lesson stays on the embedded default."""
    from dashboard.views import plane

    monkeypatch.setattr(plane, "GRID", 3)
    monkeypatch.setattr(plane, "SAMPLES", 12)
    ws = Workspace.from_args(BackboneSpec.from_args(vtab_suite["backbone"]), str(serial_study / "bank"),
                             vtab_suite["tasks"][:2])
    monkeypatch.setenv("HGPROMPT_WORKSPACE", json.dumps(ws.to_dict()))
    at = app.run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.selectbox(key="target").options == ["pos_a", "pos_b"]
    assert at.multiselect(key="sources").value == ["pos_a", "pos_b", "pos_c", "pos_d", "pos_e"]
    assert any("Workspace: backbone: the saved backbone in" in c.value for c in at.caption)
    at.multiselect(key="sources").set_value(["pos_b", "pos_c", "pos_d"])
    at.slider(key="steps").set_value(2)
    at.toggle(key="n_samples__auto").set_value(False).run()
    at.slider(key="n_samples").set_value(12)
    at.selectbox(key="mixing").set_value("task_arithmetic").run()
    at.button(key="run_button").click().run()
    for _ in range(300):
        if "ensemble_job" not in at.session_state:
            break
        time.sleep(0.5)
        at.run()
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    res = at.session_state["ensemble_result"]
    model_fp = json.load(open(os.path.join(vtab_suite["backbone"], "config.json")))["fingerprint"]
    assert res.names == ["pos_b", "pos_c", "pos_d"] and res.target == "pos_a" and res.backbone_fingerprint == model_fp
    for tab in ("Weights", "Objective", "H-scores", "Conflicts", "Feature maps", "Tuning", "Export"):
        at.session_state["result_tab"] = tab
        at.run()
        assert not at.exception, (tab, [e.message for e in at.exception])
    at.session_state["result_tab"] = "Conflicts"
    at.run()
    at.radio(key="inter_view").set_value("plane").run()
    at.button(key="plane_button").click().run()
    for _ in range(300):
        if not any(str(k).startswith("plane_") and str(k).endswith("_job") for k in at.session_state):
            break
        time.sleep(0.5)
        at.run()
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert any(json.loads(c.proto.spec)["layout"]["title"]["text"].startswith("Task-vector plane")
               for c in at.get("plotly_chart"))
    from core import assets

    if assets.available():
        at.switch_page("app_pages/lesson.py").run()
        assert not at.exception and any("The lesson runs on the embedded default" in i.value for i in at.info)
    at.switch_page("app_pages/data.py").run()
    assert not at.exception and at.selectbox(key="data_task").options == ["target · pos_a", "target · pos_b"]


@pytest.mark.slow
def test_the_sidebar_opens_a_workspace_by_server_paths_and_keeps_it_after_a_reload(app, serial_study, vtab_suite,
                                                                                   tmp_path):
    from streamlit.testing.v1 import AppTest

    at = app.run()
    default_targets = at.selectbox(key="target").options
    # a bank of another backbone: refused, the workspace unchanged
    from core.model.toy import toy_bank, toy_model

    toy_bank(toy_model(seed=5)).save(tmp_path / "foreign")
    at.text_input(key="ws_backbone").set_value(vtab_suite["backbone"])
    at.text_input(key="ws_bank").set_value(str(tmp_path / "foreign"))
    at.text_area(key="ws_targets").set_value(vtab_suite["suite"])
    at.button(key="ws_open").click().run()
    assert any("does not fit the backbone" in e.value and "foreign" in e.value for e in at.error)
    assert at.selectbox(key="target").options == default_targets
    # the study's bank: opened, every page on it
    at.text_input(key="ws_bank").set_value(str(serial_study / "bank"))
    at.button(key="ws_open").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.selectbox(key="target").options == ["pos_a", "pos_b", "pos_c", "pos_d", "pos_e"]
    assert at.multiselect(key="sources").value == ["pos_a", "pos_b", "pos_c", "pos_d", "pos_e"]
    # another browser on the same server keeps the server's workspace
    other = AppTest.from_file(APP, default_timeout=180).run()
    assert not other.exception and other.selectbox(key="target").options == default_targets
    # a reload (a new session on the same URL) finds the same workspace
    again = AppTest.from_file(APP, default_timeout=180)
    again.query_params["sid"] = at.session_state["sid"]
    again.run()
    assert not again.exception and again.selectbox(key="target").options == ["pos_a", "pos_b", "pos_c", "pos_d",
                                                                             "pos_e"]
    again.button(key="ws_reset").click().run()
    assert again.selectbox(key="target").options == default_targets
