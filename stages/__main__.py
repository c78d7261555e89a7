"""`python -m stages <stage>`: run one stage as dvc.yaml does.

The stage's MLflow helper starts before the stage's module is imported, so that the
helper's start-up (importing MLflow, opening the store) overlaps the stage's own
(importing PyTorch) instead of following it. `python -m stages.<stage>` runs the same
stage, its helper started later.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from stages import tracking
from stages.errors import StageError
from stages.params import load_params


def main(argv: list[str]) -> None:
    """Start the stage's helper, then import and run the stage."""
    stages = [stage.name for stage in tracking.pipeline()]
    if len(argv) != 1 or argv[0] not in stages:
        raise StageError(f"usage: python -m stages {{{','.join(stages)}}}")
    stage = argv[0]
    params = load_params()
    # Under torchrun only rank 0 records.
    if stage in tracking.HELPED and os.environ.get("RANK", "0") == "0":
        tracking.prestart(stage, params)
    importlib.import_module(f"stages.{stage}").main(params)


def exit_now() -> None:
    """Exit 0 at once: the stage's files are written and closed, its helper is done."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown of PyTorch's, scikit-learn's and matplotlib's
    # modules: it takes about a second per stage and nothing waits for it.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
    exit_now()
