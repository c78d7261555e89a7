"""The benchmark stage: every runtime really measured, in one schema, with benchmark_app
beside our numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import pytest

from conftest import write_params
from stages import benchmark, paths
from stages.params import load_params
from stages.tracking import read_run_file

RUNTIMES = ("pytorch", "onnxruntime", "openvino_fp16", "openvino_int8")
SPREAD = ("latency_ms", "latency_p10_ms", "latency_p90_ms", "throughput", "throughput_p10")


def check_schema(metrics: dict, batch_size: int) -> None:
    """Keys, positive numbers and consistent spreads for every runtime."""
    assert metrics["batch_size"] == batch_size
    assert metrics["threads"] >= 1
    assert metrics["openvino_precision"] in ("f32", "bf16", "f16")
    for name in RUNTIMES:
        result = metrics[name]
        assert set(SPREAD) <= set(result)
        assert all(result[key] > 0 for key in result), name
        assert result["latency_p10_ms"] <= result["latency_ms"] <= result["latency_p90_ms"]
        assert result["throughput_p10"] <= result["throughput"] <= result["throughput_p90"]
        # One image in a whole batch call cannot take longer than the batch-1 call's
        # latency by orders of magnitude: the two modes measured the same model.
        assert result["throughput"] > 0.1 * 1000 / result["latency_ms"]
        assert result["speedup_vs_pytorch"] == pytest.approx(
            result["throughput"] / metrics["pytorch"]["throughput"]
        )
    for name in ("openvino_fp16", "openvino_int8"):
        assert metrics[name]["throughput_async"] > 0
    # Four measurements, not one number copied four times.
    assert len({metrics[name]["latency_ms"] for name in RUNTIMES}) == len(RUNTIMES)
    assert len({metrics[name]["throughput"] for name in RUNTIMES}) == len(RUNTIMES)


def test_benchmark_of_the_trained_pipeline(trained: Path) -> None:
    metrics = json.loads((trained / paths.BENCHMARK_METRICS).read_text())
    check_schema(metrics, load_params(trained / paths.PARAMS).benchmark.batch_size)
    with (trained / paths.BENCHMARK_PLOT).open() as fh:
        rows = list(csv.DictReader(fh))
    assert [row["runtime"] for row in rows] == list(RUNTIMES)
    for row in rows:
        assert float(row["throughput"]) == pytest.approx(metrics[row["runtime"]]["throughput"])
    png = trained / paths.PLOTS / "benchmark" / "runtimes.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_app_cross_check_and_mlflow(trained_repo: Path) -> None:
    write_params(trained_repo, benchmark={"benchmark_app": True, "seconds": 0.6})
    params = load_params()
    benchmark.main(params)
    metrics = json.loads(paths.BENCHMARK_METRICS.read_text())
    check_schema(metrics, params.benchmark.batch_size)
    for name in ("openvino_fp16", "openvino_int8"):
        app = metrics[name]["benchmark_app_throughput"]
        # Same IR, shape and threads: the same order of magnitude as our own number
        # (loose: other processes share this machine's cores).
        assert 0.1 < app / metrics[name]["throughput"] < 10, name
    client = mlflow.MlflowClient(f"sqlite:///{trained_repo / paths.MLFLOW_DB}")
    run = client.get_run(read_run_file())
    assert run.data.metrics["benchmark/openvino_int8/benchmark_app_throughput"] > 0
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/runtimes.png" in logged


def test_summarize_medians_and_spread() -> None:
    latencies = [0.001, 0.002, 0.003, 0.004, 0.100]  # one outlier: the median ignores it
    batch_times = [0.5, 1.0, 1.0, 2.0]
    result = benchmark.summarize(latencies, batch_times, batch=10)
    assert result["latency_ms"] == pytest.approx(3.0)
    assert result["throughput"] == pytest.approx(10.0)
    assert result["latency_p10_ms"] < result["latency_ms"] < result["latency_p90_ms"]
    assert result["throughput_p10"] < result["throughput"] < result["throughput_p90"]


def test_timed_calls_measure_each_call() -> None:
    calls = []
    durations = benchmark.timed_calls(lambda: calls.append(1), seconds=0.0)
    assert len(durations) == len(calls) == 5  # at least five, even with no time to spend
    assert all(d >= 0 for d in durations)
