"""x"""

from __future__ import annotations

import argparse

import contextlib

import hashlib

import json

import logging

import os

import queue

import re

import socket

import subprocess

import sys

import tempfile

import threading

import time

import warnings

from dataclasses import dataclass

from pathlib import Path

from typing import Any

import psutil

import yaml

from stages import paths, tracking

from stages.errors import StageError, first_line, install_excepthook

from stages.params import Params, Range, Sweep, load_params, parse_params

from stages.sweep.space import study_name
from stages.sweep.studies import make_pruner, open_storage
from stages.sweep.driver import DVC, dvc


# How a trial's stages learn that they are a trial: JSON {storage, study, trial, report,
# driver, parent}. DVC passes the environment of `dvc exp run --temp` to the stages.
TRIAL_ENV = "VISION_SWEEP_TRIAL"

# The sweep's metric, and the per-epoch validation score that moves the same way.
REPORTED = {
    "evaluate/accuracy": "val_accuracy",
    "train/val_accuracy": "val_accuracy",
    "evaluate/loss": "val_loss",
    "train/val_loss": "val_loss",
}

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
        if not _alive(driver):
            raise StageError(f"sweep: the sweep (pid {driver}) is gone; stopping this trial")
        if self.trial is None:
            return False
        self.trial.report(row[self.link["report"]], int(row["epoch"]))
        return self.trial.should_prune()

def _alive(pid: int) -> bool:
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
