"""Cooperative stopping for long loops: a callable or a ``threading.Event``."""
from __future__ import annotations

from typing import Any, Callable


def stop_flag(should_stop: Any) -> Callable[[], bool]:
    """``None`` -> never stop; an object with ``is_set`` (``threading.Event``) or a callable -> poll it."""
    if should_stop is None:
        return lambda: False
    if hasattr(should_stop, "is_set"):
        return should_stop.is_set
    if not callable(should_stop):
        raise TypeError(f"should_stop must be callable or a threading.Event, got {type(should_stop).__name__}")
    return should_stop
