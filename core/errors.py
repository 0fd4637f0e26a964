"""Errors a user can cause, kept apart from programming errors.

Anything a user can get wrong (a file, a value, a dataset) raises
:class:`UserInputError` with one paragraph that names the problem and the fix.
The CLI and the dashboard show its message without a traceback; every other
exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserInputError(ValueError):
    """A user mistake, with a message that names the value and the fix."""


class IncompatiblePromptError(UserInputError):
    """A prompt that was tuned for another backbone, width or depth."""


class UnsafeFileError(UserInputError):
    """A file that is not what it claims to be (pickle, corrupt, oversized)."""


class StopRequested(Exception):
    """Raised inside long loops when a caller asked them to stop."""
