"""One-line errors for bad inputs: a stage stops with a message, never a traceback."""

from __future__ import annotations


class StageError(Exception):
    """A problem with the user's inputs or settings, reported as one line."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (MLflow's, OpenVINO's can run to pages)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
