"""The H-scores tab: each source alone on the target, against the ensemble."""
from __future__ import annotations

import streamlit as st

from dashboard.ui import chart

EXPLAIN = ("The H-score of the target's features under each source prompt alone. Higher means the classes of the "
           "target are easier to tell apart under that prompt. The red line is the learned ensemble's H-score.")


def view(res: dict, figs: dict) -> None:
    st.caption(EXPLAIN)
    chart(st, figs["hscores"], key="hscore_chart")
