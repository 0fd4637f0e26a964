"""AppTest: every page renders, and a full small run driven through the widgets shows its results."""
import json
import os
import threading
import time

import numpy as np
import pytest
import torch

from core import assets

pytestmark = pytest.mark.skipif(not assets.available(), reason="the embedded default is not built")
APP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dashboard", "app.py")


@pytest.fixture
def app(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("HGPROMPT_RUNS", str(tmp_path / "runs"))
    import dashboard.state as state

    monkeypatch.setattr(state, "RUNS_ROOT", str(tmp_path / "runs"))
    monkeypatch.setattr(state, "DATA_ROOTS", [os.path.realpath(tmp_path)])  # local paths: the test's folder only
    return AppTest.from_file(APP, default_timeout=120)


def _charts(at):
    out = []
    for el in at.get("plotly_chart"):
        spec = json.loads(el.proto.spec)
        title = spec.get("layout", {}).get("title", {})
        out.append(title.get("text") if isinstance(title, dict) else title)
    return out


@pytest.mark.parametrize("page",
                         ["app_pages/ensemble.py", "app_pages/compare.py", "app_pages/data.py", "app_pages/lesson.py",
                                  "app_pages/about.py", "app_pages/docs.py"])
def test_every_page_renders_what_it_is_for(app, page):
    from core import HGPromptEnsemble, Task
    from core.options import options

    at = app.run()
    if page != "app_pages/ensemble.py":
        at.switch_page(page).run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.title
    text = " ".join(m.value for m in at.markdown)
    if page == "app_pages/ensemble.py":  # opens on the default target, every shipped target and source offered
        assert at.selectbox(key="target").value == assets.default_target()
        assert set(assets.shipped_tasks("target")) <= set(at.selectbox(key="target").options)
        assert len(at.multiselect(key="sources").value) == len(assets.shipped_tasks("source"))
        assert at.button(key="run_button") and not at.warning  # ready to run, nothing missing
        # every setting the estimator shows in the sidebar, with the estimator's own default
        shown = {name: opt for name, opt in options(HGPromptEnsemble).items() if opt.spec.ui}
        assert at.selectbox(key="regularizer").value == shown["regularizer"].default
        assert at.number_input(key="lam").value == shown["lam"].default
        assert at.slider(key="steps").value == shown["steps"].default
        assert at.toggle(key="n_samples__auto").value is True  # "auto", as the estimator's default says
    elif page == "app_pages/compare.py":  # a new session has no runs yet, and says so
        assert any("No runs yet" in i.value for i in at.info)
    elif page == "app_pages/data.py":  # the default target's images and counts per class and split
        task = Task.load(assets.task_path(assets.default_target()))
        counts = at.dataframe[0].value
        assert list(counts["class"]) == [str(c) for c in task.classes]
        assert int(counts["test"].sum()) == len(task.splits["test"]) and len(at.get("image")) >= 2 * task.num_classes
    elif page == "app_pages/lesson.py":  # step 1 of 5, with the target named
        assert at.header[0].value == "What a prompt is" and assets.default_target() in text
    elif page == "app_pages/about.py":  # the objective and the regulariser, as formulas
        assert any("J(\\alpha)" in la.value for la in at.get("latex")) and "Regulariser" in text
    elif page == "app_pages/docs.py":  # the method notes, in the app
        assert "where it goes beyond the paper" in text


def _array(v):
    """A plotly JSON array: a list, or the typed-array form {"dtype", "bdata"} plotly writes for numpy arrays."""
    import base64

    import numpy as np

    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
    return np.asarray(v)


def _wait_for(condition, what: str, timeout: float = 240) -> None:
    """Poll ``condition`` until it holds; a hang guard (``what`` says what never happened), not a speed check."""
    t0 = time.time()
    while not condition():
        if time.time() - t0 > timeout:
            raise AssertionError(what)
        time.sleep(0.2)


def _wait(at, key, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        job = at.session_state[key] if key in at.session_state else None
        if job is None or job.finished:
            return
        time.sleep(0.5)
    raise AssertionError("the job did not finish")


def _click_run(at):
    """Click Run, wait for the job, and rerun until its result is on the page; the result."""
    at.button(key="run_button").click().run()
    _wait(at, "ensemble_job")
    at.run()
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at.session_state["ensemble_result"]


def _settings(at, steps, n_samples, seed=None):
    """Set the run's settings in the sidebar (a run uses what the sidebar shows; there is no Apply step)."""
    at.slider(key="steps").set_value(steps)
    at.toggle(key="n_samples__auto").set_value(False).run()  # "auto" off: the slider of a sample size appears
    at.slider(key="n_samples").set_value(n_samples)
    if seed is not None:
        at.number_input(key="seed").set_value(seed)
    at.run()
    return at


def test_full_small_run_through_widgets(app):
    at = _settings(app.run(), 3, 40)
    at.button(key="run_button").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert "ensemble_job" in at.session_state
    _wait(at, "ensemble_job")
    at.run()
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    res = at.session_state["ensemble_result"]
    assert abs(sum(res.weights) - 1) < 1e-6 and 1 <= len(res.history) <= 5  # at most 3 steps, start and final
    titles = _charts(at)
    assert "Ensemble weights" in titles
    assert not any(t and "PCA maps" in t for t in titles), "the maps are drawn only when their tab is opened"
    at.session_state["result_tab"] = "H-scores"
    at.run()
    at.button(key="per_class_button").click().run()
    _wait(at, f"per_class_job_{res.id}")
    at.run()
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    terms = at.session_state[f"per_class_{res.id}"]["terms"]
    # The fit's own sample: every source's row sums to the H-score the fit reported for it, the last to the ensemble's.
    assert terms.shape == (len(res.names) + 1, res.n_classes) and (terms >= 0).all()
    assert terms[:-1].sum(1) == pytest.approx(res.source_hscores, abs=2e-3)
    assert terms[-1].sum() == pytest.approx(res.ensemble_hscore, abs=2e-3)
    assert any(t and t.startswith("Each class's share of the H-score") for t in _charts(at))
    at.session_state["result_tab"] = "Conflicts"
    at.run()
    assert "Gradient cosine between sources" in _charts(at)
    at.button(key="inter_button").click().run()
    _wait(at, f"inter_job_{res.id}")
    at.run()
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    titles = _charts(at)
    assert "Measured mixing loss I (H-score units)" in titles
    assert any(t and t.startswith("Centred cosine<br><sup>random prompts:") for t in titles)
    at.radio(key="inter_view").set_value("pair").run()
    assert any(t and t.startswith("H-score from ") for t in _charts(at))  # the pair view, on the pair that loses most
    at.toggle(key="pair_maps").set_value(True).run()  # the target's maps at both ends and the midpoint
    assert not at.exception, [e.message for e in at.exception]
    spec = [json.loads(el.proto.spec) for el in at.get("plotly_chart") if "halfway" in el.proto.spec][0]
    a, b = at.selectbox(key="pair_a").value, at.selectbox(key="pair_b").value
    titles = [n["text"] for n in spec["layout"]["annotations"]]
    assert titles == [f"<b>{a} (t = 0)</b>", "<b>midpoint</b>", f"<b>{b} (t = 1)</b>"]
    assert "LDA maps" in spec["layout"]["title"]["text"]
    at.radio(key="inter_view").set_value("simplex").run()
    at.button(key="simplex_button").click().run()
    _wait(at, f"simplex_job_{res.id}")
    at.run()
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert "H-score over the mixtures of three sources" in _charts(at)
    assert any("Computed in" in c.value for c in at.caption)
    at.toggle(key="projector").set_value(True).run()  # a teacher's projector: larger text on every chart
    sizes = [json.loads(el.proto.spec)["layout"].get("font", {}).get("size") for el in at.get("plotly_chart")]
    assert sizes and all(s and s >= 18 for s in sizes)
    at.toggle(key="projector").set_value(False).run()
    at.session_state["result_tab"] = "Feature maps"
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert any(t and "PCA maps" in t for t in _charts(at))
    assert any("PCA maps computed in" in c.value for c in at.caption)  # says what was computed, and how long it took
    at.radio(key="map_method").set_value("lda").run()  # class separation, on points the axes never saw
    at.radio(key="map_layout").set_value("once, on the ensemble").run()
    assert not at.exception, [e.message for e in at.exception]
    spec = [json.loads(el.proto.spec) for el in at.get("plotly_chart") if "LDA maps" in el.proto.spec][0]
    assert ("held-out points" in spec["layout"]["title"]["text"]
            and "fitted on the ensemble" in spec["layout"]["title"]["text"])
    ids = _array(spec["data"][0]["customdata"]).tolist()
    from dashboard.state import digest
    at.session_state["map_selected"] = {digest(res.id, 300): ids[:3]}  # what a box selection stores
    at.run()
    assert any("3 of 3 selected images shown" in m.value for m in at.markdown)
    spec = [json.loads(el.proto.spec) for el in at.get("plotly_chart") if "LDA maps" in el.proto.spec][0]
    panels = [t for t in spec["data"] if "customdata" in t]
    assert len(panels) == len(res.names) + 1 and all(list(_array(t["selectedpoints"])) == [0, 1, 2] for t in panels)
    at.session_state["result_tab"] = "Export"
    at.run()
    labels = [b.proto.label for b in at.get("download_button")]
    assert "Figure: maps (HTML)" in labels and "Ensembled prompt (safetensors)" in labels
    # The run was written as a complete run folder and shows up on the compare page.
    at.switch_page("app_pages/compare.py").run()
    assert not at.exception
    assert at.dataframe and len(at.dataframe[0].value) == 1


def test_a_run_uses_what_the_sidebar_shows_and_says_so(app):
    at = app.run()
    at.number_input(key="lam").set_value(3.0).run()  # changed and never "applied": a run must still use it
    at = _settings(at, 2, 40)
    res = _click_run(at)
    assert res.params["lam"] == 3.0
    assert any("lam = 3.0" in c.value for c in at.caption)


def test_stop_button_stops_and_keeps_the_partial_run(app):
    from core.io.runs import load_run

    at = app.run()
    at.selectbox(key="start").set_value("uniform")
    at.selectbox(key="optimizer").set_value("adam")
    at = _settings(at, 200, 40)
    at.button(key="run_button").click().run()
    job = at.session_state["ensemble_job"]
    _wait_for(lambda: len([p for p in job.progress if p.get("stage") == "step"]) >= 3 or job.finished,
              "the run did not start stepping")
    assert not job.finished
    at.run()
    at.button(key=f"stop-{job.id}").click().run()
    _wait(at, "ensemble_job", timeout=60)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    res = at.session_state["ensemble_result"]
    assert res.stopped and 3 <= len(res.history) < 100
    assert "stopped early" in at.success[0].value
    saved = load_run(res.run_path)  # complete on disk: what was computed before Stop is kept
    assert saved["metrics"]["stopped"] is True
    assert len(saved["history"]) == len(res.history)


def test_concurrent_sessions_get_their_own_runs_and_never_touch_the_backbone(tmp_path, monkeypatch):
    """Three browser sessions start runs at once: one runs, the others say they are queued; each gets its own result."""
    import threading

    from streamlit.testing.v1 import AppTest

    import dashboard.ensemble_runs as view
    import dashboard.state as state
    from core.io.runs import list_runs

    monkeypatch.setattr(state, "RUNS_ROOT", str(tmp_path / "runs"))
    model = state.backbone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    intervals, lock = [], threading.Lock()
    real_fit = view.HGPromptEnsemble.fit

    def timed_fit(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return real_fit(self, *a, **kw)
        finally:
            with lock:
                intervals.append((t0, time.perf_counter()))

    monkeypatch.setattr(view.HGPromptEnsemble, "fit", timed_fit)
    sessions = []
    for seed in (11, 12, 13):
        sessions.append(_settings(AppTest.from_file(APP, default_timeout=120).run(), 3, 40, seed))
    for at in sessions:
        at.button(key="run_button").click().run()
        assert not at.exception, [e.message for e in at.exception]
    assert any(any("queued" in i.value for i in at.info) for at in sessions[1:]), "no session said it was queued"
    for at in sessions:
        _wait(at, "ensemble_job")
        at.run()
        at.run()
        assert not at.exception, [e.message for e in at.exception]
    results = [at.session_state["ensemble_result"] for at in sessions]
    assert [r.params["seed"] for r in results] == [11, 12, 13]
    dirs = {os.path.dirname(os.path.dirname(r.run_path)) for r in results}
    assert len(dirs) == 3, "two sessions shared a run folder"
    for r in results:
        runs = list_runs(os.path.dirname(r.run_path))
        assert [x["id"] for x in runs] == [r.id], "a session sees another session's run"
    intervals.sort()
    assert all(a[1] <= b[0] for a, b in zip(intervals, intervals[1:], strict=False)), "heavy jobs overlapped"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a session modified the shared backbone"
    assert not any(p.requires_grad for p in model.parameters())


def _upload_prompt(at, files):
    at.file_uploader(key="prompt_files").set_value(files)
    at.run()
    at.button(key="add_prompt").click().run()
    return at


def _upload_half_mnist(at, name, folder):
    """Upload, through the widgets, a prompt called ``name``: the shipped mnist prompt halved."""
    from core import PromptBank, SourcePrompt

    mnist = PromptBank.load(assets.PROMPTS_DIR)["mnist"]
    SourcePrompt(name, mnist.prompt * 0.5, source_task="mine", backbone=mnist.backbone,
                 backbone_fingerprint=mnist.backbone_fingerprint).save(folder)
    return _upload_prompt(at, [(f"{name}.safetensors", (folder / f"{name}.safetensors").read_bytes(),
                                "application/octet-stream"),
                               (f"{name}.json", (folder / f"{name}.json").read_bytes(), "application/json")])


def _errors(at):
    return " | ".join(e.value for e in at.error)


def test_bad_uploads_get_a_message_and_nothing_else_breaks(app, tmp_path, monkeypatch):
    """Wrong file types, pickles, prompts for another backbone, broken zips, single-class and oversized targets."""
    import pickle
    import zipfile

    import numpy as np
    from PIL import Image

    import dashboard.views.inputs as view
    from core import SourcePrompt, assets
    from core.io.prompt_bank import PromptBank

    at = app.run()
    good = PromptBank.load(assets.PROMPTS_DIR)["mnist"]
    cases = 0

    # A prompt's JSON alone (wrong combination of files).
    folder = tmp_path / "p"
    good.save(folder)
    _upload_prompt(at, [("mnist.json", (folder / "mnist.json").read_bytes(), "application/json")])
    assert "exactly one .safetensors file and its .json" in _errors(at)
    cases += 1
    # A pickle dressed up as a prompt: refused by its bytes, never unpickled.
    boom = pickle.dumps({"prompt": [1, 2, 3]})
    _upload_prompt(at, [("evil.safetensors", boom, "application/octet-stream"),
                        ("evil.json", (folder / "mnist.json").read_bytes(), "application/json")])
    assert "pickle" in _errors(at).lower()
    cases += 1
    # A prompt made for another backbone.
    other = SourcePrompt("alien", good.prompt.clone(), backbone="other_vit", backbone_fingerprint="0123456789abcdef")
    other.save(tmp_path / "o")
    _upload_prompt(at, [("alien.safetensors", (tmp_path / "o" / "alien.safetensors").read_bytes(),
                         "application/octet-stream"),
                        ("alien.json", (tmp_path / "o" / "alien.json").read_bytes(), "application/json")])
    assert "backbone" in _errors(at)
    cases += 1
    # A good prompt under a new name is accepted and offered as a source.
    renamed = SourcePrompt("mnist_copy", good.prompt.clone(), backbone=good.backbone,
                           backbone_fingerprint=good.backbone_fingerprint)
    renamed.save(tmp_path / "r")
    _upload_prompt(at, [("x.safetensors", (tmp_path / "r" / "mnist_copy.safetensors").read_bytes(),
                         "application/octet-stream"),
                        ("x.json", (tmp_path / "r" / "mnist_copy.json").read_bytes(), "application/json")])
    assert "mnist_copy" in at.multiselect(key="sources").options

    def add_target_zip(name, build):
        zpath = tmp_path / name
        with zipfile.ZipFile(zpath, "w") as zf:
            build(zf)
        at.file_uploader(key="target_zip").set_value((name, zpath.read_bytes(), "application/zip"))
        at.run()
        at.button(key="add_target").click().run()
        return _errors(at)

    def png(value):
        buf = __import__("io").BytesIO()
        Image.fromarray(np.full((8, 8), value, np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    # A VTAB-1k folder missing its test split.
    def vtab_without_test(zf):
        zf.writestr("task/images/a.png", png(0))
        zf.writestr("task/images/b.png", png(255))
        zf.writestr("task/train800.txt", "images/a.png 0\nimages/b.png 1\n")
        zf.writestr("task/val200.txt", "images/a.png 0\nimages/b.png 1\n")
    assert "test" in add_target_zip("missing.zip", vtab_without_test)
    cases += 1
    # Class folders with a single class.
    assert "class" in add_target_zip("one.zip",
                                     lambda zf: [zf.writestr(f"task/only/{i}.png", png(i * 20)) for i in range(6)])
    cases += 1
    # Paths that leave the archive.
    assert "outside" in add_target_zip("escape.zip", lambda zf: zf.writestr("../../escape.png", png(1)))
    cases += 1
    # Not a zip at all.
    at.file_uploader(key="target_zip").set_value(("fake.zip", b"hello", "application/zip"))
    at.run()
    at.button(key="add_target").click().run()
    assert "not a readable zip" in _errors(at)
    cases += 1
    # Over the size cap (lowered for the test).
    monkeypatch.setattr(view, "MAX_UPLOAD_MB", 0.0001)
    at.file_uploader(key="target_zip").set_value(("big.zip", b"PK" + b"\0" * 2000, "application/zip"))
    at.run()
    at.button(key="add_target").click().run()
    assert "larger than" in _errors(at)
    cases += 1
    # A local path that does not exist.
    monkeypatch.setattr(view, "MAX_UPLOAD_MB", 200)
    at.file_uploader(key="target_zip").set_value(None)
    at.text_input(key="target_path").set_value(str(tmp_path / "nowhere")).run()
    at.button(key="add_target").click().run()
    assert "nowhere" in _errors(at) and "does not exist" in _errors(at)
    cases += 1
    assert cases == 9
    assert not at.exception, [e.message for e in at.exception]
    # The page still works: the shipped target is still selectable and the run button is there.
    assert "shapes_ypos" in at.selectbox(key="target").options
    assert at.button(key="run_button")


def test_a_reload_with_the_same_url_lists_the_runs_saved_on_disk(app, tmp_path):
    from streamlit.testing.v1 import AppTest

    from core.io.runs import RunWriter

    at = app.run()
    sid = at.session_state["sid"]
    assert len(sid) == 12
    with RunWriter(str(tmp_path / "runs" / sid / "runs"), "learn", {"target": "shapes_quad", "regularizer": "fishr",
                                                                   "lam": 1.0, "seed": 0,
                                                                   "sources": ["a", "b"]}) as run:
        run.write_json("weights.json", {"names": ["a", "b"], "weights": [1.0, 0.0], "ensemble_hscore": 1.9,
                                        "source_hscores": [1.9, 1.8], "cosine": [[1.0, -0.3], [-0.3, 1.0]],
                                        "objective": 1.9, "n_steps": 0, "stopped": False, "converged": True,
                                        "start": "a"})
        run.write_json("history.json",
                       [{"step": 0, "weights": [1.0, 0.0], "hscore": 1.9, "regularizer": 0.0, "objective": 1.9}])
    again = AppTest.from_file(APP, default_timeout=120)  # a reload: a new session on the same URL
    again.query_params["sid"] = sid
    again.switch_page("app_pages/compare.py").run()
    assert not again.exception, [e.message for e in again.exception]
    rows = again.dataframe[0].value
    assert len(rows) == 1 and rows["steps taken"][0] == 0 and bool(rows["converged"][0])
    with RunWriter(str(tmp_path / "runs" / sid / "runs"), "learn", {"target": "shapes_quad", "regularizer": "fishr",
                                                                   "lam": 0.0, "seed": 0,
                                                                   "sources": ["a", "b"]}) as run:
        run.write_json("weights.json", {"names": ["a", "b"], "weights": [0.4, 0.6], "ensemble_hscore": 1.95,
                                        "source_hscores": [1.9, 1.8], "cosine": [[1.0, 0.2], [0.2, 1.0]],
                                        "objective": 1.95, "n_steps": 1, "stopped": False, "converged": True,
                                        "start": "a"})
        run.write_json("history.json",
                       [{"step": 0, "weights": [1.0, 0.0], "hscore": 1.9, "regularizer": 0.0, "objective": 1.9},
                        {"step": 1, "weights": [0.4, 0.6], "hscore": 1.95, "regularizer": 0.0, "objective": 1.95}])
    again.run()
    from core.io.runs import list_runs

    ids = [r["id"] for r in list_runs(tmp_path / "runs" / sid / "runs")]
    again.multiselect(key="compare_runs").set_value(ids).run()
    assert not again.exception, [e.message for e in again.exception]
    overlay = {json.loads(el.proto.spec)["layout"]["title"]["text"]: json.loads(el.proto.spec)
               for el in again.get("plotly_chart")}
    bars = overlay["Weights of every run"]["data"]
    assert len(bars) == 2 and {tuple(_array(b["y"])) for b in bars} == {(1.0, 0.0), (0.4, 0.6)}  # one bar group per run
    assert len(overlay["Objective J per step"]["data"]) == 2
    diff = _array(overlay["Cosine change, second run - first"]["data"][0]["z"]).reshape(2, 2)
    assert abs(abs(diff[0, 1]) - 0.5) < 1e-9  # 0.2 against -0.3, in whichever order the runs are listed
    other = AppTest.from_file(APP, default_timeout=120)  # another browser: its own folder, unless it asks for all
    other.switch_page("app_pages/compare.py").run()
    assert not other.dataframe
    other.checkbox(key="all_runs").check().run()
    assert len(other.dataframe[0].value) == 2


def test_an_added_prompt_is_selected_and_a_local_target_never_replaces_a_shipped_one(app, tmp_path):
    from core.model.toy import toy_task

    at = _upload_half_mnist(app.run(), "my_prompt", tmp_path)
    assert not at.exception, [e.message for e in at.exception]
    assert "my_prompt" in at.multiselect(key="sources").value  # selected, not only offered
    toy_task("shapes_quad").save_npz(tmp_path / "clash.npz")
    at.text_input(key="target_path").set_value(str(tmp_path / "clash.npz")).run()
    at.button(key="add_target").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.selectbox(key="target").value == "shapes_quad (local)"
    assert "shapes_quad" in at.selectbox(key="target").options  # the shipped one is still there


def test_tuning_estimates_first_reports_every_epoch_and_gives_intervals_over_seeds(app):
    from dashboard.state import BackgroundJob
    from dashboard.views.tuning import progress

    job = BackgroundJob("tune", lambda j: None)
    job.started = time.time() - 10
    job.progress = [{"stage": "job", "phase": "weights", "done": 1, "total": 1, "key": "weights/t/1/x"},
                    {"stage": "job", "phase": "tunes", "done": 1, "total": 2, "key": "tune/t/0/random/x"},
                    {"stage": "epoch", "methods": ["random"], "seed": 1, "epochs": 4, "epoch": 2}]
    fraction, label = progress(job)
    assert fraction == pytest.approx(0.75) and "epoch 2/4" in label and "1/2 tunes done" in label and "s left" in label
    assert "seed 1" in label

    at = _settings(app.run(), 2, 40)
    res = _click_run(at)
    at.session_state["result_tab"] = "Tuning"
    at.run()
    at.multiselect(key="tune_methods").set_value(["random", "linear_probe"])
    at.slider(key="tune_epochs").set_value(1)
    at.number_input(key="tune_seeds").set_value(2).run()
    estimate = [i.value for i in at.info if i.value.startswith("Estimate:")]
    assert estimate and "4 tunes of 1 epochs" in estimate[0]  # said before anything starts (at most: shared tunes)
    at.multiselect(key="tune_methods").set_value(["linear_probe"]).run()  # the cheap one, to keep the test short
    at.button(key="tune_button").click().run()
    job = at.session_state[f"tune_job_{res.id}"]
    _wait(at, f"tune_job_{res.id}")
    assert [p["epoch"] for p in job.progress if p.get("stage") == "epoch" and p["seed"] == 0] == [1]  # per epoch
    at.run()
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    saved = json.loads(open(os.path.join(res.run_path, "tuning.json")).read())
    rows = saved["results"]
    assert [(r["method"], r["seed"]) for r in rows] == [("linear_probe", 0), ("linear_probe", 1)]
    assert saved["epochs"] == 1 and saved["seeds"] == 2
    table = at.dataframe[0].value
    assert list(table["method"]) == ["linear_probe"] and list(table["seeds"]) == [2]
    assert table["mean test acc (%)"][0] == pytest.approx(100 * np.mean([r["test_acc"] for r in rows]), abs=0.05)
    spec = [json.loads(el.proto.spec) for el in at.get("plotly_chart") if "after tuning" in el.proto.spec][0]
    assert spec["data"][0]["error_y"]["visible"] and "2 seeds" in spec["layout"]["title"]["text"]


def test_the_tuning_summary_pairs_hgprompt_with_every_method_by_seed():
    from dashboard import charts
    from dashboard.views.tuning import _summary

    rows = [{"method": m, "seed": s, "test_acc": a}
            for s, (h, r) in enumerate([(0.80, 0.75), (0.82, 0.80), (0.79, 0.79)])
            for m, a in (("hgprompt", h), ("random", r))]
    table = {r["method"]: r for r in _summary({"results": rows})}
    assert table["hgprompt"]["mean test acc (%)"] == pytest.approx(80.3, abs=1e-4)
    assert table["hgprompt"]["HGPrompt minus this"] == "(the reference)"  # said, not an empty "None" cell
    assert None not in table["hgprompt"].values() and set(table["hgprompt"]) == set(table["random"])
    assert table["random"]["HGPrompt minus this"] == f"{100 * (0.05 + 0.02 + 0.0) / 3:+.1f} pp"
    assert table["random"]["wins/ties/losses"] == "2/1/0" and table["random"]["95 % interval"].startswith("[+0.0")
    fig = charts.accuracy_bars(rows)
    assert list(fig.data[0].x) == ["hgprompt", "random"] and fig.data[0].error_y.visible
    assert fig.data[0].y[0] == pytest.approx(0.8033, abs=1e-4)
    assert not charts.accuracy_bars([r for r in rows if r["seed"] == 0]).data[0].error_y.visible  # one seed: no bars


def test_the_tuning_tab_says_which_methods_were_one_tune():
    from dashboard.views.tuning import same_tunes

    def run(seed, jobs):
        return {"seed": seed, "methods": {m: {"test_acc": 0.8, "val_acc": 0.8, "job": j} for m, j in jobs.items()}}

    saved = {"per_target": {"t": [run(0, {"hgprompt": "a0", "best_hscore": "a0", "random": "r0", "uniform": "u0"}),
                                  run(1, {"hgprompt": "a1", "best_hscore": "a1", "random": "r1", "uniform": "a1"})]}}
    assert same_tunes(saved) == [["best_hscore", "hgprompt"]]  # uniform shared hgprompt's tune on one seed only
    saved["per_target"]["t"][1]["methods"]["best_hscore"]["job"] = "b1"
    assert same_tunes(saved) == []


def test_an_identical_run_is_served_from_the_server_cache_into_its_own_folder(app):
    from streamlit.testing.v1 import AppTest

    from core.io.runs import load_run

    first = _settings(app.run(), 2, 44, seed=7)
    first.button(key="run_button").click().run()
    _wait(first, "ensemble_job")
    first.run()
    first.run()
    a = first.session_state["ensemble_result"]
    # another student, same defaults
    second = _settings(AppTest.from_file(APP, default_timeout=120).run(), 2, 44, seed=7)
    import dashboard.ensemble_runs as runs

    real_fit = runs.HGPromptEnsemble.fit
    runs.HGPromptEnsemble.fit = lambda *a, **k: pytest.fail("an identical run was fitted again")
    try:
        second.button(key="run_button").click().run()
    finally:
        runs.HGPromptEnsemble.fit = real_fit
    assert "ensemble_job" not in second.session_state  # nothing computed again, not even in the background
    b = second.session_state["ensemble_result"]
    assert b.served_from == a.id and b.weights == a.weights
    assert b.run_path != a.run_path and load_run(b.run_path)["weights"]["weights"] == a.weights
    assert "served from its result" in second.success[0].value
    third = _settings(AppTest.from_file(APP, default_timeout=120).run(), 2, 44, seed=8)  # other settings: computed
    third.button(key="run_button").click().run()
    assert "ensemble_job" in third.session_state
    _wait(third, "ensemble_job")


def test_a_class_clicking_run_together_computes_the_run_once_and_each_gets_its_own_copy(tmp_path, monkeypatch):
    """Five sessions click Run on the same settings while the first is still computing: one fit, five run folders."""
    from streamlit.testing.v1 import AppTest

    import dashboard.ensemble_runs as runs
    import dashboard.state as state
    from core.io.runs import load_run

    monkeypatch.setattr(state, "RUNS_ROOT", str(tmp_path / "runs"))
    fits = []
    real_fit = runs.HGPromptEnsemble.fit

    def counted_fit(self, *a, **kw):
        fits.append(1)
        time.sleep(2)  # the others click while this one computes
        return real_fit(self, *a, **kw)

    monkeypatch.setattr(runs.HGPromptEnsemble, "fit", counted_fit)
    sessions = [_settings(AppTest.from_file(APP, default_timeout=120).run(), 3, 40, 21) for _ in range(5)]
    for at in sessions:
        at.button(key="run_button").click().run()
        assert not at.exception, [e.message for e in at.exception]
    for at in sessions:
        _wait(at, "ensemble_job")
        at.run()
        at.run()
    results = [at.session_state["ensemble_result"] for at in sessions]
    assert len(fits) == 1, "an identical run was computed twice"
    assert len({r.run_path for r in results}) == 5 and len({os.path.dirname(r.run_path) for r in results}) == 5
    assert all(r.weights == results[0].weights for r in results)
    assert [bool(r.served_from) for r in results] == [False, True, True, True, True]
    assert all(load_run(r.run_path)["weights"]["weights"] == results[0].weights for r in results)
    assert not state.runs_in_flight()


def test_a_queued_job_knows_its_place():
    from dashboard.state import BackgroundJob, waiting

    queue = waiting()
    queue.extend(["x1", "x2"])
    try:
        job = BackgroundJob("ensemble", lambda j: None, id="x2")
        assert job.queue_position == 2 and BackgroundJob("ensemble", lambda j: None, id="other").queue_position is None
    finally:
        queue.remove("x1")
        queue.remove("x2")


def test_a_reload_brings_back_the_last_run_the_uploads_and_the_added_targets(app, tmp_path):
    from streamlit.testing.v1 import AppTest

    from core.model.toy import toy_task

    at = _upload_half_mnist(app.run(), "kept_prompt", tmp_path)
    toy_task("mine").save_npz(tmp_path / "mine.npz")
    at.text_input(key="target_path").set_value(str(tmp_path / "mine.npz")).run()
    at.button(key="add_target").click().run()
    at.selectbox(key="target").set_value(assets.default_target()).run()
    _settings(at, 2, 40)
    res = _click_run(at)
    assert "kept_prompt" in res.names
    again = AppTest.from_file(APP, default_timeout=120)  # a reload: a new session on the same URL
    again.query_params["sid"] = at.session_state["sid"]
    again.run()
    assert not again.exception, [e.message for e in again.exception]
    back = again.session_state["ensemble_result"]
    assert back.id == res.id and back.weights == res.weights and back.names == res.names
    assert torch.equal(back.prompt, res.prompt) and torch.equal(back.stack, res.stack)
    assert "read back from its run folder" in again.success[0].value
    assert "kept_prompt" in again.multiselect(key="sources").options
    assert "mine" in again.selectbox(key="target").options


def test_the_data_page_shows_images_of_every_class_of_every_task(app):
    from core import Task

    at = app.run()
    at.switch_page("app_pages/data.py").run()
    assert not at.exception, [e.message for e in at.exception]
    names = at.selectbox(key="data_task").options
    assert {f"source · {n}" for n in assets.shipped_tasks("source")} <= set(names)
    assert {f"target · {n}" for n in assets.shipped_tasks("target")} <= set(names)
    at.selectbox(key="data_task").set_value("source · mnist")
    at.slider(key="data_per_class").set_value(3).run()
    task = Task.load(assets.task_path("mnist"))
    assert len(at.get("image")) == 3 * task.num_classes
    counts = at.dataframe[0].value
    assert list(counts["class"]) == [str(c) for c in task.classes]
    assert int(counts["train"].sum()) == len(task.splits["train"])


def test_the_lesson_clicks_through_its_steps_with_numbers_measured_on_the_spot(app, monkeypatch):
    import numpy as np

    from dashboard import ensemble_runs

    real = ensemble_runs.defaults
    monkeypatch.setattr(ensemble_runs, "defaults", lambda: {**real(), "n_samples": 40, "steps": 3})  # a short class run
    at = app.run()
    at.switch_page("app_pages/lesson.py").run()
    seen = []
    for step in range(5):
        assert not at.exception, [e.message for e in at.exception]
        seen.append(at.header[0].value)
        if step == 3:
            at.button(key="lesson_run").click().run()
            _wait(at, "ensemble_job")
            at.run()
            at.run()
            res = at.session_state["ensemble_result"]
            assert res.params["n_samples"] == 40 and res.target == assets.default_target()
            assert "Ensemble weights" in _charts(at)
            top = res.names[int(np.argmax(res.weights))]
            assert any(f"on **{top}**" in m.value for m in at.markdown)
        if step == 4:
            if f"inter_result_{res.id}" not in at.session_state:  # (a run served from an identical earlier one on
                at.button(key="lesson_inter_button").click().run()  # this server comes with its measurement)
                _wait(at, f"inter_job_{res.id}")
                at.run()
                at.run()
            assert "Measured mixing loss I (H-score units)" in _charts(at)
            r = at.session_state[f"inter_result_{res.id}"]
            iu = np.triu_indices(len(r.names), 1)
            assert any(f"**{int((r.mixing_loss[iu] < 0).sum())} of {len(iu[0])}**" in m.value for m in at.markdown)
            break
        at.button(key="lesson_next").click().run()
    assert seen == ["What a prompt is", "What the H-score measures", "Why averaging can hurt", "What the weights pick",
                    "Where prompts interfere"]
    # The lesson's scores are the fit's own: the same sample gives the same H-score per source.
    from dashboard.state import backbone
    from dashboard.views.lesson import _scores

    s = _scores(assets.default_target(), backbone().fingerprint, 40, 0)
    assert s["h"] == pytest.approx(res.source_hscores, abs=2e-3)

    # A reload mid-lesson (a new browser session on the same URL): the step, the run and the measurement come back.
    from streamlit.testing.v1 import AppTest

    again = AppTest.from_file(APP, default_timeout=120)
    again.query_params["sid"] = at.session_state["sid"]
    again.run()
    again.switch_page("app_pages/lesson.py").run()
    assert not again.exception, [e.message for e in again.exception]
    assert again.header[0].value == "Where prompts interfere"
    assert "lesson_inter_button" not in [b.key for b in again.button]  # not offered again: it was measured
    assert any(f"**{int((r.mixing_loss[iu] < 0).sum())} of {len(iu[0])}**" in m.value for m in again.markdown)
    assert again.session_state["ensemble_result"].id == res.id
    again.button(key="lesson_back").click().run()
    assert again.header[0].value == "What the weights pick" and not again.exception


@pytest.mark.skipif(not os.path.isdir(assets.DEEP_PROMPTS_DIR), reason="the deep prompt bank is not built")
def test_the_shipped_deep_bank_shows_its_per_layer_views(app):
    at = app.run()
    at.radio(key="bank_kind").set_value("deep").run()
    assert not at.exception, [e.message for e in at.exception]
    sources = at.multiselect(key="sources").value
    assert sources and all(s.endswith("_deep") for s in sources)  # switching banks picks the whole new bank
    at.multiselect(key="sources").set_value(sources[:3])
    _settings(at, 2, 40)
    res = _click_run(at)
    assert res.layer_cosine is not None and res.stack.dim() == 4
    at.session_state["result_tab"] = "Conflicts"
    at.run()
    depth = res.stack.shape[1]
    assert at.select_slider(key="layer").options == ["all"] + [str(i) for i in range(depth)]
    at.select_slider(key="layer").set_value(1).run()
    at.button(key="inter_button").click().run()
    _wait(at, f"inter_job_{res.id}")
    at.run()
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    titles = _charts(at)  # the tab's one layer control sets every matrix's layer, and each title names it
    assert "Gradient cosine between sources, layer 1" in titles
    assert any(t and t.startswith("Centred cosine, layer 1<br><sup>random prompts:") for t in titles)


def test_settings_stay_put_across_pages_and_a_reload(app):
    """A trip to another page (and a reload of the same URL) keeps the sidebar as the user left it."""
    from streamlit.testing.v1 import AppTest

    at = app.run()
    chosen = at.multiselect(key="sources").options[:3]
    at.multiselect(key="sources").set_value(chosen)
    at.selectbox(key="regularizer").set_value("conflict")
    at.number_input(key="lam").set_value(3.0)
    at.selectbox(key="mixing").set_value("task_arithmetic")
    at.selectbox(key="objective").set_value("logme")
    at.toggle(key="projector").set_value(True).run()
    assert not at.exception, [e.message for e in at.exception]

    def kept(t):
        assert t.multiselect(key="sources").value == chosen
        assert t.selectbox(key="regularizer").value == "conflict" and t.number_input(key="lam").value == 3.0
        assert t.selectbox(key="mixing").value == "task_arithmetic" and t.selectbox(key="objective").value == "logme"
        assert t.toggle(key="projector").value is True

    for page in ("app_pages/compare.py", "app_pages/lesson.py", "app_pages/data.py"):
        at.switch_page(page).run()
        assert at.toggle(key="projector").value is True  # on every page, and kept by the lesson
        at.switch_page("app_pages/ensemble.py").run()
        assert not at.exception, [e.message for e in at.exception]
        kept(at)
    again = AppTest.from_file(APP, default_timeout=120)  # a reload: a new browser session on the same URL
    again.query_params["sid"] = at.session_state["sid"]
    kept(again.run())


def _wait_prefix(at, prefix: str, suffix: str = "_job") -> None:
    """Wait for every job whose key starts with ``prefix`` (its key holds a digest the test does not know)."""
    for key in [k for k in at.session_state if str(k).startswith(prefix) and str(k).endswith(suffix)]:
        _wait(at, key)
    at.run()
    at.run()


def test_task_arithmetic_run_then_its_plane_and_objective_against_accuracy(app, monkeypatch):
    import numpy as np

    from dashboard.views import plane

    monkeypatch.setattr(plane, "GRID", 5)  # a 5 x 5 plane on 40 images: the view, not its cost
    monkeypatch.setattr(plane, "SAMPLES", 40)
    at = _settings(app.run(), 3, 40)
    at.selectbox(key="mixing").set_value("task_arithmetic")
    res = _click_run(at)
    assert res.params["mixing"] == "task_arithmetic" and res.params["objective"] == "hscore"
    w = np.asarray(res.weights)
    assert w.shape == (len(res.names),) and (w >= 0).all() and (w <= 1).all()  # a box, not the simplex
    assert any("task arithmetic" in m.value.lower() for m in [*at.markdown, *at.caption])
    at.session_state["result_tab"] = "Conflicts"
    at.run()
    at.radio(key="inter_view").set_value("plane").run()
    a, b = at.selectbox(key="plane_a").value, at.selectbox(key="plane_b").value
    top2 = [res.names[i] for i in np.argsort(res.source_hscores)[::-1][:2]]
    assert [a, b] == top2  # opens on the two sources with the best objective
    at.toggle(key="plane_probe").set_value(True).run()
    at.button(key="plane_button").click().run()
    _wait_prefix(at, "plane_")
    assert not at.exception, [e.message for e in at.exception]
    assert any(t and t.startswith("Task-vector plane") for t in _charts(at))
    assert any(t and t.startswith("Probe accuracy over the task-vector plane") for t in _charts(at))
    text = " ".join(m.value for m in at.markdown)
    assert ("Best on the grid" in text
            and "Kendall's tau between the objective and the probe accuracy over the 25" in text)
    at.radio(key="inter_view").set_value("accuracy").run()
    at.button(key="obj_acc_button").click().run()
    _wait_prefix(at, "source_probes_")
    assert not at.exception, [e.message for e in at.exception]
    assert any(t and "accuracy" in t.lower() for t in _charts(at))
    text = " ".join(m.value for m in at.markdown)
    assert "sources against the probe" in text and f"plane {a} x {b} against the probe" in text
    at.session_state["result_tab"] = "Export"
    at.run()
    labels = [d.label for d in at.get("download_button")]
    assert {"Figure: plane (HTML)", "Figure: plane_probe (HTML)"} <= set(labels)  # the lab's figures are exported


@pytest.mark.slow  # it tunes on the spot: about 45 s on 2 cores
def test_the_lesson_shows_when_mixing_helps_with_numbers_measured_on_the_spot(app):
    from streamlit.testing.v1 import AppTest

    from dashboard.views.lesson import PAIR, STEPS

    at = app.run()
    at.switch_page("app_pages/lesson.py").run()
    for _ in range(len(STEPS) - 1):
        at.button(key="lesson_next").click().run()
    assert at.header[0].value == "When mixing helps" and not at.exception
    at.button(key="lesson_mix_button").click().run()
    _wait_prefix(at, "lesson_mixing_")
    assert not at.exception, [e.message for e in at.exception]
    text = " ".join(m.value for m in at.markdown)
    assert f"**{PAIR[0]}**" in text and f"**{PAIR[1]}**" in text and "their **sum**" in text
    assert "HGPrompt on the whole bank" in text and "with task arithmetic and lambda 0" in text
    h_chart = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert h_chart["layout"]["yaxis"]["range"][0] == 0.0  # H as bars from zero
    again = AppTest.from_file(APP, default_timeout=120)  # a reload: the measurement is read back, not redone
    again.query_params["sid"] = at.session_state["sid"]
    again.run()
    again.switch_page("app_pages/lesson.py").run()
    assert again.header[0].value == "When mixing helps"
    assert "lesson_mix_button" not in [b.key for b in again.button]
    assert " ".join(m.value for m in again.markdown).count("HGPrompt on the whole bank") == 1


def test_a_rule_the_sources_cannot_take_is_named_before_run(app):
    at = app.run()
    at.selectbox(key="mixing").set_value("layerwise").run()
    assert any("needs deep prompts" in w.value and "deep bank" in w.value for w in at.warning)
    at.radio(key="bank_kind").set_value("deep").run()  # deep prompts: the rule runs, the warning goes
    assert not any("needs deep prompts" in w.value for w in at.warning) and not at.exception


@pytest.mark.skipif(not os.path.isdir(assets.DEEP_PROMPTS_DIR), reason="the deep prompt bank is not built")
def test_a_layerwise_run_shows_live_and_in_every_tab(app):
    """One weight per source and block: the live view, every tab and the export take (K, depth) weights."""
    import numpy as np

    at = app.run()
    at.radio(key="bank_kind").set_value("deep").run()
    at.multiselect(key="sources").set_value(at.multiselect(key="sources").value[:3])
    _settings(at, 2, 40)
    at.selectbox(key="mixing").set_value("layerwise")
    at.button(key="run_button").click().run()
    assert not at.exception, [e.message for e in at.exception]  # the live view, while it runs
    _wait(at, "ensemble_job")
    at.run()
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    res = at.session_state["ensemble_result"]
    w = np.asarray(res.weights)
    assert res.params["mixing"] == "layerwise" and w.shape == (3, res.stack.shape[1])
    for tab in ("Weights", "Objective", "H-scores", "Conflicts", "Tuning", "Export"):
        at.session_state["result_tab"] = tab
        at.run()
        assert not at.exception, (tab, [e.message for e in at.exception])
    from dashboard.views.export import weights_csv

    lines = weights_csv(res.names, res.weights, res.source_hscores).splitlines()
    depth = w.shape[1]
    assert lines[0] == "source," + ",".join(f"weight_block{b}" for b in range(depth)) + ",hscore"  # a column per block
    assert len(lines) == 4 and all(len(line.split(",")) == 2 + depth for line in lines[1:])
    assert float(lines[1].split(",")[1]) == pytest.approx(w[0, 0])
    assert weights_csv(["a", "b"], [0.25, 0.75], [1.5, 2.0]).splitlines() == ["source,weight,hscore", "a,0.25,1.5",
                                                                            "b,0.75,2.0"]


def test_the_live_view_draws_layerwise_and_box_weights():
    from streamlit.testing.v1 import AppTest

    def page():
        import streamlit as st

        from dashboard.state import BackgroundJob
        from dashboard.views import live

        job = BackgroundJob("ensemble", lambda job: None)
        st.session_state.mixing_running = st.session_state.get("rule", "layerwise")
        job.progress = [{"stage": "step", "step": 1, "steps": 30, "names": ["a", "b"], "weights": w,
                         "objective": 1.5, "hscore": 1.6, "regularizer": 0.1}
                        for w in ([[0.2, 0.4], [1.0, 0.6]],)] \
            if st.session_state.get("rule", "layerwise") == "layerwise" \
            else [{"stage": "step", "step": 1, "steps": 30, "names": ["a", "b"], "weights": [1.0, 0.7],
                   "objective": 1.5, "hscore": 1.6, "regularizer": 0.1}]
        live.view(job)

    at = AppTest.from_function(page).run()
    assert not at.exception, [e.message for e in at.exception]
    bars = [p.proto.text for p in at.get("progress")]
    assert bars == ["a: 0.300", "b: 0.800"]  # a source's mean weight over the blocks
    assert any("mean over the blocks" in m.value for m in at.markdown)
    at.session_state["rule"] = "task_arithmetic"
    at.run()
    assert [p.proto.text for p in at.get("progress")] == ["a: 1.000", "b: 0.700"]
    assert any("whole change" in m.value for m in at.markdown) and not any("uniform" in m.value for m in at.markdown)


def test_the_lesson_quotes_the_mixing_benchmark_and_judges_only_what_its_intervals_settle(tmp_path):
    from core.io.safe_io import atomic_write_json
    from dashboard.views import lesson

    def bench_file(intervals):
        regimes = {r: {"better_single": "shapes_yhalf", "minus_singles": {"sum(shapes_xpos,shapes_yhalf)": {
            "shapes_yhalf": {"mean_diff": (lo + hi) / 2, "ci95": [lo, hi]}}}} for r, (lo, hi) in intervals.items()}
        path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.json"
        atomic_write_json(str(path), {"known_answer": {"seeds": [0, 1, 2], "regimes": regimes}})
        return str(path)

    both = lesson.tuned_verdict(bench_file({"40": (0.008, 0.033), "all": (0.007, 0.014)}))
    assert "+2.1 points [+0.8, +3.3] with 40 train images" in both and "with all 800 train images" in both
    assert "costs accuracy" in both
    assert "was right" in lesson.tuned_verdict(bench_file({"40": (-0.03, -0.01)}))
    assert "do not settle" in lesson.tuned_verdict(bench_file({"40": (-0.01, 0.02), "all": (0.01, 0.02)}))
    assert lesson.tuned_verdict(str(tmp_path / "absent.json")) == "The Tuning tab measures it (docs: Method notes)."
    assert "costs accuracy" in lesson.tuned_verdict()  # the shipped benchmark file: both intervals above 0


def test_a_vpt_checkpoint_upload_is_imported_and_refusals_name_the_users_file(app, tmp_path):
    """A .pth in VPT's layout goes through the importer; a checkpoint that carries code, and a pickle renamed
    .safetensors, are refused with the user's own file name, never the server's folder or the upload's stem."""
    import pickle

    from core import PromptBank

    mnist = PromptBank.load(assets.PROMPTS_DIR)["mnist"]
    vpt = tmp_path / "my_vpt.pth"
    torch.save({"model": {"enc.transformer.prompt_embeddings": (mnist.prompt * 0.5)[None]}}, vpt)
    at = _upload_prompt(app.run(), [("my_vpt.pth", vpt.read_bytes(), "application/octet-stream")])
    assert not at.error, _errors(at)
    assert "my_vpt" in at.multiselect(key="sources").options and "my_vpt" in at.multiselect(key="sources").value

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'code_ran'}",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": {"prompt_embeddings": mnist.prompt[None]}, "cfg": RunsCode()}, evil)
    _upload_prompt(at, [("evil.pth", evil.read_bytes(), "application/octet-stream")])
    err = _errors(at)
    assert "'evil.pth' holds Python objects besides tensors" in err and "nothing in it was run" in err
    assert not (tmp_path / "code_ran").exists()
    _upload_prompt(at, [("renamed.safetensors", pickle.dumps({"prompt": [1, 2]}), "application/octet-stream"),
                        ("renamed.json", b"{}", "application/json")])
    err = _errors(at)
    assert "'renamed.safetensors' is a pickle" in err
    for leak in ("upload_", str(tmp_path), "runs/dashboard"):
        assert leak not in err


# =================================================================== bad input, third pass (issue 36)
SID = "0123456789ab"


def _session_file(tmp_path, name, content):
    """Write ``content`` (text, or None for a folder) as the session SID's ``data/NAME``: what a reload then reads."""
    path = tmp_path / "runs" / SID / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    return path


def _reload(sid=SID):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["sid"] = sid
    return at.run()


def _notes(at):
    return " | ".join(w.value for w in at.sidebar.warning)


def _default(name):
    from core import HGPromptEnsemble
    from core.options import options

    return options(HGPromptEnsemble)[name].default


@pytest.mark.parametrize("key,value,shown", [
    ("projector", "yes", lambda at: at.toggle(key="projector").value is False),
    ("n_samples__auto", "no", lambda at: at.toggle(key="n_samples__auto").value is True),
    ("target", ["shapes_quad"], lambda at: at.selectbox(key="target").value == assets.default_target()),
    ("target", {"shapes_quad": 1}, lambda at: at.selectbox(key="target").value == assets.default_target()),
    ("sources", ["shapes_xpos"] * 40,
     lambda at: len(at.multiselect(key="sources").value) == len(assets.shipped_tasks("source"))),
    ("seed", 3.5, lambda at: at.number_input(key="seed").value == 0),
    ("steps", 10**9, lambda at: at.slider(key="steps").value != 10**9),
    ("lam", "high", lambda at: at.number_input(key="lam").value == _default("lam")),
    ("bank_kind", 5, lambda at: at.radio(key="bank_kind").value == "shallow"),
])
def test_a_remembered_setting_that_does_not_fit_is_dropped_with_a_note(app, tmp_path, key, value, shown):
    _session_file(tmp_path, "settings.json", json.dumps({key: value}))
    at = _reload()
    assert not at.exception, [e.message for e in at.exception]
    assert f"The remembered setting {key} = {value!r}"[:60] in _notes(at) and "dropped" in _notes(at)
    assert shown(at)  # the widget shows its default, not the value that did not fit
    assert at.button(key="run_button")


def test_a_remembered_lesson_step_out_of_range_is_dropped(app, tmp_path):
    _session_file(tmp_path, "settings.json", json.dumps({"lesson_step": 99}))
    at = _reload()
    at.switch_page("app_pages/lesson.py").run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.header[0].value == "What a prompt is" and "lesson_step = 99" in _notes(at)


@pytest.mark.parametrize("name,content,said", [
    ("settings.json", None, "saved settings could not be read"),  # a folder where the file goes
    ("settings.json", "[1, 2]", "saved settings could not be read"),
    ("settings.json", "[" * 100_000 + "]" * 100_000, "nests arrays or objects 100000 deep"),
    ("targets.json", "[\"shapes_quad\"]", "added targets could not be read back"),
    ("targets.json", json.dumps({"mine": ["a"]}), "added targets could not be read back"),
    ("targets.json", json.dumps({"outside": "/etc"}), "target 'outside' is left out"),
])
def test_a_session_file_that_cannot_be_read_leaves_the_page_working(app, tmp_path, name, content, said):
    _session_file(tmp_path, name, content)
    at = _reload()
    assert not at.exception, [e.message for e in at.exception]
    assert said in _notes(at) and str(tmp_path) not in _notes(at)  # the file, never the server's folder
    at.selectbox(key="regularizer").set_value("conflict").run()  # a change is saved, or said not to be
    assert not at.exception, [e.message for e in at.exception]
    if content is None:
        assert "not saved for a reload" in _notes(at)
    assert at.button(key="run_button") and "/etc" not in at.selectbox(key="target").options


@pytest.mark.parametrize("code,why", [(28, "the disk is full"), (30, "the disk is read-only")])
def test_the_app_opens_on_a_full_or_read_only_disk_and_says_runs_cannot_be_saved(app, tmp_path, monkeypatch, code, why):
    import tempfile

    root = str(tmp_path / "runs")
    real_makedirs, real_mkstemp = os.makedirs, tempfile.mkstemp

    def refuse(path):
        if os.path.abspath(str(path)).startswith(root):
            raise OSError(code, os.strerror(code), str(path))

    def makedirs(path, *a, **k):
        refuse(path)
        return real_makedirs(path, *a, **k)

    def mkstemp(*a, dir=None, **k):
        refuse(dir or "")
        return real_mkstemp(*a, dir=dir, **k)

    monkeypatch.setattr(os, "makedirs", makedirs)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    at = app.run()
    assert not at.exception, [e.message for e in at.exception]
    errors = " ".join(e.value for e in at.sidebar.error)
    assert f"Runs cannot be saved on this server: {why} ({os.strerror(code)})" in errors and root not in errors
    assert any("runs cannot be saved" in w.value for w in at.warning)
    assert "run_button" not in [b.key for b in at.button]  # Run is off, and the page says why
    at.selectbox(key="regularizer").set_value("conflict").run()  # remembering a setting cannot be saved either
    assert not at.exception and "not saved for a reload" in _notes(at)
    for page in ("app_pages/compare.py", "app_pages/data.py", "app_pages/lesson.py"):
        at.switch_page(page).run()
        assert not at.exception, (page, [e.message for e in at.exception])


def test_a_refused_upload_leaves_nothing_and_a_reload_never_uses_it(app, tmp_path):
    """A prompt named like a shipped one (values 3.0), one of another backbone and one with bad metadata are refused
    and leave no files: after a reload none is offered, and the restored run's sources are the shipped prompts."""
    from core import PromptBank, SourcePrompt

    shipped = PromptBank.load(assets.PROMPTS_DIR)
    at = app.run()
    at.multiselect(key="sources").set_value(["shapes_xpos", "shapes_yhalf"])
    res = _click_run(_settings(at, 2, 40))
    sid = at.session_state["sid"]
    xpos = shipped["shapes_xpos"]
    fake = SourcePrompt("shapes_xpos", torch.full_like(xpos.prompt, 3.0), backbone=xpos.backbone,
                        backbone_fingerprint=xpos.backbone_fingerprint)
    alien = SourcePrompt("alien", xpos.prompt.clone(), backbone="other", backbone_fingerprint="0123456789abcdef")
    for sp, said in ((fake, "already in the list"), (alien, "backbone")):
        sp.save(tmp_path / sp.name)
        _upload_prompt(at, [("p.safetensors", (tmp_path / sp.name / f"{sp.name}.safetensors").read_bytes(),
                             "application/octet-stream"),
                            ("p.json", (tmp_path / sp.name / f"{sp.name}.json").read_bytes(), "application/json")])
        assert said in _errors(at)
    meta = json.loads((tmp_path / "alien" / "alien.json").read_text())
    _upload_prompt(at, [("q.safetensors", (tmp_path / "alien" / "alien.safetensors").read_bytes(),
                         "application/octet-stream"),
                        ("q.json", json.dumps({**meta, "source_accuracy": "high"}).encode(), "application/json")])
    assert "'q.json' is not a prompt's metadata" in _errors(at) and str(tmp_path) not in _errors(at)
    assert not at.exception, [e.message for e in at.exception]
    assert os.listdir(tmp_path / "runs" / sid / "prompts") == []  # refused means gone
    again = _reload(sid)
    assert not again.exception, [e.message for e in again.exception]
    options = again.multiselect(key="sources").options
    assert options.count("shapes_xpos") == 1 and "alien" not in options
    back = again.session_state["ensemble_result"]
    assert back.id == res.id and torch.equal(back.stack[0], xpos.prompt)


def test_a_one_source_runs_plane_and_pair_views_say_they_need_two(app):
    at = app.run()
    at.multiselect(key="sources").set_value(["shapes_xpos"])
    res = _click_run(_settings(at, 2, 40))
    assert res.names == ["shapes_xpos"]
    at.session_state["result_tab"] = "Conflicts"
    at.run()
    for view in ("plane", "pair"):
        at.radio(key="inter_view").set_value(view).run()
        assert not at.exception, (view, [e.message for e in at.exception])
        assert any(f"the {view} view needs two" in i.value for i in at.info)


def test_compare_runs_after_two_identical_runs(app):
    at = _settings(app.run(), 2, 40, seed=5)
    first = _click_run(at)
    second = _click_run(at)  # the same settings: served from the first, as a copy with its own id
    assert second.served_from and second.id != first.id
    at.switch_page("app_pages/compare.py").run()
    assert not at.exception, [e.message for e in at.exception]
    assert sorted(at.dataframe[0].value["id"]) == sorted([first.id, second.id])
    info = json.loads(open(os.path.join(second.run_path, "run.json")).read())
    assert info["id"] == second.id and info["served_from"] == first.id


def test_a_local_path_outside_the_allowed_folders_names_nothing_outside(app, tmp_path):
    at = app.run()
    (tmp_path / "link").symlink_to("/etc")
    for typed in ("/", "/etc/passwd", str(tmp_path / "link")):
        at.text_input(key="target_path").set_value(typed).run()
        at.button(key="add_target").click().run()
        message = _errors(at)
        assert f"a local path must be inside {str(os.path.realpath(tmp_path))!r}" in message and repr(typed) in message
        rest = message.replace(repr(typed), "")
        assert not __import__("re").search(r"/(bin|etc|usr|root)\b", rest), rest  # nothing of the server's folders
    at.text_input(key="target_path").set_value(str(tmp_path) + "/a\x00b").run()  # a NUL byte, pasted
    at.button(key="add_target").click().run()
    assert "without NUL bytes" in _errors(at)
    assert not at.exception, [e.message for e in at.exception]


def test_a_zip_whose_entries_clash_is_named_without_the_servers_folders(app, tmp_path):
    import zipfile

    at = app.run()
    zpath = tmp_path / "clash.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("task/t", b"a file")
        zf.writestr("task/t/x.png", b"x")
    at.file_uploader(key="target_zip").set_value(("clash.zip", zpath.read_bytes(), "application/zip"))
    at.run()
    at.button(key="add_target").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert "'task/t' is both a file and a folder" in _errors(at)
    assert str(tmp_path) not in _errors(at) and ".extract-" not in _errors(at)


def test_the_job_queue_is_first_in_first_out():
    """A job does not take a free slot while one queued before it waits: the queue's head goes first."""
    from dashboard.state import BackgroundJob, waiting

    queue = waiting()
    queue.append("earlier")  # a job queued first, not yet started
    try:
        later = BackgroundJob("ensemble", lambda job: "ran").start()
        time.sleep(1.0)
        assert later.status == "queued" and later.queue_position == 2  # a slot is free, but it is not its turn
    finally:
        queue.remove("earlier")
    _wait_for(lambda: later.finished, "the job did not start once it was first")
    assert later.status == "done" and later.result == "ran" and later.id not in waiting()


def test_a_restored_run_is_drawn_only_with_the_prompts_it_used(tmp_path):
    """A source of the same name that is not the tensor the run used (an upload in a shipped prompt's name) is no
    source of the run: the run is drawn without its prompts, never with the wrong ones."""
    from core import SourcePrompt
    from core.model.toy import toy_bank, toy_model, toy_task
    from dashboard.ensemble_runs import _fit_and_write
    from dashboard.run_result import RunResult
    from dashboard.state import BackgroundJob

    model = toy_model()
    bank, task = toy_bank(model), toy_task()
    res = _fit_and_write(BackgroundJob("ensemble", lambda j: None), model, bank, task, str(tmp_path / "toy.npz"),
                         {"steps": 1, "n_samples": 30}, str(tmp_path / "runs"), None)
    from core import PromptBank

    pool = {p.name: p for p in bank}

    def banks(pool):  # the session's prompts by name, as inputs.bank_for gives them
        return lambda names: PromptBank(pool[n] for n in names) if all(n in pool for n in names) else None

    assert torch.equal(RunResult.from_folder(res.run_path, banks(pool), n_classes=task.num_classes).stack, bank.stack())
    first = pool[bank.names[0]]
    impostor = SourcePrompt(first.name, torch.full_like(first.prompt, 3.0), backbone=first.backbone,
                            backbone_fingerprint=first.backbone_fingerprint)
    restored = RunResult.from_folder(res.run_path, banks({**pool, first.name: impostor}), n_classes=task.num_classes)
    assert restored.stack is None and restored.bank is None


# ------------------------------------------------------------------ issue 35: the dashboard's fourth edition
#: Hang guards for this block (not speed checks): on a 2-core machine shared with a benchmark a small fit can take
#: minutes, and a script run that loads what a run needs as long.
HANG = 1800


@pytest.fixture
def slow_app(app):
    app.default_timeout = HANG
    return app


def _run(at):
    """Click Run, wait (at most the hang guard) for the job, and rerun until its result is on the page."""
    at.button(key="run_button").click().run()
    _wait(at, "ensemble_job", timeout=HANG)
    at.run()
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at.session_state["ensemble_result"]


def _gate_at(monkeypatch, stage: str):
    """Pause every fit the moment it reports ``stage`` ("sources": its gradient pass comes next) until the returned
    event is set: a click during that pass, made deterministic."""
    from dashboard.state import BackgroundJob

    go = threading.Event()
    real = BackgroundJob.report

    def report(self, info):
        real(self, info)
        if info.get("stage") == stage:
            go.wait(HANG)

    monkeypatch.setattr(BackgroundJob, "report", report)
    return go


def test_stop_during_the_source_pass_is_acknowledged_and_keeps_the_best_source(slow_app, monkeypatch):
    from core.io.runs import load_run

    go = _gate_at(monkeypatch, "sources")
    try:
        at = _settings(slow_app.run(), 5, 40, seed=21)
        at.button(key="run_button").click().run()
        job = at.session_state["ensemble_job"]
        _wait_for(lambda: any(p.get("stage") == "sources" for p in job.progress), "the fit never scored its sources",
                  HANG)
        at.run()
        at.button(key=f"stop-{job.id}").click().run()
        assert not at.exception, [e.message for e in at.exception]
        said = [p.proto.text for p in at.get("progress")] + [i.value for i in at.info]
        assert any(s.startswith("Stopping after the current block") for s in said), said  # at once, while it runs
        assert not any(b.key == f"stop-{job.id}" for b in at.button)
    finally:
        go.set()
    _wait(at, "ensemble_job", timeout=HANG)
    at.run()
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    res = at.session_state["ensemble_result"]
    assert res.stopped and res.cosine is None and not any(p.get("stage") == "conflicts" for p in job.progress)
    best = int(np.argmax(res.source_hscores))
    assert res.weights == [float(i == best) for i in range(len(res.names))]
    assert "stopped during the sources' gradient pass" in at.success[0].value
    assert load_run(res.run_path)["metrics"]["stopped"] is True
    for tab in ("Weights", "Objective", "H-scores", "Conflicts", "Export"):  # the partial run, in every tab
        at.session_state["result_tab"] = tab
        at.run()
        assert not at.exception, (tab, [e.message for e in at.exception])
    at.session_state["result_tab"] = "Conflicts"
    at.run()
    assert any("no gradient cosines" in i.value for i in at.info)


def test_the_progress_bar_moves_block_by_block_in_the_gradient_pass(slow_app, monkeypatch):
    from dashboard.state import BackgroundJob
    from dashboard.views import live

    seen = []
    real = BackgroundJob.tick

    def tick(self, info):
        real(self, info)
        stages = [p.get("stage") for p in self.progress]
        if info["pass"] != "embed" and "conflicts" not in stages:  # up to the end of the gradient pass
            seen.append((info["pass"], live.progress(self)))

    monkeypatch.setattr(BackgroundJob, "tick", tick)
    # (a seed of its own: an identical earlier run would be served, not run)
    at = _settings(slow_app.run(), 2, 40, seed=22)
    _run(at)
    fractions = [f for _, (f, _) in seen]
    assert {"forward", "backward"} <= {p for p, _ in seen}
    assert len(set(fractions)) >= 6 and fractions == sorted(fractions)  # it moves with every block, never back
    assert all("gradient" in label and "left" in label for _, (_, label) in seen)


def test_a_queued_run_says_the_wait_of_what_is_ahead_and_can_be_cancelled(slow_app, monkeypatch):
    import dashboard.state as state
    from dashboard.state import BackgroundJob

    monkeypatch.setattr(state, "MAX_CONCURRENT_JOBS", 1)
    gate = threading.Event()
    ahead = BackgroundJob("tune", lambda job: gate.wait(HANG), estimate=660.0).start()  # an 11-minute tuning
    try:
        _wait_for(lambda: ahead.status == "running", "the tuning never started", HANG)
        at = _settings(slow_app.run(), 2, 40, seed=23)
        at.button(key="run_button").click().run()
        job = at.session_state["ensemble_job"]
        _wait_for(lambda: job.queue_position == 1, "the run was never queued", HANG)
        at.run()
        info = " ".join(i.value for i in at.info)
        assert "Place in the queue: 1" in info and "to wait" in info and "tune, about 1" in info, info
        assert "15 s" not in info
        wait, _ = job.wait_ahead()
        assert wait > 600  # the tuning's time left, not "a default run takes about 15 s"
        at.button(key=f"cancel-{job.id}").click().run()
        _wait(at, "ensemble_job", timeout=HANG)
        at.run()  # the job's view sees it ended, and the page says so once
        assert not at.exception, [e.message for e in at.exception]
        assert any("Cancelled while queued" in i.value for i in at.info) and "ensemble_result" not in at.session_state
    finally:
        gate.set()


def test_every_long_job_is_priced_on_this_machine_before_its_click(slow_app):
    from dashboard.progress import TIMING, price
    from dashboard.state import backbone, shipped_bank

    at = slow_app.run()  # the page starts timing a slice in the background, and says so rather than wait for it
    assert any(c.value in (TIMING,) or "up to the first step" in c.value for c in at.caption)
    price(backbone(), shipped_bank().stack()[0])  # (timed: every estimate below is a number)
    at = _settings(at, 2, 40, seed=24)
    assert any("up to the first step" in c.value and "on this machine" in c.value for c in at.caption)
    _run(at)
    at.session_state["result_tab"] = "Conflicts"
    at.run()
    captions = lambda: " ".join(c.value for c in at.caption)
    assert "on this machine" in captions() and "30-45 s" not in captions()
    for view, button in (("simplex", "simplex_button"), ("plane", "plane_button")):
        at.radio(key="inter_view").set_value(view).run()
        assert not at.exception, [e.message for e in at.exception]
        assert at.button(key=button) and "on this machine" in captions() and "about 30 s" not in captions()
    at.switch_page("app_pages/lesson.py").run()
    for step in (3, 4, 5):  # learn the weights, interference, when mixing helps
        at.session_state["lesson_step"] = step
        at.run()
        assert not at.exception, [e.message for e in at.exception]
        text = captions() + " ".join(b.proto.help for b in at.button)
        assert "on this machine" in text and "30-45 s" not in text and "about a minute" not in text, (step, text)


def test_projector_mode_enlarges_the_pages_text_and_hides_the_chart_toolbar(slow_app):
    at = slow_app.run()
    at.switch_page("app_pages/lesson.py").run()
    at.session_state["lesson_step"] = 2  # why averaging can hurt: the segment's zoomed axis is said
    at.run()
    spec = [json.loads(el.proto.spec) for el in at.get("plotly_chart") if "H-score from" in el.proto.spec][0]
    assert "zoomed axis" in spec["layout"]["title"]["text"]
    at.toggle(key="projector").set_value(True).run()
    assert not at.exception, [e.message for e in at.exception]
    styles = [h.proto.body for h in at.get("html")]
    assert any("font-size: 1.3rem" in s for s in styles)  # the body text, not only the charts
    configs = [json.loads(el.proto.config) for el in at.get("plotly_chart")]
    assert configs and all(c.get("displayModeBar") is False for c in configs)
    at.toggle(key="projector").set_value(False).run()
    assert not [h for h in at.get("html") if "1.3rem" in h.proto.body]


def test_the_exported_ensemble_prompt_uploads_back_and_the_config_names_the_targets_data(slow_app, tmp_path):
    from dashboard.views.export import config_json, prompt_files

    at = _settings(slow_app.run(), 2, 40, seed=25)
    res = _run(at)
    at.session_state["result_tab"] = "Export"
    at.run()
    labels = [b.proto.label for b in at.get("download_button")]
    assert "Ensembled prompt's metadata (JSON)" in labels
    assert res.record.n_steps > 0 or "Figure: trajectory (HTML)" not in labels  # no empty trajectory
    config = json.loads(config_json(res))
    assert config["target_path"] == os.path.realpath(res.target_path) and "shipped" in config["target_data"]
    name, tensor, meta = prompt_files(res)
    _upload_prompt(at, [(f"{name}.safetensors", tensor, "application/octet-stream"),
                        (f"{name}.json", meta, "application/json")])
    assert not at.error, [e.value for e in at.error]
    assert any(f"added prompt '{name}'" in s.value for s in at.success) and name in at.multiselect(key="sources").value
    at.session_state["result_tab"] = "Tuning"
    at.run()
    assert not any(c.multiselect for c in at.columns)  # the methods' chips get the page's width, not a column's
    at.multiselect(key="tune_methods").set_value(["hgprompt"]).run()
    assert any("plus 1 weight fit of about" in i.value for i in at.info)


def test_the_data_pages_count_table_has_the_room_for_every_split(slow_app):
    from dashboard.views.data import COLUMNS

    at = slow_app.run()
    at.switch_page("app_pages/data.py").run()
    assert COLUMNS[1] / sum(COLUMNS) >= 1 / 3  # a quarter of the page hid the test column at 1280 px
    table = next(c for c in at.columns if len(c.dataframe))
    assert table.weight == pytest.approx(COLUMNS[1] / sum(COLUMNS))
    assert list(table.dataframe[0].value.columns) == ["class", "train", "val", "test"]


def test_a_task_arithmetic_run_says_the_regulariser_keeps_one_source_and_lambda_0_mixes(slow_app):
    from dashboard.views.weights import selection_note

    at = slow_app.run()
    at.selectbox(key="mixing").set_value("task_arithmetic").run()
    assert any("Set lambda to 0" in c.value for c in at.caption)
    at.number_input(key="lam").set_value(0.0).run()
    assert not any("Set lambda to 0" in c.value for c in at.caption)
    note = selection_note(["a", "b"], [1.0, 0.0], "task_arithmetic", 1.0)
    assert "regulariser" in note and "lambda 0" in note
    assert "lambda 0" not in selection_note(["a", "b"], [1.0, 0.0], "task_arithmetic", 0.0)


def test_the_tuning_table_is_in_points_and_the_chart_in_its_order():
    from dashboard import charts
    from dashboard.views.tuning import ACC, DIFF, _summary

    rows = [{"method": m, "seed": s, "test_acc": a} for s, (h, r) in enumerate([(0.764, 0.666), (0.80, 0.70)])
            for m, a in (("hgprompt", h), ("random", r))]  # the rows come hgprompt first; the table is by method
    table = _summary({"results": rows})
    order = [r["method"] for r in table]
    assert order == ["random", "hgprompt"]
    assert list(charts.accuracy_bars(rows, order=order).data[0].x) == order  # (the rows' own order was the reverse)
    by = {r["method"]: r for r in table}
    assert by["hgprompt"][ACC] == pytest.approx(78.2) and by["random"][DIFF] == "+9.9 pp"
    assert by["random"]["95 % interval"].endswith("pp")


def test_the_matrices_and_sentences_of_one_layer_and_a_layerwise_simplex():
    from types import SimpleNamespace

    from dashboard.views.interference import below_sentence
    from dashboard.views.simplex import off_simplex

    names = ["a", "b", "c"]
    centred = np.array([[1.0, -0.46, 0.1], [-0.46, 1.0, 0.2], [0.1, 0.2, 1.0]])
    r = SimpleNamespace(names=names, mixing_loss=-np.ones((3, 3)), below_null=lambda v: np.zeros((3, 3), bool),
                        layer_cosine={"centred": np.stack([np.eye(3), np.eye(3), centred])},
                        layer_null_band={"centred": np.array([[-0.3, 0.3]] * 3)})
    assert "below every random pair's: 0" in below_sentence(r, "all")
    assert "at layer 2 is below every random pair's: 1" in below_sentence(r, 2)  # the outlined pair, counted
    assert "layer-wise" in off_simplex("layerwise") and "task arithmetic" not in off_simplex("layerwise")
    assert "task arithmetic" in off_simplex("task_arithmetic")


def test_views_receive_the_runs_inputs_and_the_bank_is_built_once_per_rerun(slow_app, monkeypatch):
    import ast
    import glob

    import dashboard.views.inputs as inputs

    for path in glob.glob(os.path.join(os.path.dirname(APP), "views", "*.py")):
        if os.path.basename(path) in ("inputs.py", "ensemble.py"):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [a.name for a in node.names]
                assert node.module != "dashboard.views.inputs" and "inputs" not in names, path
    calls = []
    real = inputs.bank_for
    monkeypatch.setattr(inputs, "bank_for", lambda names: calls.append(1) or real(names))
    at = slow_app.run()
    calls.clear()
    at.run()
    assert len(calls) == 1, f"bank_for built {len(calls)} times in one rerun"
    res = _run(_settings(at, 2, 40, seed=26))
    assert res.bank is not None and res.bank.start is not None  # the plane's task vectors come with the run


# ------------------------------------------------------------------ issue 32: does tuning agree with the objective?
def test_the_agreement_sentence_names_both_short_tunes_and_which_start_to_tune():
    from types import SimpleNamespace

    from core.evaluation.decision import Decision
    from dashboard.views.weights import agreement, mixes

    res = SimpleNamespace(names=["a", "b", "c"], source_hscores=[1.0, 2.0, 0.5])
    agree = agreement(res, Decision("the learned mixture", {"b": 0.70, "the learned mixture": 0.75}))
    assert "**agree**" in agree and "75.0 %" in agree and "**b** alone 70.0 %" in agree and "after 1 epoch the" in agree
    disagree = agreement(res, Decision("b", {"b": 0.75, "the learned mixture": 0.75}))
    assert "**disagree**" in disagree and "tune from **b**" in disagree
    assert mixes(["a", "b"], [1.0, 0.5]) and not mixes(["a", "b"], [1.0, 0.0])


@pytest.mark.slow
def test_a_mixture_run_checks_with_short_tunes_whether_tuning_agrees(slow_app):
    """Task arithmetic at lambda 0 mixes shapes_xpos and shapes_yhalf on shapes_quad; the Weights tab offers the
    short-tune check, runs it as a job and says whether the short tunes agree, with both validation accuracies."""
    at = _settings(slow_app.run(), 3, 64, seed=31)
    at.selectbox(key="mixing").set_value("task_arithmetic").run()
    at.number_input(key="lam").set_value(0.0).run()
    res = _run(at)
    from dashboard.views.weights import mixes

    assert mixes(res.names, res.weights)
    assert any("Does tuning agree with the objective?" in m.value for m in at.markdown)
    at.button(key="check_button").click().run()
    from dashboard.state import digest

    job = at.session_state[f"check_{digest(res.id)}_job"]
    _wait_for(lambda: job.finished, "the short tunes never finished", HANG)
    at.run()
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    said = " ".join(m.value for m in list(at.success) + list(at.warning))
    from dashboard.views.weights import EPOCHS

    assert ("**agree**" in said or "**disagree**" in said) and f"after {EPOCHS} the mixture reaches" in said
    assert job.result.val_acc.keys() >= {"the learned mixture"}


def test_the_lessons_last_step_names_where_the_learned_mixture_won_and_where_it_lost(tmp_path):
    import json

    from dashboard.views.lesson import LEARNED, elsewhere_verdict

    def acc(x):
        return {"mean": x, "std": 0.0, "n": 2}

    pooled = {"mean_diff": -0.004, "ci95": [-0.012, 0.003], "wins": 1, "ties": 1, "losses": 2, "n": 4}
    rule = {"mean_diff": 0.001, "ci95": [0.0, 0.003], "wins": 1, "ties": 3, "losses": 0, "n": 4}
    data = {"targets": ["won", "lost", "level"], "seeds": [0, 1], "compositions": {"won": {}, "lost": {}},
            "table": {"best_hscore": {"won": acc(0.80), "lost": acc(0.90), "level": acc(0.70)},
                      LEARNED: {"won": acc(0.82), "lost": acc(0.87), "level": acc(0.70)}},
            "against_selection": {LEARNED: {"best_hscore": pooled}},
            "rules": {"short tune, 1 epochs": {"minus_best_hscore": rule}}}
    path = tmp_path / "decision.json"
    path.write_text(json.dumps(data))
    said = elsewhere_verdict(str(path))
    assert "ahead on won +2.0" in said and "behind on lost -3.0" in said and "2 of them compositions" in said
    assert "Pooled: -0.40 points [-1.20, +0.30]" in said and "+0.10 points [+0.00, +0.30]" in said
    assert "can lose after tuning" in elsewhere_verdict(str(tmp_path / "absent.json"))
