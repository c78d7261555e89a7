"""`vision-sweep`: a declared search on Optuna; each trial a DVC experiment and one MLflow run.

    vision-sweep [--trials N] [--jobs J] [--study NAME] [--storage URL]
                 [--timeout S] [--apply] [--clean]

The `sweep` section of params.yaml says what to search. Optuna (its sampler, pruner,
storage and stale-trial heartbeat) decides which trial runs next; each trial is
`dvc exp run --temp -n <study>-<number> -S <its params> <until>`, so it runs in a temporary
copy of the repository, lands as a DVC experiment and, through the stages, as one MLflow
run tagged with its study and trial under the sweep's parent run. The study lives in an
Optuna storage (optuna.db beside params.yaml, or a PostgreSQL URL shared by several
machines): the same command started again continues where the study stands.

While training as a trial, the train stage reports each epoch's validation score to the
study (sweep/trials.py) and ends early, exit 0 and `pruned: true` in metrics/train.json,
when the pruner says so."""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
from typing import Any

import yaml

from stages.core import logs, paths
from stages.core.entry import console_script
from stages.core.errors import StageError
from stages.core.params import load_params
from stages.sweep.driver import Driver, TrialFailed, dvc, exp_ref
from stages.sweep.studies import STORAGE_ENV, best_trial, finished
from stages.tracking.sweep_run import Tracker

log = logging.getLogger(__name__)


def rows(study, metric: str) -> list[dict[str, Any]]:
    """One row per trial: number, the params that differ between trials, metric, state."""
    trials = study.get_trials(deepcopy=False)
    varied = sorted(
        {k for t in trials for k in t.params if len({str(u.params.get(k)) for u in trials}) > 1}
    )
    return [
        {
            "trial": t.number,
            **{k: t.params.get(k) for k in varied},
            # A pruned trial's value is its last validation score: not the metric.
            metric: t.value if t.state.name == "COMPLETE" else None,
            "seconds": t.user_attrs.get("seconds"),
            "state": t.state.name.lower(),
            "experiment": t.user_attrs.get("experiment", ""),
        }
        for t in trials
    ]


def print_table(table: list[dict[str, Any]]) -> None:
    import pandas as pd

    from stages.tools.compare import markdown

    frame = pd.DataFrame(table)
    if frame.empty:
        return
    sys.stdout.write(markdown(frame.rename(columns={"experiment": "run_id"})))
    sys.stdout.flush()


def clean(study, keep: str | None) -> None:
    """`dvc exp remove` every experiment of the study but the best one."""
    names = [t.user_attrs.get("experiment") for t in study.get_trials(deepcopy=False)]
    gone = [n for n in names if n and n != keep and exp_ref(n)]
    if gone:
        dvc("exp", "remove", *gone)
    print(f"removed {len(gone)} experiment(s) of {study.study_name}; kept {keep}", file=sys.stderr)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vision-sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, help="finished trials the study should have")
    parser.add_argument("--jobs", type=int, help="trials at once on this machine")
    parser.add_argument("--study", help="study name (default: from the sweep section)")
    parser.add_argument("--storage", help=f"Optuna storage URL (or ${STORAGE_ENV})")
    parser.add_argument("--timeout", type=float, help="start no trial after this many seconds")
    parser.add_argument(
        "--apply", action="store_true", help="apply the best trial and run the rest of dvc.yaml"
    )
    parser.add_argument(
        "--clean", action="store_true", help="dvc exp remove the study's other experiments"
    )
    args = parser.parse_args(argv)
    for flag in ("trials", "jobs", "timeout"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive")
    return args


def main(argv: list[str]) -> None:
    """Run the study up to its total of finished trials; the table; apply and clean."""
    logs.setup("sweep")
    args = parse_args(argv)
    params = load_params()
    raw = yaml.safe_load(paths.PARAMS.read_text(encoding="utf-8"))
    driver = Driver(params, raw, args)
    study = driver.study()
    driver.fail_orphans()
    tracker = Tracker(params) if params.mlflow.enabled else None
    done = finished(study)
    todo = max(driver.total - done, 0)
    if todo and tracker is not None:
        driver.parent = tracker.parent(driver.name, driver.spec)
        driver.tracker = tracker
    log.info(
        "study %s in %s: %d of %d trials finished; %d to run, %d at a time",
        driver.name,
        re.sub(r"//[^@/]*@", "//***@", driver.url),
        done,
        driver.total,
        todo,
        driver.jobs,
    )
    status = "FINISHED"
    try:
        if todo:
            import optuna
            from optuna.trial import TrialState

            counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            study.optimize(
                driver.objective,
                n_trials=todo,
                n_jobs=driver.jobs,
                timeout=args.timeout,
                catch=(TrialFailed,),
                callbacks=[
                    driver.report,
                    # Other machines' running trials count too: none starts past the total.
                    optuna.study.MaxTrialsCallback(driver.total, states=counted),
                ],
            )
    except KeyboardInterrupt:
        status = "KILLED"
        raise StageError(
            f"sweep: interrupted with {finished(study)} of {driver.total} trials finished; "
            "run the same command to continue"
        ) from None
    finally:
        table = rows(study, driver.spec.metric)
        if driver.parent:
            with contextlib.suppress(Exception):
                tracker.finish(driver.parent, study, table, status)
    print_table(table)
    best = best_trial(study)
    if best is None:
        raise StageError(f"sweep: study {driver.name} has no completed trial")
    exp = best.user_attrs["experiment"]
    log.info(
        "best: trial %d (%s %s = %.4f), DVC experiment %s",
        best.number,
        driver.spec.direction,
        driver.spec.metric,
        best.value,
        exp,
    )
    if args.apply:
        dvc("exp", "apply", exp)
        dvc("repro")
    if args.clean:
        clean(study, exp)


cli = console_script(main)


if __name__ == "__main__":
    cli()
