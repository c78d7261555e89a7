"""How much the benchmark stage's numbers move from run to run, per measuring time.

Run from the repository root:

    python benchmarks/benchmark_spread.py [--seconds 2.0,1.0,0.5] [--repeats 5]

It copies this working tree into a temporary git repository, runs `dvc repro convert` on
the default params there, then runs the benchmark stage `--repeats` times for each
`benchmark.seconds` value, the values taking turns so that a busy moment of the machine
hits all alike. For each value it prints the stage's wall time and, per runtime, the
median, min..max and coefficient of variation (stdev / mean) of the throughput and the
latency over the repeats, and the same for the INT8 / PyTorch speed-up: the number to keep
small is the spread, not the absolute values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from workspace import copy_tree, cpu_name, run

RUNTIMES = ("pytorch", "onnxruntime", "openvino_fp16", "openvino_int8")


def summary(values: list[float]) -> str:
    """median (min..max) and the coefficient of variation in percent."""
    cv = statistics.stdev(values) / statistics.mean(values) * 100 if len(values) > 1 else 0.0
    return f"{statistics.median(values):10.1f} ({min(values):.1f}..{max(values):.1f}) cv {cv:4.1f}%"


def main() -> None:
    """Measure and print the spread per measuring time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", default="2.0,1.0,0.5", help="benchmark.seconds values")
    parser.add_argument("--repeats", type=int, default=5, help="benchmark runs per value")
    parser.add_argument("--benchmark-app", action="store_true", help="keep the cross-check on")
    args = parser.parse_args()
    values = [float(v) for v in args.seconds.split(",")]
    dvc = str(Path(sys.executable).parent / "dvc")
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        copy_tree(repo)
        print(f"dvc repro convert: {run([dvc, 'repro', 'convert'], repo):.1f} s", flush=True)
        params_file = repo / "params.yaml"
        params = yaml.safe_load(params_file.read_text())
        results: dict[float, list[dict]] = {v: [] for v in values}
        walls: dict[float, list[float]] = {v: [] for v in values}
        for repeat in range(args.repeats):
            for seconds in values:
                params["benchmark"].update(seconds=seconds, benchmark_app=args.benchmark_app)
                params_file.write_text(yaml.safe_dump(params, sort_keys=False))
                walls[seconds].append(run([sys.executable, "-m", "stages", "benchmark"], repo))
                results[seconds].append(json.loads((repo / "metrics/benchmark.json").read_text()))
            print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
    print(f"\n{cpu_name()}, {args.repeats} repeats per value")
    for seconds in values:
        runs = results[seconds]
        print(f"\nbenchmark.seconds = {seconds}: stage wall {summary(walls[seconds])} s")
        for name in RUNTIMES:
            print(f"  {name:<14} img/s {summary([r[name]['throughput'] for r in runs])}")
            print(f"  {'':<14} ms    {summary([r[name]['latency_ms'] for r in runs])}")
        speedups = [r["openvino_int8"]["speedup_vs_pytorch"] for r in runs]
        print(f"  INT8 / PyTorch throughput {summary(speedups)}")


if __name__ == "__main__":
    main()
