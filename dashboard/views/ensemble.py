"""The Ensemble page: pick sources and a target, run the weight learning with live progress, study the result."""
from __future__ import annotations

import os

import streamlit as st

from core import UserInputError
from dashboard import runs
from dashboard.state import MAX_SOURCES, Job, backbone, finished_runs, load_task, runs_dir
from dashboard.ui import job_view
from dashboard.views import inputs, live, results

JOB, RESULT = "ensemble_job", "ensemble_result"


def _problems(sources: list[str], target_path: str | None) -> list[str]:
    problems = []
    if len(sources) < 1:
        problems.append("pick at least one source prompt")
    if len(sources) > MAX_SOURCES:
        problems.append(f"pick at most {MAX_SOURCES} sources")
    if target_path is None:
        problems.append("pick a target task")
    return problems


def _start(model, sources: list[str], target_path: str, params: dict) -> bool:
    """Start a run (or serve an identical finished one from the server's cache); True when a job was started."""
    task = load_task(target_path)
    bank = inputs.bank_for(sources)
    folder = runs_dir()
    st.session_state.lam_running = params["lam"]
    key = runs.run_key(model, bank, target_path, params)
    done = finished_runs().get(key)
    st.session_state.pop(RESULT, None)
    if done is not None and os.path.isdir(done["run_path"]):  # a copy of it, in this session's own folder
        st.session_state[RESULT] = runs.copy_run(done, folder)
        return False
    st.session_state[JOB] = Job("ensemble", lambda job: runs.run_ensemble(job, model, bank, task, target_path, params,
                                                                        folder, key)).start()
    return True


def page() -> None:
    st.title("HGPrompt: learn a prompt ensemble")
    st.write("Pick source prompts and a target task, then learn one weight per source by maximising the target's "
             "H-score minus a regulariser on the sources' gradients. Defaults run in one click; the Conflicts tab "
             "measures where mixing two prompts loses transferability.")
    try:
        model = backbone()
    except UserInputError as exc:
        st.error(str(exc))
        return
    sources, target, target_path, params = inputs.sidebar(model)
    running = JOB in st.session_state
    problems = _problems(sources, target_path)
    if problems:
        st.warning("To run: " + "; ".join(problems) + ".")
    elif st.button("Run ensemble learning", type="primary", disabled=running, key="run_button"):
        try:
            running = _start(model, sources, target_path, params)
        except UserInputError as exc:
            st.error(str(exc))
    if running:
        job_view(JOB, RESULT, live.progress, live.view)
    if RESULT not in st.session_state and not running and not st.session_state.get("restore_tried"):
        # A reload (same URL): the session's newest run comes back from its folder.
        st.session_state.restore_tried = True
        restored = runs.latest_result(runs_dir(), inputs.prompt_pool())
        if restored is not None:
            st.session_state[RESULT] = restored
    res = st.session_state.get(RESULT)
    if res is not None and not running:
        results.view(res, model)
