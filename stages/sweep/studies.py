"""A sweep's Optuna study: its storage (optuna.db beside params.yaml, or a shared PostgreSQL
URL), sampler, pruner and stale-trial heartbeat."""

from __future__ import annotations

import os
import re
import time
import warnings
from typing import Any

from stages.core import paths
from stages.core.errors import StageError, first_line
from stages.core.params import Sweep
from stages.sweep.space import grid

STORAGE_ENV = "VISION_SWEEP_STORAGE"

STORAGE_FILE = "optuna.db"

# Optuna marks a trial whose driver stopped beating for GRACE_S seconds as failed.
HEARTBEAT_S = 5

GRACE_S = 15
# The sweep's metric, and the per-epoch validation score that moves the same way.
REPORTED = {
    "evaluate/accuracy": "val_accuracy",
    "train/val_accuracy": "val_accuracy",
    "evaluate/loss": "val_loss",
    "train/val_loss": "val_loss",
}


def storage_url(given: str | None) -> str:
    """--storage, else $VISION_SWEEP_STORAGE, else optuna.db at the repository root."""
    url = given or os.environ.get(STORAGE_ENV) or ""
    if not url:
        return f"sqlite:///{(paths.repo_root() / STORAGE_FILE).resolve()}"
    return url


def open_storage(url: str, heartbeat: bool = True):
    """Optuna's RDB storage; an unreachable or bad URL stops with one line."""
    import optuna

    # The heartbeat (how a killed sweep's trials are marked failed) is marked experimental.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    shown = re.sub(r"//[^@/]*@", "//***@", url)  # no password in messages
    kwargs = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S} if heartbeat else {}
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as exc:
            # Two machines opening a new database at once race to make its tables: the
            # loser finds them made a moment later.
            if ("duplicate key" in str(exc) or "already exists" in str(exc)) and attempt < 2:
                time.sleep(1.0)
                continue
            raise StageError(
                f"sweep: the Optuna storage {shown} cannot be opened: {first_line(exc)}"
            ) from None


def make_sampler(spec: Sweep, space: dict[str, Any], jobs: int):
    import optuna

    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler(grid(space), seed=spec.seed)
    # constant_liar: trials running in parallel are not suggested the same point.
    return optuna.samplers.TPESampler(
        seed=spec.seed, n_startup_trials=spec.startup_trials, constant_liar=jobs > 1
    )


def make_pruner(spec: Sweep):
    import optuna

    if spec.pruner == "none" or spec.metric not in REPORTED:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials)


def finished(study) -> int:
    """Trials that count towards the total: complete or pruned."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def best_trial(study):
    """The best complete trial, or None before any completed."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return study.best_trial
