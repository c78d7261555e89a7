"""`python -m stages <stage>`: run one stage as dvc.yaml does.

The stage's MLflow helper starts before the stage's module is imported, so that the
helper's start-up (importing MLflow, opening the store) overlaps the stage's own
(importing PyTorch) instead of following it. In a torchrun worker it also watches the
launcher, so that a killed `dvc repro` leaves no worker training on.
"""

from __future__ import annotations

import importlib
import os
import sys

from stages.core import dvcyaml, processes
from stages.core.entry import exit_now, install_excepthook
from stages.core.errors import StageError
from stages.core.params import load_params
from stages.tracking import helper


def main(argv: list[str]) -> None:
    """Start the stage's helper, then import and run the stage."""
    stages = {stage.name: stage for stage in dvcyaml.pipeline()}
    if len(argv) != 1 or argv[0] not in stages:
        raise StageError(f"usage: python -m stages {{{','.join(stages)}}}")
    stage = argv[0]
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: it ends with its launcher
        processes.watch_launcher(launcher_died)
    params = load_params()
    # Under torchrun only rank 0 records.
    if helper.records_through_helper(stages[stage]) and os.environ.get("RANK", "0") == "0":
        helper.prestart(stage, params)
    importlib.import_module(f"stages.{stage}").main(params)


def launcher_died() -> None:
    """Stop this torchrun worker: its launcher is gone."""
    # Printed, not logged: ranks other than 0 filter their log records.
    print("error: the torchrun launcher died; stopping this worker", file=sys.stderr, flush=True)
    # No atexit handlers or joins that could block on a dead peer; outputs are written
    # atomically, so nothing is left half-written.
    exit_now(1)


if __name__ == "__main__":
    install_excepthook()
    main(sys.argv[1:])
    exit_now()  # the stage's files are written and closed, its helper is done
