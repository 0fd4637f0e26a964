"""The Ensemble page: pick sources and a target, run the weight learning with live progress, study the result."""
from __future__ import annotations

import streamlit as st

from core import UserInputError
from dashboard import ensemble_runs
from dashboard.state import MAX_SOURCES, backbone, current_workspace, load_task, runs_dir, storage_problem
from dashboard.ui import job_view, note
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
    if storage_problem():  # said in the sidebar in full
        problems.append("free the runs folder's disk (runs cannot be saved on this server)")
    return problems


def page() -> None:
    st.title("HGPrompt: learn a prompt ensemble")
    st.write("Pick source prompts and a target task, then learn one weight per source by maximising the target's "
             "H-score minus a regulariser on the sources' gradients. Defaults run in one click; the Conflicts tab "
             "measures where mixing two prompts loses transferability.")
    try:
        ws = current_workspace()
        model = backbone(ws)
    except UserInputError as exc:
        st.error(str(exc))
        return
    if not ws.is_default:
        st.caption(f"Workspace: {ws.describe()} (fingerprint {model.fingerprint}); change it in the sidebar's Model "
                   "section.")
    if getattr(st.session_state.get(RESULT), "backbone_fingerprint", None) not in (None, model.fingerprint):
        st.session_state.pop(RESULT)  # a run of another workspace's backbone (the lesson's, say) is not shown here:
        st.session_state.pop("restore_tried", None)  # this backbone's newest run comes back from the folder instead
    sources, bank, target, target_path, params = inputs.sidebar(model)
    running = JOB in st.session_state
    problems = _problems(sources, target_path)
    if problems:
        st.warning("To run: " + "; ".join(problems) + ".")
    else:
        if not running:
            try:
                st.caption(ensemble_runs.fit_estimate(model, bank, load_task(target_path), params))
            except UserInputError:  # a target that cannot be read: Run says why
                pass
        if st.button("Run ensemble learning", type="primary", disabled=running, key="run_button"):
            try:
                running = ensemble_runs.start_or_serve(model, bank, target_path, params, runs_dir(), JOB, RESULT)
            except UserInputError as exc:
                st.error(str(exc))
    note(RESULT)
    if running:
        job_view(JOB, RESULT, live.progress, live.view)
    if RESULT not in st.session_state and not running and not st.session_state.get("restore_tried"):
        # A reload (same URL): the session's newest run comes back from its folder.
        st.session_state.restore_tried = True
        restored = ensemble_runs.latest_result(runs_dir(), inputs.bank_for, model.fingerprint)
        if restored is not None:
            st.session_state[RESULT] = restored
    res = st.session_state.get(RESULT)
    if res is not None and not running:
        results.view(res, model)
