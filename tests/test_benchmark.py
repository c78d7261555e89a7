"""The benchmark stage: every runtime really measured, in one schema, with benchmark_app
beside our numbers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from helpers.repos import write_params
from stages import benchmark
from stages.core import paths
from stages.core.errors import StageError
from stages.core.params import load_params

RUNTIMES = ("pytorch", "onnxruntime", "openvino_fp16", "openvino_int8")
SPREAD = ("latency_ms", "latency_p10_ms", "latency_p90_ms", "throughput", "throughput_p10")


def rows(repo: Path) -> dict[str, dict[str, str]]:
    """plots/benchmark/runtimes.csv by runtime."""
    with (repo / paths.BENCHMARK_PLOT).open() as fh:
        return {row["runtime"]: row for row in csv.DictReader(fh)}


def check_schema(repo: Path, batch_size: int, measured: tuple[str, ...] = RUNTIMES) -> None:
    """The headline numbers in the metrics file, every measurement in the CSV, consistent."""
    metrics = json.loads((repo / paths.BENCHMARK_METRICS).read_text())
    table = rows(repo)
    assert list(metrics) == list(table) == list(measured)
    for name in measured:
        result, row = metrics[name], table[name]
        assert list(result) == ["throughput", "latency_ms", "speedup_vs_pytorch"]
        assert all(value > 0 for value in result.values()), name
        assert int(row["batch_size"]) == batch_size and int(row["threads"]) >= 1
        assert row["precision"] in ("f32", "bf16", "f16")
        assert float(row["size_mb"]) > 0
        spread = {key: float(row[key]) for key in (*SPREAD, "throughput_p90")}
        assert spread["latency_p10_ms"] <= spread["latency_ms"] <= spread["latency_p90_ms"]
        assert spread["throughput_p10"] <= spread["throughput"] <= spread["throughput_p90"]
        assert all(math.isfinite(value) for value in spread.values()), name
        # The metrics file's numbers are the table's (no speed compared: tests are
        # independent of the machine's speed and of what else runs on it).
        assert spread["throughput"] == pytest.approx(result["throughput"])
        assert spread["latency_ms"] == pytest.approx(result["latency_ms"])
        assert float(row["speedup_vs_pytorch"]) == pytest.approx(result["speedup_vs_pytorch"])
        assert result["speedup_vs_pytorch"] == pytest.approx(
            result["throughput"] / metrics["pytorch"]["throughput"]
        )
    assert metrics["pytorch"]["speedup_vs_pytorch"] == pytest.approx(1.0)
    # Every runtime on the same threads.
    assert len({table[name]["threads"] for name in measured}) == 1
    for name in {"openvino_fp16", "openvino_int8"} & set(measured):
        assert float(table[name]["throughput_async"]) > 0
    # One measurement each, not one number copied to every runtime.
    assert len({metrics[name]["latency_ms"] for name in measured}) == len(measured)
    assert len({metrics[name]["throughput"] for name in measured}) == len(measured)


def test_benchmark_of_the_trained_pipeline(trained: Path) -> None:
    check_schema(trained, load_params(trained / paths.PARAMS).benchmark.batch_size)
    png = trained / paths.BENCHMARK_PNG
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_benchmark_app_cross_checks_our_numbers(trained_repo: Path) -> None:
    write_params(trained_repo, benchmark={"benchmark_app": True})
    params = load_params()
    benchmark.main(params)
    check_schema(trained_repo, params.benchmark.batch_size)
    table = rows(trained_repo)
    for name in ("openvino_fp16", "openvino_int8"):
        # benchmark_app ran on each IR and reported its images/s (the stage leaves the
        # cell empty when the tool is missing or fails). How close it comes to our own
        # number is a matter of speed, which depends on the machine: not tested.
        app = table[name]["benchmark_app_throughput"]
        assert app != "", f"{name}: benchmark_app gave no throughput"
        assert math.isfinite(float(app)) and float(app) > 0, name


def test_benchmark_without_an_int8_ir(trained_repo: Path) -> None:
    # convert ships no INT8 IR when every rung failed: the others are still measured.
    for file in (paths.IR_INT8, paths.IR_INT8.with_suffix(".bin")):
        file.unlink()
    png = trained_repo / paths.BENCHMARK_PNG
    png.unlink()
    params = load_params()
    benchmark.main(params)
    check_schema(trained_repo, params.benchmark.batch_size, RUNTIMES[:3])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_without_the_fp16_ir_is_one_line(trained_repo: Path) -> None:
    # Only the INT8 IR may be missing: the FP16 one is what convert always ships.
    paths.IR_FP16.unlink()
    with pytest.raises(StageError, match=r"^models/openvino/model\.xml: not found \(run") as e:
        benchmark.main(load_params())
    assert "\n" not in str(e.value)


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
