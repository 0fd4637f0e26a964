"""Settings that stay put: the sidebar's choices, the projector mode and the lesson's step last as long as the tab is
open, across pages, and come back after a reload.

Streamlit forgets a widget's value when a page without that widget runs (a trip to Compare runs, and back, reset the
sidebar to its defaults). Every persisted widget is therefore created through :func:`restore` (its key seeded from
the session's saved settings when Streamlit has dropped it) and :func:`remember` (its value saved again); the saved
settings are a JSON file in the session's folder, so a reload (same URL) finds them too.

The file is the user's to damage (and the ``?sid=`` in the URL picks whose file it is): a remembered value that does
not fit its widget (a wrong type, out of range, a float where an integer goes, a name no longer offered, a list that
names one source 40 times) is dropped with a note on the page, and a file that cannot be read or written (a folder, a
list, a full or read-only disk) leaves the sidebar on its defaults, said once; neither ever stops the page.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable

import streamlit as st

from core import UserInputError
from core.io.safe_io import SCHEMAS, atomic_write_json, load_json
from dashboard.state import session_dir

FILE = "settings.json"
_KEY = "_saved_settings"
_NOTES = "_settings_notes"
_UNSAVED = "_settings_unsaved"


def note(text: str) -> None:
    """Say ``text`` on the page (the sidebar's foot, every page) for the rest of this browser session."""
    notes = st.session_state.setdefault(_NOTES, [])
    if text not in notes:
        notes.append(text)


def show_notes() -> None:
    """The notes about remembered settings that were dropped or could not be saved, in the sidebar."""
    for text in st.session_state.get(_NOTES, []):
        st.sidebar.warning(text)


def _no_path(exc: Exception, path: str, name: str) -> str:
    """``exc``'s message with the server's path of a session file replaced by the file's name."""
    return str(exc).replace(repr(path), name).replace(path, name)


def saved() -> dict[str, Any]:
    """This session's saved settings, read from its folder once per browser session (a file that cannot be read as
    settings is set aside with a note: the sidebar starts from its defaults)."""
    if _KEY not in st.session_state:
        path = os.path.join(session_dir("data"), FILE)
        data: dict[str, Any] = {}
        if os.path.lexists(path):
            try:
                data = load_json(path, schema=SCHEMAS["settings"])
            except (UserInputError, OSError) as exc:
                note(f"This session's saved settings could not be read ({_no_path(exc, path, FILE)}); the sidebar "
                     "starts from its defaults.")
        st.session_state[_KEY] = data
    return st.session_state[_KEY]


def fits(value: Any, allowed: Callable[[Any], bool] | None, like: Any = None) -> bool:
    """Whether a remembered ``value`` can go back into its widget: of the kind of the widget's default ``like`` (a
    bool for a toggle, an integer for an integer slider, a list of distinct names for a multiselect), and ``allowed``
    (the caller's test: among the choices, within the range). A test that cannot even compare the value (a list where
    a name goes) is a no."""
    if isinstance(like, bool) and not isinstance(value, bool):
        return False
    if isinstance(like, int) and not isinstance(like, bool) and (isinstance(value, bool) or not isinstance(value, int)):
        return False
    if isinstance(like, float) and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                          or not math.isfinite(value)):
        return False
    if isinstance(like, list) and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)
                                   or len(set(value)) != len(value)):
        return False
    try:
        return allowed is None or bool(allowed(value))
    except Exception:  # an unhashable or uncomparable value does not fit
        return False


def restore(key: str, allowed: Callable[[Any], bool] | None = None, like: Any = None, what: str | None = None) -> bool:
    """Seed ``st.session_state[key]`` from the saved settings when Streamlit has dropped it; True when the key holds a
    value now (a widget must then be made without a default). A saved value that does not fit (:func:`fits`) is
    dropped, and the page says so, naming the value as it was saved and ``what`` would fit."""
    if key not in st.session_state and key in saved():
        value = saved()[key]
        if fits(value, allowed, like):
            st.session_state[key] = float(value) if isinstance(like, float) and isinstance(value, int) else value
        else:
            del saved()[key]  # said once; the widget's value replaces it at the next save
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            note(f"The remembered setting {key} = {shown} does not fit"
                 + (f" (it must be {what})" if what else " what the page offers now")
                 + "; it was dropped and the default is shown.")
    return key in st.session_state


def remember(key: str, value: Any = None) -> None:
    """Save the value of ``key`` (default: what the session holds) when it changed. A file that cannot be written
    (a folder in its place, a full or read-only disk) is said once; the page goes on with the value in memory."""
    value = st.session_state.get(key) if value is None else value
    if saved().get(key) != value:
        saved()[key] = value
        if st.session_state.get(_UNSAVED):
            return
        path = os.path.join(session_dir("data"), FILE)
        try:
            atomic_write_json(path, saved())
        except (UserInputError, OSError) as exc:
            st.session_state[_UNSAVED] = True
            note(f"Settings are kept while this tab is open but not saved for a reload: {FILE} cannot be written "
                 f"({_no_path(exc, path, FILE) if isinstance(exc, UserInputError) else exc.strerror or exc}).")


def persistent(key: str, make, allowed=None, what: str | None = None, **default) -> Any:
    """``make(key=key, **default)`` for a widget whose value persists; ``default`` (``value=`` / ``index=`` /
    ``default=``) is passed only when there is no value to restore, as Streamlit asks. A remembered value must be of
    the default's kind (``value=`` / ``default=``) and pass ``allowed``; ``what`` says what fits, for the note."""
    like = default.get("value", default.get("default"))
    held = restore(key, allowed, like, what)
    value = make(key=key, **({} if held else default))
    remember(key, value)
    return value
