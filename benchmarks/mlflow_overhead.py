"""What MLflow costs the train stage: time the training process spends in tracker calls.

Runs the real train stage (params.yaml as it is: the bundled digits, all epochs) in a tmp
copy of the repository, each training in a fresh process so that starting MLflow counts,
in three modes taking turns:

- background: the pipeline's tracker (a helper process talks to MLflow);
- inprocess:  the same calls made in the training process (MLflow imported there);
- none:       a tracker that does nothing, the baseline for the wall-clock comparison.

For the tracked modes every tracker call, property and constructor is timed at its
outermost level: that time over the rest of the stage is the overhead held to the 2%
budget. The helper's CPU time is reported too: on a machine whose every core trains, it
is what the helper can take from training at most.

    python benchmarks/mlflow_overhead.py [--epochs N] [--runs 2] [--modes background,none]
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python benchmarks/mlflow_overhead.py

The first training makes a fresh SQLite store (a one-time cost) and is not counted.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPY = ("stages", "dvc.yaml", "params.yaml", "pyproject.toml")
MODES = ("background", "inprocess", "none")
BUDGET = 0.02

log = logging.getLogger("mlflow_overhead")


class NoTracker:
    """The tracker interface doing nothing (the baseline)."""

    run_id = known_run_id = None
    healthy = True

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def __getattr__(self, name):
        return lambda *args, **kwargs: set() if name == "logged_steps" else None


def instrument(cls: type, spent: dict[str, float]) -> None:
    """Time every public method and property of cls (and __init__/__exit__) into `spent`."""
    depth = [0]

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            depth[0] += 1
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:  # a call made by another tracker call is in its time
                    spent[name] = spent.get(name, 0.0) + time.perf_counter() - started

        return wrapper

    for name, member in list(vars(cls).items()):
        if name.startswith("_") and name not in ("__init__", "__exit__"):
            continue
        if isinstance(member, property):
            setattr(cls, name, property(timed(name, member.fget)))
        elif callable(member):
            setattr(cls, name, timed(name, member))


def child(mode: str, epochs: int | None) -> None:
    """One train stage in this process (cwd: the tmp repo); prints a JSON summary."""
    from stages import tracking, train
    from stages.params import load_params

    spent: dict[str, float] = {}
    if mode == "none":
        tracking.BackgroundTracker = NoTracker
    elif mode == "inprocess":
        tracking.BackgroundTracker = tracking.Tracker
    if mode != "none":
        instrument(tracking.BackgroundTracker, spent)
    params = load_params()
    if epochs:
        update = {"train": params.train.model_copy(update={"epochs": epochs})}
        params = params.model_copy(update=update)
    started = time.perf_counter()
    train.main(params)
    wall = time.perf_counter() - started
    own = resource.getrusage(resource.RUSAGE_SELF)
    helper = resource.getrusage(resource.RUSAGE_CHILDREN)
    metrics = json.loads(Path("metrics/train.json").read_text())
    summary = {
        "wall": wall,
        "train_seconds": metrics["train_seconds"],
        "epochs": metrics["epochs"],
        "spent": spent,
        "cpu": own.ru_utime + own.ru_stime,
        "helper_cpu": helper.ru_utime + helper.ru_stime,
    }
    print(json.dumps(summary))


def run_child(repo: Path, mode: str, epochs: int | None, env: dict[str, str]) -> dict:
    """One training in a fresh process; its summary."""
    (repo / "models/checkpoint.pt").unlink(missing_ok=True)  # a resumed run trains nothing
    args = [sys.executable, str(Path(__file__).resolve()), "--child", mode]
    if epochs:
        args += ["--epochs", str(epochs)]
    # The tmp copy's own stages package, whatever the interpreter's path holds.
    env = {**env, "PYTHONPATH": str(repo)}
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"train ({mode}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_repo(dest: Path, env: dict[str, str]) -> None:
    """A copy of the project with prepared data."""
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    done = subprocess.run(
        [sys.executable, "-m", "stages.prepare"],
        cwd=dest,
        env={**env, "PYTHONPATH": str(dest)},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"prepare failed:\n{done.stderr[-3000:]}")


def report(mode: str, results: list[dict], baseline: float | None) -> float | None:
    """Log one mode's medians; return its overhead ratio (None for the baseline)."""
    wall = statistics.median(r["wall"] for r in results)
    loop = statistics.median(r["train_seconds"] for r in results)
    line = f"{mode:>10}: stage {wall:6.2f} s, training loop {loop:6.2f} s"
    if baseline:
        line += f", wall {100 * (wall / baseline - 1):+5.1f}% vs none"
    if mode == "none":
        log.info("%s", line)
        return None
    tracker = statistics.median(sum(r["spent"].values()) for r in results)
    ratio = tracker / (wall - tracker)
    helper = statistics.median(r["helper_cpu"] for r in results)
    cpu = statistics.median(r["cpu"] for r in results)
    log.info(
        "%s; in tracker calls %.3f s = %.2f%% of the rest; helper CPU %.2f s = %.1f%% of "
        "the training process's %.1f CPU s",
        line,
        tracker,
        100 * ratio,
        helper,
        100 * helper / cpu,
        cpu,
    )
    calls: dict[str, list[float]] = {}
    for r in results:
        for name, seconds in r["spent"].items():
            calls.setdefault(name, []).append(seconds)
    top = sorted(calls.items(), key=lambda kv: -statistics.median(kv[1]))[:6]
    log.info("%12s%s", "", ", ".join(f"{n} {statistics.median(s):.3f}" for n, s in top))
    return ratio


def main() -> None:
    """Train in each mode in turns and report the overhead."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--runs", type=int, default=2, help="trainings per mode")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.epochs)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    modes = [m for m in args.modes.split(",") if m]
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_ROOT", "PYTHONPATH")}
    log.info("store: %s", env.get("MLFLOW_TRACKING_URI") or "SQLite in the tmp repository")
    with tempfile.TemporaryDirectory(prefix="mlflow-overhead-") as tmp:
        repo = Path(tmp)
        make_repo(repo, env)
        run_child(repo, modes[0], args.epochs, env)  # makes the store: a one-time cost
        results: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(args.runs):
            for mode in modes:  # taking turns, so drift of the machine hits all alike
                results[mode].append(run_child(repo, mode, args.epochs, env))
    baseline = statistics.median(r["wall"] for r in results["none"]) if "none" in modes else None
    ratios = {mode: report(mode, results[mode], baseline) for mode in modes}
    if ratios.get("background") is not None:
        ratio = ratios["background"]
        verdict = "within" if ratio <= BUDGET else "ABOVE"
        log.info(
            "MLflow overhead of the train stage: %.2f%%, %s the %.0f%% budget",
            100 * ratio,
            verdict,
            100 * BUDGET,
        )


if __name__ == "__main__":
    main()
