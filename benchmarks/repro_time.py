"""Where a default `dvc repro` spends its time, stage by stage, against its training loop.

Run from the repository root:

    python benchmarks/repro_time.py [--repeats 3]

Each repeat copies this working tree into a fresh temporary git repository and runs
`dvc repro` there on the default params (bundled digits, MLflow on, into the copy's own
SQLite store), timestamping DVC's "Running stage" lines as they stream out. It prints each
stage's wall time, the whole run's, and the baseline measured in the same run: the
training loop's own seconds (`train_seconds` in `metrics/train.json`). Their ratio is
what an experiment costs beyond its training.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workspace import copy_tree, cpu_name

STAGE_LINE = re.compile(r"Running stage '([\w-]+)'")


def repro(repo: Path) -> dict[str, float]:
    """One `dvc repro` in `repo`: seconds per stage and in all."""
    dvc = str(Path(sys.executable).parent / "dvc")
    started = time.perf_counter()
    marks: list[tuple[str, float]] = []
    with subprocess.Popen(
        [dvc, "repro"], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        tail: collections.deque[str] = collections.deque(maxlen=40)
        for line in proc.stdout:
            tail.append(line)
            if found := STAGE_LINE.search(line):
                marks.append((found.group(1), time.perf_counter()))
    total = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit("error: dvc repro failed:\n" + "".join(tail))
    ends = [at for _, at in marks[1:]] + [started + total]
    times = {name: end - at for (name, at), end in zip(marks, ends, strict=True)}
    times["dvc repro"] = total
    times["training loop"] = json.loads((repo / "metrics/train.json").read_text())["train_seconds"]
    accuracy = json.loads((repo / "metrics/evaluate.json").read_text())["accuracy"]
    times["test accuracy"] = accuracy
    return times


def main() -> None:
    """Run, then print the median of each stage's time over the repeats."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh `dvc repro` runs")
    parser.add_argument("--keep", type=Path, help="keep the last run's repository here")
    args = parser.parse_args()
    runs = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            repo = copy_tree(Path(tmp) / "repo")
            runs.append(repro(repo))
            if args.keep and repeat == args.repeats - 1:
                shutil.copytree(repo, args.keep)
        print(
            f"repeat {repeat + 1}/{args.repeats}: "
            + ", ".join(f"{k} {v:.3g}" for k, v in runs[-1].items()),
            flush=True,
        )
    print(f"\n{cpu_name()}, median of {args.repeats} fresh `dvc repro` runs (min..max)")
    for name in runs[0]:
        values = [r[name] for r in runs]
        unit = "" if name == "test accuracy" else " s"
        middle, low, high = statistics.median(values), min(values), max(values)
        print(f"  {name:<14} {middle:8.3g}{unit} ({low:.3g}..{high:.3g})")
    ratios = [r["dvc repro"] / r["training loop"] for r in runs]
    print(f"  dvc repro / training loop: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
