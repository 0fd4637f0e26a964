"""Settings that stay put: the sidebar's choices, the projector mode and the lesson's step last as long as the tab is
open, across pages, and come back after a reload.

Streamlit forgets a widget's value when a page without that widget runs (a trip to Compare runs, and back, reset the
sidebar to its defaults). Every persisted widget is therefore created through :func:`restore` (its key seeded from
the session's saved settings when Streamlit has dropped it) and :func:`remember` (its value saved again); the saved
settings are a JSON file in the session's folder, so a reload (same URL) finds them too.
"""
from __future__ import annotations

import os
from typing import Any

import streamlit as st

from core.io.safe_io import atomic_write_json, load_json
from dashboard.state import session_dir

FILE = "settings.json"
_KEY = "_saved_settings"


def saved() -> dict[str, Any]:
    """This session's saved settings, read from its folder once per browser session."""
    if _KEY not in st.session_state:
        path = os.path.join(session_dir("data"), FILE)
        try:
            data = load_json(path) if os.path.isfile(path) else {}
        except Exception:  # noqa: BLE001 - a damaged settings file is forgotten, not fatal
            data = {}
        st.session_state[_KEY] = data if isinstance(data, dict) else {}
    return st.session_state[_KEY]


def restore(key: str, allowed=None) -> bool:
    """Seed ``st.session_state[key]`` from the saved settings when Streamlit has dropped it; True when the key holds a
    value now (a widget must then be made without a default). ``allowed(value)`` rejects a saved value that no longer
    fits (a target that was removed)."""
    if key not in st.session_state and key in saved():
        value = saved()[key]
        if allowed is None or allowed(value):
            st.session_state[key] = value
    return key in st.session_state


def remember(key: str, value: Any = None) -> None:
    """Save the value of ``key`` (default: what the session holds) when it changed."""
    value = st.session_state.get(key) if value is None else value
    if saved().get(key) != value:
        saved()[key] = value
        atomic_write_json(os.path.join(session_dir("data"), FILE), saved())


def persistent(key: str, make, allowed=None, **default) -> Any:
    """``make(key=key, **default)`` for a widget whose value persists; ``default`` (``value=`` / ``index=`` /
    ``default=``) is passed only when there is no value to restore, as Streamlit asks."""
    held = restore(key, allowed)
    value = make(key=key, **({} if held else default))
    remember(key, value)
    return value
