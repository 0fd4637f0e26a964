"""HGPrompt dashboard: ``streamlit run dashboard/app.py``."""
from __future__ import annotations

import streamlit as st

from dashboard.settings import persistent, show_notes
from dashboard.state import session_id, storage_problem
from dashboard.ui import projector_style
from dashboard.views import workspace

st.set_page_config(page_title="HGPrompt", layout="wide")
session_id()  # puts the session in the URL at once, so a reload of any page keeps its runs
if storage_problem():  # a full or read-only disk: the app opens and says why nothing can be saved
    st.sidebar.error(storage_problem())
with st.sidebar:  # on every page, so it holds on every page (the lesson's charts too)
    persistent("projector", lambda **kw: st.toggle("Projector mode", help="Larger chart text and stronger contrast, "
                                                   "for a class.", **kw), value=False)
projector_style()  # the page's text enlarged too, not only the charts
workspace.sidebar()  # the Model section: which backbone, bank and targets every page (but the lesson) runs on
nav = st.navigation([
    st.Page("app_pages/ensemble.py", title="Ensemble", icon=":material/hub:", default=True),
    st.Page("app_pages/compare.py", title="Compare runs", icon=":material/compare:"),
    st.Page("app_pages/study.py", title="Study", icon=":material/table_chart:"),
    st.Page("app_pages/data.py", title="Data", icon=":material/photo_library:"),
    st.Page("app_pages/lesson.py", title="Lesson", icon=":material/cast_for_education:"),
    st.Page("app_pages/about.py", title="How it works", icon=":material/school:"),
    st.Page("app_pages/docs.py", title="Method notes", icon=":material/description:"),
])
nav.run()
show_notes()  # remembered settings that were dropped, or could not be saved: said, never a crash
