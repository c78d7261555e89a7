"""End to end: `dvc repro` in a tmp git repository, as a user runs it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import STAGES, make_repo, run_dvc, write_params

pytestmark = pytest.mark.slow


def ran(output: str) -> list[str]:
    """The stages a dvc repro actually ran, from its output."""
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def test_dvc_repro_end_to_end(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    first = run_dvc(repo, "repro")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert ran(first.stdout) == list(STAGES)

    for output in (
        "data/prepared/meta.json",
        "models/model.pt",
        "models/checkpoint.pt",
        "models/model.onnx",
        "models/openvino/model.xml",
        "models/openvino/model.bin",
        "models/openvino/model_int8.xml",
        "plots/train/history.csv",
        "plots/evaluate/confusion.csv",
        "plots/benchmark/runtimes.png",
        "dvc.lock",
    ):
        assert (repo / output).exists(), output
    metrics = {
        name: json.loads((repo / "metrics" / f"{name}.json").read_text())
        for name in ("train", "evaluate", "export", "convert", "benchmark")
    }
    assert metrics["evaluate"]["accuracy"] > 0.5
    assert metrics["export"]["argmax_agreement"] >= 0.999
    assert metrics["convert"]["accuracy_int8"] > 0.5
    assert all(
        metrics["benchmark"][r]["throughput"] > 0
        for r in ("pytorch", "onnxruntime", "openvino_fp16", "openvino_int8")
    )

    # One MLflow run in the default store at the repo root holds every stage's result.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vision-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    run_id = json.loads((repo / "models" / "mlflow_run.json").read_text())["run_id"]
    assert run.info.run_id == run_id
    assert run.data.params["train.lr"] == "0.002"
    assert run.data.metrics["evaluate/accuracy"] == pytest.approx(metrics["evaluate"]["accuracy"])
    for key in (
        "train/loss",
        "val/accuracy",
        "export/max_abs_diff",
        "convert/accuracy_int8",
        "benchmark/openvino_int8/throughput",
    ):
        assert key in run.data.metrics, key
    assert len(run.data.tags["git.commit"]) == 40

    # Nothing changed: no stage runs, and it answers within seconds.
    started = time.perf_counter()
    again = run_dvc(repo, "repro")
    assert again.returncode == 0
    assert ran(again.stdout) == []
    assert time.perf_counter() - started < 15

    # One evaluate parameter: evaluate reruns, train does not.
    write_params(repo, evaluate={"batch_size": 100})
    partial = run_dvc(repo, "repro")
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert ran(partial.stdout) == ["evaluate"]
    assert len(client.search_runs([experiment.experiment_id])) == 1
