"""Stage benchmark: PyTorch eager, ONNX Runtime and OpenVINO side by side in one process."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from stages.core import logs, paths, plots
from stages.core.errors import StageError
from stages.core.outputs import write_csv, write_json
from stages.core.params import Benchmark, Params
from stages.data import datasets
from stages.models import runtimes
from stages.tracking import helper

log = logging.getLogger(__name__)
ROUNDS = 3  # each runtime measured in turns, so drift of the machine hits all alike


def timed_calls(fn: Callable[[], object], seconds: float) -> list[float]:
    """Call fn repeatedly for about `seconds` (at least 5 calls); each call's duration."""
    durations: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(durations) < 5:
        started = time.perf_counter()
        fn()
        durations.append(time.perf_counter() - started)
    return durations


def summarize(latencies: list[float], batch_times: list[float], batch: int) -> dict[str, float]:
    """Median latency and throughput, with the 10th-90th percentile spread of each."""
    lat_ms = np.array(latencies) * 1000
    per_second = batch / np.array(batch_times)
    return {
        "latency_ms": float(np.median(lat_ms)),
        "latency_p10_ms": float(np.percentile(lat_ms, 10)),
        "latency_p90_ms": float(np.percentile(lat_ms, 90)),
        "throughput": float(np.median(per_second)),
        "throughput_p10": float(np.percentile(per_second, 10)),
        "throughput_p90": float(np.percentile(per_second, 90)),
    }


def openvino_async(xml: Path, batch: np.ndarray, threads: int, seconds: float) -> float:
    """Images/s with OpenVINO's THROUGHPUT hint and as many requests as it suggests."""
    import openvino as ov

    compiled = runtimes.openvino_model(xml, threads, hint="THROUGHPUT")
    jobs = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
    queue = ov.AsyncInferQueue(compiled, jobs)
    for _ in range(jobs):  # warm-up
        queue.start_async({0: batch})
    queue.wait_all()
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        queue.start_async({0: batch})
        done += 1
    queue.wait_all()
    return done * len(batch) / (time.perf_counter() - started)


def benchmark_app(xml: Path, shape: tuple[int, ...], threads: int, seconds: float) -> float | str:
    """OpenVINO's benchmark_app images/s for the same IR, shape and threads (a cross-check)."""
    tool = shutil.which("benchmark_app", path=str(Path(sys.executable).parent))
    if tool is None:
        return ""
    # Synchronous, one stream, our thread count: the same setting as our own measurement.
    command = [
        tool,
        "-m",
        str(xml),
        "-d",
        "CPU",
        "-hint",
        "none",
        "-api",
        "sync",
        "-nstreams",
        "1",
        "-nthreads",
        str(threads),
        "-t",
        str(max(1, round(seconds))),
        "-shape",
        "[" + ",".join(map(str, shape)) + "]",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    found = re.search(r"Throughput:\s+([\d.]+)\s+FPS", done.stdout)
    if done.returncode != 0 or not found:
        log.warning("benchmark_app failed on %s: %s", xml, (done.stderr or done.stdout)[-200:])
        return ""
    return float(found.group(1))


def inputs(test: datasets.Split, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Real test images: one for latency, batch_size (repeating if needed) for throughput."""
    index = torch.arange(batch_size) % len(test)
    batch = datasets.to_model_input(test.images[index]).numpy()
    return batch[:1].copy(), batch


def measure(
    models: dict[str, runtimes.Runtime], one: np.ndarray, batch: np.ndarray, cfg: Benchmark
) -> dict[str, dict[str, float]]:
    """Latency at batch 1 and throughput at batch N, runtimes taking turns."""
    latencies: dict[str, list[float]] = {name: [] for name in models}
    batch_times: dict[str, list[float]] = {name: [] for name in models}
    for run in models.values():
        for _ in range(cfg.warmup_iterations):
            run(one)
            run(batch)
    share = cfg.seconds / ROUNDS
    for _ in range(ROUNDS):
        for name, run in models.items():
            latencies[name] += timed_calls(lambda run=run: run(one), share)
            batch_times[name] += timed_calls(lambda run=run: run(batch), share)
    return {name: summarize(latencies[name], batch_times[name], len(batch)) for name in models}


# The model file each runtime runs, in the order of the tables.
FILES = {
    "pytorch": paths.MODEL,
    "onnxruntime": paths.ONNX,
    "openvino_fp16": paths.IR_FP16,
    "openvino_int8": paths.IR_INT8,
}
# convert ships no INT8 IR when none passed its accuracy gate (FP16 is then deployable).
OPTIONAL = ("openvino_int8",)


def present_files() -> dict[str, Path]:
    """The model files to measure: every one of FILES, less an optional one not written."""
    missing = [name for name, file in FILES.items() if not file.exists()]
    required = [FILES[name].as_posix() for name in missing if name not in OPTIONAL]
    if required:
        raise StageError(f"{', '.join(required)}: not found (run the pipeline up to convert)")
    for name in missing:
        log.info("%s: %s not written (convert shipped no INT8): not measured", name, FILES[name])
    return {name: file for name, file in FILES.items() if name not in missing}


def main(params: Params) -> None:
    """Measure every model file on the same inputs and threads; write benchmark.json."""
    logs.setup("benchmark")
    cfg = params.benchmark
    threads = runtimes.cores(cfg.threads)
    with helper.Recorder("benchmark", params) as recorder:
        files = present_files()
        one, batch = inputs(datasets.load_split("test"), cfg.batch_size)
        models = {name: runtimes.load(file, threads) for name, file in files.items()}
        recorder.ready()  # MLflow's start-up done: nothing else on the CPU while timing
        results = measure(models, one, batch, cfg)
        for name, xml in files.items():
            if xml.suffix != ".xml":  # async and benchmark_app figures are OpenVINO's own
                continue
            results[name]["throughput_async"] = openvino_async(xml, batch, threads, cfg.seconds)
            if cfg.benchmark_app:
                results[name]["benchmark_app_throughput"] = benchmark_app(
                    xml, batch.shape, threads, cfg.seconds
                )
        base = results["pytorch"]["throughput"]
        for result in results.values():
            result["speedup_vs_pytorch"] = result["throughput"] / base
        # The numbers people compare; the spreads and cross-checks go to the CSV.
        write_json(
            paths.BENCHMARK_METRICS,
            {
                name: {key: r[key] for key in ("throughput", "latency_ms", "speedup_vs_pytorch")}
                for name, r in results.items()
            },
        )
        write_csv(paths.BENCHMARK_PLOT, table(results, threads, cfg.batch_size))
        plots.save_runtimes(results, paths.BENCHMARK_PNG)
    log.info("%-14s %12s %14s %9s", "runtime", "latency ms", "images/s", "speedup")
    for name, r in results.items():
        log.info(
            "%-14s %12.3f %14.0f %8.2fx",
            name,
            r["latency_ms"],
            r["throughput"],
            r["speedup_vs_pytorch"],
        )


def table(results: dict[str, dict[str, float]], threads: int, batch_size: int) -> list[dict]:
    """One row per runtime: its file, size and precision, every measured number."""
    columns = (
        "throughput", "throughput_p10", "throughput_p90", "latency_ms", "latency_p10_ms",
        "latency_p90_ms", "speedup_vs_pytorch", "throughput_async", "benchmark_app_throughput",
    )  # fmt: skip
    rows = []
    for name, result in results.items():
        file = FILES[name]
        precision = runtimes.openvino_precision(file) if file.suffix == ".xml" else "f32"
        row = {
            "runtime": name,
            "file": file.as_posix(),
            "size_mb": runtimes.size_mb(file),
            "precision": precision,
            "threads": threads,
            "batch_size": batch_size,
        }
        rows.append(row | {key: result.get(key, "") for key in columns})
    return rows
