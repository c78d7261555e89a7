"""One-line errors for bad inputs: a stage stops with a message, never a traceback."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("stages")


class StageError(Exception):
    """A problem with the user's inputs or settings, reported as one line."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (MLflow's, OpenVINO's can run to pages)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def _excepthook(exc_type, exc, tb):
    if issubclass(exc_type, StageError):
        # Printed directly (not through logging): the error must show even on ranks whose
        # log records are filtered, and even before logging is configured.
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return
    if issubclass(exc_type, KeyboardInterrupt):
        print("interrupted", file=sys.stderr, flush=True)
        return
    sys.__excepthook__(exc_type, exc, tb)


def install_excepthook() -> None:
    """Report StageError as one line on stderr; other exceptions keep their traceback."""
    sys.excepthook = _excepthook
