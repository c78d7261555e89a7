"""What a sweep's trial costs beyond its training, and the wall time of a small sweep.

    python benchmarks/sweep_cost.py [--trials 3] [--parallel-trials 6]

In a throwaway copy of this repository (digits prepared, committed): first a sweep of
`--trials` trials one at a time, each trial's wall time (Optuna's record of its
`dvc exp run`) minus its training loop (`train_seconds` in its metrics/train.json); then a
sweep of `--parallel-trials` trials with --jobs 2, timed whole. The space is the issue's:
train.lr log-uniform 1e-4..1e-2, train.batch_size in [32, 64, 128], 3 epochs, model cnn;
the other sweep settings are params.yaml's defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from workspace import copy_tree, cpu_name, run

SPACE = {
    "train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
    "train.batch_size": [32, 64, 128],
    "train.epochs": [3],
    "model.name": ["cnn"],
}


def sweep(repo: Path, study: str, trials: int, jobs: int) -> float:
    """Wall seconds of `vision-sweep` for this study."""
    command = [str(Path(sys.executable).parent / "vision-sweep"), "--study", study]
    return run([*command, "--trials", str(trials), "--jobs", str(jobs)], repo)


def trial_costs(repo: Path, study: str) -> list[tuple[float, float]]:
    """(trial wall seconds, training-loop seconds) of each finished trial of a study."""
    import optuna

    from stages.sweep import driver

    found = optuna.load_study(study_name=study, storage=f"sqlite:///{repo / 'optuna.db'}")
    out = []
    with contextlib.chdir(repo):  # where the sweep's experiments are
        for trial in found.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
            ref = driver.exp_ref(trial.user_attrs["experiment"])
            train = driver.exp_metrics(ref, "train")["train/train_seconds"]
            out.append((trial.user_attrs["seconds"], train))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3, help="trials of the --jobs 1 sweep")
    parser.add_argument("--parallel-trials", type=int, default=6, help="trials with --jobs 2")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        repo = copy_tree(Path(tmp) / "repo")
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["sweep"]["space"] = SPACE
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run(["dvc", "repro", "prepare"], repo)
        run(["git", "add", "-A"], repo)
        run(["git", "commit", "-qm", "prepared"], repo)

        sweep(repo, "one-at-a-time", args.trials, 1)
        costs = trial_costs(repo, "one-at-a-time")
        for wall, train in costs:
            print(f"trial: {wall:5.1f} s wall, {train:4.1f} s training, {wall - train:4.1f} s else")
        overhead = statistics.median(wall - train for wall, train in costs)
        print(f"--jobs 1: median overhead per trial {overhead:.1f} s (target <= 15 s)")

        started = time.perf_counter()
        sweep(repo, "two-at-a-time", args.parallel_trials, 2)
        wall = time.perf_counter() - started
        print(
            f"--jobs 2: {args.parallel_trials} trials in {wall:.0f} s "
            f"({wall / args.parallel_trials:.1f} s per trial; target <= 180 s for 6)"
        )


if __name__ == "__main__":
    main()
