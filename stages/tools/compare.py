"""Compare the runs of the MLflow experiment as a table.

    vision-compare [--sort evaluate/accuracy] [--csv runs.csv] [--markdown runs.md]

One row per run (per pipeline result): the params that differ between runs and the key
metrics of every stage, best first by the sort metric, printed as a markdown table.
Crowning a model is the promote stage's job (README "Release"): it moves
`models:/<promote.registered_model>@champion` only on paired evidence, never on one number.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import pandas as pd

from stages.core import logs
from stages.core.entry import console_script
from stages.core.errors import StageError, first_line
from stages.core.params import MLflow, load_params
from stages.tracking import mlflow_store

log = logging.getLogger(__name__)

# One headline number per stage: quality, INT8 quality, deployed speed, training speed.
KEY_METRICS = (
    "evaluate/accuracy",
    "evaluate/macro_f1",
    "evaluate/loss",
    "convert/accuracy_int8",
    "benchmark/openvino_int8/throughput",
    "benchmark/pytorch/latency_ms",
    "train/images_per_second",
    "train/train_seconds",
)
# Metrics where smaller is better sort ascending unless told otherwise.
LOWER_IS_BETTER = ("loss", "latency", "seconds", "diff", "drop", "size_mb")
# Params that always differ or say nothing about the result.
IGNORED_PARAMS = ("data.root",)


def open_store(cfg: MLflow):
    """MLflow's client on the existing store, with the store's lock."""
    uri = mlflow_store.tracking_uri(cfg)
    db = mlflow_store.sqlite_file(uri)
    if db is not None and not db.exists():
        raise StageError(f"mlflow: no store at {db} yet (run the pipeline first)")
    mlflow_store.check_store(uri)
    mlflow = mlflow_store.import_mlflow()
    mlflow.set_tracking_uri(uri)
    return mlflow, mlflow.MlflowClient(uri), mlflow_store.store_lock(uri)


def runs_frame(cfg: MLflow) -> pd.DataFrame:
    """Every live run of the configured experiment: params.*, metrics.*, tags.* columns
    (a sweep's parent run holds no model: left out)."""
    name = mlflow_store.experiment_name(cfg)
    mlflow, client, lock = open_store(cfg)
    try:
        with lock:  # opening the store may migrate its schema
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise StageError(
                    f"mlflow: no experiment '{name}' in {mlflow_store.tracking_uri(cfg)}"
                )
            runs = mlflow.search_runs([experiment.experiment_id], output_format="pandas")
            if "tags.sweep.role" in runs:
                runs = runs[runs["tags.sweep.role"] != "parent"]
            return runs
    except StageError:
        raise
    except Exception as exc:
        raise StageError(f"mlflow: {mlflow_store.tracking_uri(cfg)}: {first_line(exc)}") from None


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of this metric are better (loss, latency, ...)."""
    return any(word in metric for word in LOWER_IS_BETTER)


def table(runs: pd.DataFrame, sort: str, ascending: bool | None = None) -> pd.DataFrame:
    """The comparison: run, name, differing params, key metrics; best first by `sort`."""
    if runs.empty:
        raise StageError("compare: the experiment has no runs yet")
    column = f"metrics.{sort}"
    if column not in runs:
        known = sorted(c.removeprefix("metrics.") for c in runs if c.startswith("metrics."))
        raise StageError(
            f"compare: no run has the metric {sort!r}; some known ones: " + ", ".join(known[:8])
        )
    params = [
        c
        for c in sorted(c for c in runs if c.startswith("params."))
        if c.removeprefix("params.") not in IGNORED_PARAMS
        and runs[c].astype(str).nunique(dropna=False) > 1
    ]
    metrics = [f"metrics.{m}" for m in KEY_METRICS if f"metrics.{m}" in runs]
    if column not in metrics:
        metrics.insert(0, column)
    metrics = [c for c in metrics if runs[c].notna().any()]
    out = pd.DataFrame(
        {
            "run": runs["run_id"].str[:8],
            "name": runs.get("tags.mlflow.runName", pd.Series("", index=runs.index)),
            "status": runs["status"],
        }
    )
    for c in params:
        out[c.removeprefix("params.")] = runs[c]
    for c in metrics:
        out[c.removeprefix("metrics.")] = runs[c]
    out["run_id"] = runs["run_id"]
    ascending = lower_is_better(sort) if ascending is None else ascending
    return out.sort_values(sort, ascending=ascending, na_position="last", kind="stable")


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no extra dependency)."""
    shown = frame.drop(columns=["run_id"])
    numeric = [pd.api.types.is_numeric_dtype(shown[c]) for c in shown]
    lines = [
        "| " + " | ".join(shown.columns) + " |",
        "| " + " | ".join("---:" if n else "---" for n in numeric) + " |",
    ]
    for row in shown.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line of `vision-compare`."""
    parser = argparse.ArgumentParser(prog="vision-compare", description=__doc__.splitlines()[0])
    parser.add_argument("--sort", default="evaluate/accuracy", help="metric to rank runs by")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--ascending", action="store_true", default=None, help="smallest first")
    order.add_argument("--descending", dest="ascending", action="store_false", help="largest first")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV here")
    parser.add_argument("--markdown", type=Path, help="also write the table as markdown here")
    parser.add_argument("--register", metavar="NAME", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    """Print the comparison; write it to files when asked."""
    logs.setup("compare")
    args = parse_args(argv)
    if args.register:
        raise StageError(
            "compare --register is gone: the promote stage registers every run's deployable "
            "model and moves @champion only on evidence (dvc repro -f -s promote decides "
            'again; README "Release")'
        )
    cfg = load_params().mlflow
    frame = table(runs_frame(cfg), args.sort, args.ascending)
    text = markdown(frame)
    sys.stdout.write(text)
    if args.csv:
        frame.to_csv(args.csv, index=False)
        log.info("wrote %s", args.csv)
    if args.markdown:
        args.markdown.write_text(text)
        log.info("wrote %s", args.markdown)


cli = console_script(main)


if __name__ == "__main__":
    cli()
