"""The pipeline as dvc.yaml declares it: its stages, their params sections, outputs and code."""

from __future__ import annotations

import base64

import contextlib

import csv

import getpass

import json

import logging

import os

import signal

import subprocess

import sys

import time

import urllib.error

import urllib.request

import uuid

from collections.abc import Iterator

from dataclasses import dataclass

from pathlib import Path

from typing import Any

from urllib.parse import urlparse

import yaml

from filelock import FileLock

from stages import paths

from stages.errors import StageError, first_line

from stages.params import MLflow, Params, load_params



@dataclass(frozen=True)
class Stage:
    """What MLflow gets of one stage, as dvc.yaml declares it."""

    name: str
    params: tuple[str, ...]
    metrics: tuple[Path, ...]
    files: tuple[Path, ...]

def artifact_folder(path: Path) -> str | None:
    """Where an output goes among the run's artifacts (None: not logged as a file)."""
    if path == paths.OPENVINO:
        return "openvino"
    if path.parts[0] in ("plots", "reports"):
        return path.parts[0]
    return None  # inputs of later stages, and the models, which go in as MLflow models

def pipeline(file: Path = paths.DVC_YAML) -> list[Stage]:
    """The stages of dvc.yaml, in order, with their params sections, metrics and files."""
    stages = yaml.safe_load(file.read_text())["stages"]

    def names(entries: list) -> list[str]:
        # An entry is a path, or a mapping from a path (or a params file) to its options.
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries]

    return [
        Stage(
            name,
            tuple(names(spec.get("params", []))),
            tuple(Path(m) for m in names(spec.get("metrics", []))),
            tuple(Path(o) for o in names(spec.get("outs", [])) if artifact_folder(Path(o))),
        )
        for name, spec in stages.items()
    ]

def before(stage: str, stages: list[Stage]) -> list[Stage]:
    """The stages that run before `stage` in the pipeline."""
    names = [s.name for s in stages]
    return stages[: names.index(stage)] if stage in names else stages
