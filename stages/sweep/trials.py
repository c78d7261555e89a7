"""A sweep's trial as its stages see it: the environment that marks a trial, its MLflow tags,
and the train stage's per-epoch reports to the pruner (`Pruning`)."""

from __future__ import annotations

import json
import os
from typing import Any

import psutil

from stages.core.errors import StageError
from stages.core.params import Params, Sweep
from stages.sweep.studies import make_pruner, open_storage

# How a trial's stages learn that they are a trial: JSON {storage, study, trial, report,
# driver, parent}. DVC passes the environment of `dvc exp run --temp` to the stages.
TRIAL_ENV = "VISION_SWEEP_TRIAL"


class Pruning:
    """In the train stage of a trial (rank 0): report each epoch's validation score to the
    study, and say whether the pruner stops the trial or its sweep is gone."""

    def __init__(self, link: dict[str, Any], spec: Sweep):
        self.link = link
        self.trial = None
        if not link.get("report"):  # pruner none, or a metric with no per-epoch score
            return
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = open_storage(link["storage"], heartbeat=False)
        study = optuna.load_study(
            study_name=link["study"], storage=storage, pruner=make_pruner(spec)
        )
        study_id = storage.get_study_id_from_name(link["study"])
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, link["trial"])
        self.trial = optuna.trial.Trial(study, trial_id)

    @classmethod
    def from_env(cls, params: Params, is_main: bool) -> Pruning | None:
        """The trial this stage trains (rank 0), or None outside a sweep."""
        link = trial_link()
        return cls(link, params.sweep) if is_main and link else None

    def should_stop(self, row: dict[str, float]) -> bool:
        """Report this epoch; whether the pruner ends the trial here."""
        driver = int(self.link.get("driver") or 0)
        if not process_alive(driver):
            raise StageError(f"sweep: the sweep (pid {driver}) is gone; stopping this trial")
        if self.trial is None:
            return False
        self.trial.report(row[self.link["report"]], int(row["epoch"]))
        return self.trial.should_prune()


def process_alive(pid: int) -> bool:
    """Whether a process of this machine still runs (0: unknown, taken as alive)."""
    return pid <= 0 or psutil.pid_exists(pid)


def trial_link() -> dict[str, Any] | None:
    """What the sweep told this trial's stages (TRIAL_ENV), or None outside a sweep."""
    text = os.environ.get(TRIAL_ENV)
    return json.loads(text) if text else None


def in_trial() -> bool:
    """Whether this process runs a stage of a sweep's trial."""
    return TRIAL_ENV in os.environ


def trial_tags() -> dict[str, str]:
    """MLflow tags of a trial's run: its study and trial, and the sweep's parent run."""
    link = trial_link()
    if link is None:
        return {}
    tags = {"sweep.study": link["study"], "sweep.trial": str(link["trial"])}
    if link.get("parent"):
        tags["mlflow.parentRunId"] = link["parent"]
    return tags
