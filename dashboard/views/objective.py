"""The Objective tab: J, H and R over the fit's steps."""
from __future__ import annotations

import streamlit as st

from dashboard.run_result import RunResult
from dashboard.ui import chart

EXPLAIN = ("HGPrompt maximises J = H - lambda R. H (dashed) is the H-score of the target features under the weighted "
           "prompt: how well the classes separate, relative to the total spread. R (lower panel) is the regulariser: "
           "zero at a single source, positive for a mixture the regulariser penalises.")


def view(res: RunResult, figs: dict) -> None:
    st.caption(EXPLAIN)
    chart(st, figs["objective"], key="objective_chart")
