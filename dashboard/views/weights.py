"""The Weights tab: the learned weights and how they moved."""
from __future__ import annotations

import streamlit as st

from dashboard.run_result import RunResult
from dashboard.ui import chart

EXPLAIN = ("Each source prompt gets one weight; the weights sum to 1. The target prompt starts as the weighted sum of "
           "the source prompts. Bars above the dotted *uniform* line are sources HGPrompt trusts more than naive "
           "averaging would; the trajectory shows how the weights moved during optimisation.")


def view(res: RunResult, figs: dict) -> None:
    st.caption(EXPLAIN)
    c1, c2 = st.columns(2)
    chart(c1, figs["weights"], key="weights_chart")
    if len(res.history) > 1:
        chart(c2, figs["trajectory"], key="trajectory_chart")
    else:
        c2.info(f"No steps: the fit started at its best candidate ({res.start}), and no direction from it raises "
                "the objective, so it ended there. Choose *Start from: uniform* in the sidebar to watch a whole "
                "trajectory.")
