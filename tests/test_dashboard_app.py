"""AppTest: every page renders, and a full small run driven through the widgets shows its results."""
import json
import os
import time

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
    return AppTest.from_file(APP, default_timeout=120)


def _charts(at):
    out = []
    for el in at.get("plotly_chart"):
        spec = json.loads(el.proto.spec)
        title = spec.get("layout", {}).get("title", {})
        out.append(title.get("text") if isinstance(title, dict) else title)
    return out


@pytest.mark.parametrize("page", ["app_pages/ensemble.py", "app_pages/compare.py", "app_pages/about.py"])
def test_every_page_renders(app, page):
    at = app.run()
    if page != "app_pages/ensemble.py":
        at.switch_page(page).run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.title


def _wait(at, key, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        job = at.session_state[key] if key in at.session_state else None
        if job is None or job.finished:
            return
        time.sleep(0.5)
    raise AssertionError("the job did not finish")


def test_full_small_run_through_widgets(app):
    at = app.run()
    at.slider(key="steps").set_value(3)
    at.slider(key="n_samples").set_value(40)
    at.button(key="apply").click().run()
    at.button(key="run_button").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert "ensemble_job" in at.session_state
    _wait(at, "ensemble_job")
    at.run()
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    res = at.session_state["ensemble_result"]
    assert abs(sum(res["weights"]) - 1) < 1e-6 and len(res["history"]) == 4
    titles = _charts(at)
    assert "Ensemble weights" in titles
    assert not any(t and "PCA maps" in t for t in titles), "the maps are drawn only when their tab is opened"
    at.session_state["result_tab"] = "Conflicts"
    at.run()
    assert "Gradient cosine between sources" in _charts(at)
    at.session_state["result_tab"] = "Feature maps"
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert any(t and "PCA maps" in t for t in _charts(at))
    at.session_state["result_tab"] = "Export"
    at.run()
    labels = [b.proto.label for b in at.get("download_button")]
    assert "Figure: maps (HTML)" in labels and "Ensembled prompt (safetensors)" in labels
    # The run was written as a complete run folder and shows up on the compare page.
    at.switch_page("app_pages/compare.py").run()
    assert not at.exception
    assert at.dataframe and len(at.dataframe[0].value) == 1


def test_stop_button_stops_and_keeps_the_partial_run(app):
    from core.runs import load_run

    at = app.run()
    at.slider(key="steps").set_value(200)
    at.slider(key="n_samples").set_value(40)
    at.button(key="apply").click().run()
    at.button(key="run_button").click().run()
    job = at.session_state["ensemble_job"]
    t0 = time.time()
    while len([p for p in job.progress if p.get("stage") == "step"]) < 3:
        assert time.time() - t0 < 120 and not job.finished, "the run did not start stepping"
        time.sleep(0.2)
    at.run()
    at.button(key=f"stop-{job.id}").click().run()
    _wait(at, "ensemble_job", timeout=60)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    res = at.session_state["ensemble_result"]
    assert res["stopped"] and 3 <= len(res["history"]) < 100
    assert "stopped early" in at.success[0].value
    saved = load_run(res["run_path"])  # complete on disk: what was computed before Stop is kept
    assert saved["metrics"]["stopped"] is True
    assert len(saved["history"]) == len(res["history"])


def test_concurrent_sessions_get_their_own_runs_and_never_touch_the_backbone(tmp_path, monkeypatch):
    """Three browser sessions start runs at once: one runs, the others say they are queued; each gets its own result."""
    import threading

    from streamlit.testing.v1 import AppTest

    import dashboard.state as state
    import dashboard.views.ensemble as view
    from core.runs import list_runs

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
        at = AppTest.from_file(APP, default_timeout=120).run()
        at.slider(key="steps").set_value(3)
        at.slider(key="n_samples").set_value(40)
        at.number_input(key="seed").set_value(seed)
        at.button(key="apply").click().run()
        sessions.append(at)
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
    assert [r["params"]["seed"] for r in results] == [11, 12, 13]
    dirs = {os.path.dirname(os.path.dirname(r["run_path"])) for r in results}
    assert len(dirs) == 3, "two sessions shared a run folder"
    for r in results:
        runs = list_runs(os.path.dirname(r["run_path"]))
        assert [x["id"] for x in runs] == [r["id"]], "a session sees another session's run"
    intervals.sort()
    assert all(a[1] <= b[0] for a, b in zip(intervals, intervals[1:])), "heavy jobs overlapped"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a session modified the shared backbone"
    assert not any(p.requires_grad for p in model.parameters())
