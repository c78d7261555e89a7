"""`vision-sync`: log every stage's DVC outputs into the model's MLflow run (a new store,
a store that was down while the stages ran)."""

from __future__ import annotations

import argparse
import logging

from stages.core import logs
from stages.core.dvcyaml import pipeline
from stages.core.entry import console_script
from stages.core.errors import StageError, first_line
from stages.core.params import Params, load_params
from stages.tracking.mlflow_store import (
    ONNX_MODEL,
    PYTORCH_MODEL,
    Store,
    check_store,
    read_run_key,
    tracking_uri,
)

log = logging.getLogger(__name__)


def sync(params: Params) -> str:
    """Log every stage's DVC outputs into the model's run (a new store, after an outage)."""
    uri = tracking_uri(params.mlflow)
    check_store(uri)
    try:
        store = Store(params, "sync")
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
    """`vision-sync`: log the DVC outputs of the workspace into MLflow."""
    argparse.ArgumentParser(prog="vision-sync", description=__doc__.splitlines()[0]).parse_args(
        argv
    )
    logs.setup("sync")
    run_id = sync(load_params())
    log.info("synced the DVC outputs into MLflow run %s", run_id)


cli = console_script(main)

if __name__ == "__main__":
    cli()
