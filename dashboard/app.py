"""HGPrompt dashboard: ``streamlit run dashboard/app.py``."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import streamlit as st  # noqa: E402

from dashboard.state import session_id  # noqa: E402

st.set_page_config(page_title="HGPrompt", layout="wide")
session_id()  # puts the session in the URL at once, so a reload of any page keeps its runs
nav = st.navigation([
    st.Page("app_pages/ensemble.py", title="Ensemble", icon=":material/hub:", default=True),
    st.Page("app_pages/compare.py", title="Compare runs", icon=":material/compare:"),
    st.Page("app_pages/data.py", title="Data", icon=":material/photo_library:"),
    st.Page("app_pages/lesson.py", title="Lesson", icon=":material/cast_for_education:"),
    st.Page("app_pages/about.py", title="How it works", icon=":material/school:"),
    st.Page("app_pages/docs.py", title="Method notes", icon=":material/description:"),
])
nav.run()
