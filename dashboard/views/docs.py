"""The method notes (docs/METHOD_NOTES.md) and the embedded default's notes (assets/README.md), in the app: they
open offline, from the checkout the app runs from."""
from __future__ import annotations

import os

import streamlit as st

from dashboard.state import ROOT

DOCS = {"Method notes": os.path.join("docs", "METHOD_NOTES.md"),
        "The embedded default": os.path.join("assets", "README.md")}


def page() -> None:
    st.title("Documentation")
    which = st.radio("Document", list(DOCS), horizontal=True, key="doc")
    path = os.path.join(ROOT, DOCS[which])
    st.caption(f"`{DOCS[which]}` in the checkout this app runs from.")
    try:
        with open(path, encoding="utf-8") as fh:
            st.markdown(fh.read())
    except OSError as exc:
        st.error(f"{DOCS[which]} could not be read ({exc.strerror}); it ships with the repository.")
