"""x"""

from __future__ import annotations

import argparse

import contextlib

import io

import logging

import sys

from dataclasses import dataclass, field

from pathlib import Path

from typing import Any

import numpy as np

from stages import datasets, deploy, logs, model_card, paths, runtimes, tracking

from stages.errors import StageError, first_line

from stages.outputs import write_json, write_text

from stages.params import Params, Promote, load_params

from stages.release.gates import CHAMPION
from stages.release.registry import PREVIOUS_TAG, Registry
from stages.promote import main


log = logging.getLogger(__name__)

def rollback(params: Params, version: str | None) -> tuple[str, str]:
    """Point @champion at `version`, or at the champion before the current one."""
    cfg = params.promote
    store = tracking.Store(params, "promote")
    registry = Registry(store, cfg.registered_model)
    current = registry.champion()
    if current is None:
        raise StageError(f"promote: {cfg.registered_model} has no @champion to roll back")
    target = version or current.tags.get(PREVIOUS_TAG)
    if not target:
        raise StageError(
            f"promote: {cfg.registered_model} version {current.version} was the first "
            "champion: there is none before it (name a version: --rollback N)"
        )
    with store.lock:
        try:
            registry.client.get_model_version(cfg.registered_model, target)
        except Exception:
            raise StageError(f"promote: {cfg.registered_model} has no version {target}") from None
        registry.client.set_registered_model_alias(cfg.registered_model, CHAMPION, target)
        registry.client.set_model_version_tag(
            cfg.registered_model, target, "promote.decision", f"{CHAMPION} (rolled back to)"
        )
    return str(current.version), str(target)

def cli(argv: list[str] | None = None) -> None:
    """`python -m stages.promote`: the stage, or `--rollback [VERSION]`."""
    parser = argparse.ArgumentParser(prog="python -m stages.promote", description=__doc__)
    parser.add_argument(
        "--rollback",
        nargs="?",
        const="",
        metavar="VERSION",
        help="point @champion back at the previous champion (or at VERSION)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    params = load_params()
    if args.rollback is None:
        main(params)
        return
    logs.setup("promote")
    if not params.mlflow.enabled:
        raise StageError("promote: mlflow.enabled is false: there is no registry to roll back")
    tracking.check_store(tracking.tracking_uri(params.mlflow))
    before, after = rollback(params, args.rollback or None)
    name = params.promote.registered_model
    log.info("%s @champion: version %s -> version %s", name, before, after)
