"""`vision-sync`: log every stage's DVC outputs into the model's MLflow run (a new store, after an outage)."""

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

from stages.core.dvcyaml import pipeline
from stages.tracking.mlflow_store import ONNX_MODEL, PYTORCH_MODEL, Store, check_store, read_run_key, tracking_uri
from stages.tracking.helper import record


log = logging.getLogger(__name__)

def sync(params: Params) -> str:
    """Log every stage's DVC outputs into the model's run (a new store, after an outage)."""
    uri = tracking_uri(params.mlflow)
    check_store(uri)
    try:
        store = Store(params, "tracking")
        store.open_run(read_run_key(), {})
        store.log_stages(pipeline())
        for name in (PYTORCH_MODEL, ONNX_MODEL):
            store.log_model(name)
        store.log_snapshot()
        store.finish("FINISHED")
    except StageError:
        raise
    except Exception as exc:
        raise StageError(f"mlflow: the sync into {uri} failed: {first_line(exc)}") from None
    return store.run_id

def main(argv: list[str]) -> None:
    """`python -m stages.tracking sync`: log the DVC outputs into MLflow."""
    if argv[:1] == ["record"] and len(argv) == 2:
        record(argv[1])
        return
    from stages import logs

    logs.setup("tracking")
    if argv != ["sync"]:
        raise StageError("usage: python -m stages.tracking sync")
    run_id = sync(load_params())
    log.info("synced the DVC outputs into MLflow run %s", run_id)

if __name__ == "__main__":
    main(sys.argv[1:])
