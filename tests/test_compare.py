"""compare's table: the params that differ, the metrics, best run first (no MLflow store)."""

import pandas as pd
import pytest

from stages.core.errors import StageError
from stages.tools import compare


def test_compare_table_keeps_differing_params_and_ranks_by_the_metric() -> None:
    runs = pd.DataFrame(
        {
            "run_id": ["a" * 32, "b" * 32, "c" * 32],
            "status": ["FINISHED"] * 3,
            "tags.mlflow.runName": ["one", "two", "three"],
            "params.train.lr": ["0.002", "0.001", "0.004"],
            "params.train.epochs": ["2", "2", "2"],
            "params.data.root": ["/x", "/y", "/z"],
            "metrics.evaluate/accuracy": [0.90, 0.95, float("nan")],
            "metrics.benchmark/pytorch/latency_ms": [1.5, 0.7, 1.0],
            "metrics.evaluate/count": [360, 360, 360],
        }
    )
    table = compare.table(runs, "evaluate/accuracy")
    assert list(table.columns) == [
        "run",
        "name",
        "status",
        "train.lr",
        "evaluate/accuracy",
        "benchmark/pytorch/latency_ms",
        "run_id",
    ]
    assert list(table["name"]) == ["two", "one", "three"]  # best first, no value last
    assert list(compare.table(runs, "benchmark/pytorch/latency_ms")["name"]) == [
        "two",
        "three",
        "one",
    ]  # latency: smaller is better
    text = compare.markdown(table)
    assert text.splitlines()[0].startswith("| run | name | status | train.lr |")
    assert text.splitlines()[2] == "| bbbbbbbb | two | FINISHED | 0.001 | 0.95 | 0.7 |"
    with pytest.raises(StageError, match="no run has the metric"):
        compare.table(runs, "export/max_abs_diff")
