"""HGPrompt dashboard: ``streamlit run dashboard/app.py``."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import streamlit as st  # noqa: E402

from dashboard.views import about, compare, ensemble  # noqa: E402

st.set_page_config(page_title="HGPrompt", layout="wide")
nav = st.navigation([
    st.Page(ensemble.page, title="Ensemble", icon=":material/hub:", url_path="ensemble", default=True),
    st.Page(compare.page, title="Compare runs", icon=":material/compare:", url_path="compare"),
    st.Page(about.page, title="How it works", icon=":material/school:", url_path="about"),
])
nav.run()
