"""What every entry point (the stage runner, the launcher, the console scripts, the MLflow
helper) sets up and how it ends; importing this module changes nothing."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from stages.core.errors import StageError


def report_exception(exc_type, exc, tb) -> None:
    """What an entry point prints for an exception it did not handle (its excepthook)."""
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
    sys.excepthook = report_exception


def exit_now(code: int = 0) -> None:
    """Exit at once: the process's files are written and closed, its helpers are done."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown of PyTorch's, scikit-learn's, MLflow's and
    # matplotlib's modules: it takes about a second per process and nothing waits for it.
    os._exit(code)


def console_script(main: Callable[[list[str]], None]) -> Callable[[], None]:
    """A console script's entry point (pyproject.toml): `main(argv)` with one-line errors."""

    def run() -> None:
        install_excepthook()
        main(sys.argv[1:])

    return run
