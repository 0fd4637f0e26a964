"""HGPrompt dashboard: ``streamlit run dashboard/app.py``."""
from __future__ import annotations

import streamlit as st

from dashboard.settings import persistent
from dashboard.state import session_id
from dashboard.ui import projector_style

st.set_page_config(page_title="HGPrompt", layout="wide")
session_id()  # puts the session in the URL at once, so a reload of any page keeps its runs
with st.sidebar:  # on every page, so it holds on every page (the lesson's charts too)
    persistent("projector", lambda **kw: st.toggle("Projector mode", help="Larger chart text and stronger contrast, "
                                                   "for a class.", **kw), value=False)
projector_style()  # the page's text enlarged too, not only the charts
nav = st.navigation([
    st.Page("app_pages/ensemble.py", title="Ensemble", icon=":material/hub:", default=True),
    st.Page("app_pages/compare.py", title="Compare runs", icon=":material/compare:"),
    st.Page("app_pages/data.py", title="Data", icon=":material/photo_library:"),
    st.Page("app_pages/lesson.py", title="Lesson", icon=":material/cast_for_education:"),
    st.Page("app_pages/about.py", title="How it works", icon=":material/school:"),
    st.Page("app_pages/docs.py", title="Method notes", icon=":material/description:"),
])
nav.run()
