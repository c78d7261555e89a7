"""`vision-rollback [VERSION]`: point `@champion` back at the champion before it (or at VERSION)."""

from __future__ import annotations

import argparse
import logging

from stages.core import logs
from stages.core.entry import console_script
from stages.core.errors import StageError
from stages.core.params import Params, load_params
from stages.release.gates import CHAMPION
from stages.release.registry import PREVIOUS_TAG, Registry
from stages.tracking import mlflow_store

log = logging.getLogger(__name__)


def rollback(params: Params, version: str | None) -> tuple[str, str]:
    """Point @champion at `version`, or at the champion before the current one."""
    cfg = params.promote
    store = mlflow_store.Store(params, "promote")
    registry = Registry(store, cfg.registered_model)
    current = registry.champion()
    if current is None:
        raise StageError(f"promote: {cfg.registered_model} has no @champion to roll back")
    target = version or current.tags.get(PREVIOUS_TAG)
    if not target:
        raise StageError(
            f"promote: {cfg.registered_model} version {current.version} was the first "
            "champion: there is none before it (name a version: vision-rollback N)"
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


def main(argv: list[str]) -> None:
    """`vision-rollback [VERSION]`: move @champion back and say from which version to which."""
    parser = argparse.ArgumentParser(prog="vision-rollback", description=__doc__.splitlines()[0])
    parser.add_argument(
        "version",
        nargs="?",
        help="the version to point @champion at (default: the champion before the current one)",
    )
    args = parser.parse_args(argv)
    params = load_params()
    logs.setup("rollback")
    if not params.mlflow.enabled:
        raise StageError("rollback: mlflow.enabled is false: there is no registry to roll back")
    mlflow_store.check_store(mlflow_store.tracking_uri(params.mlflow))
    before, after = rollback(params, args.version)
    name = params.promote.registered_model
    log.info("%s @champion: version %s -> version %s", name, before, after)


cli = console_script(main)

if __name__ == "__main__":
    cli()
