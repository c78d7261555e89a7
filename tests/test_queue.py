"""Queued DVC experiments run in temporary copies of the repository, two at once, and
must land in the user's MLflow store beside the `dvc repro` run, without lock errors;
then `vision-compare` ranks those real runs."""

from __future__ import annotations

import contextlib
import csv
import json
import re
import time
from pathlib import Path

import pytest

from helpers.processes import wait_for
from helpers.repos import (
    built_once,
    client_for,
    clone,
    commit_all,
    git,
    run_dvc,
    run_script,
    trim_pipeline,
)

pytestmark = pytest.mark.slow

BASE_RATE = "0.002"
RATES = ("0.001", "0.004")
SORT = "train/val_accuracy"  # the queued experiments end at train
# `dvc queue status`: task id, experiment name, created, status
ROW = re.compile(r"^\s*[0-9a-f]{7}\s+(\S+)\s+.*?\s(Queued|Running|Success|Failed)\s*$")


def queue_rows(repo: Path) -> list[tuple[str, str]]:
    """(experiment name, status) of every task `dvc queue status` lists."""
    done = run_dvc(repo, "queue", "status")
    assert done.returncode == 0, done.stderr
    return [m.groups() for m in map(ROW.match, done.stdout.splitlines()) if m]


@pytest.fixture(scope="session")
def queued(pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """The reproduced repo (its run in the store) after two queued experiments ran, two
    at a time."""
    with built_once(tmp_path_factory, "queue") as (folder, build):
        if build:
            rows = run_queue(clone(pipeline, folder / "repo"))
            (folder / "rows.json").write_text(json.dumps(rows))
        rows = [tuple(row) for row in json.loads((folder / "rows.json").read_text())]
    return folder / "repo", rows


def run_queue(repo: Path) -> list[tuple[str, str]]:
    """Two experiments queued and run two at a time; (name, status) of each."""
    # Two trainings at once, each making its run and logging every epoch, are what a
    # shared store must survive; the later stages reopen the run the same way (under the
    # same lock), so leaving them out keeps two concurrent pipelines on two cores short.
    trim_pipeline(repo, "train")
    commit_all(repo)
    for rate in RATES:
        # Two epochs of every step each: the two runs must overlap by more than the
        # queue's staggered start-ups (checked below). One thread each: two at a time
        # share the two cores.
        sets = ("-S", f"train.lr={rate}", "-S", "train.epochs=2", "-S", "train.max_steps=0")
        sets += ("-S", "runtime.threads=1")
        queued = run_dvc(repo, "exp", "run", "--queue", *sets)
        assert queued.returncode == 0, queued.stderr
    looked = [time.monotonic()]

    def settled() -> list[tuple[str, str]] | None:
        # A finished experiment is a git ref: cheap to look for. `dvc queue status` (a dvc
        # process, CPU the experiments need) once both are in, or every 30 s to see a failure.
        refs = git(repo, "for-each-ref", "--format=%(refname)", "refs/exps/").split()
        finished = len([r for r in refs if r.count("/") > 3]) == 2  # not the queue's own
        if not finished and time.monotonic() - looked[0] < 30:
            return None
        looked[0] = time.monotonic()
        rows = queue_rows(repo)
        done = len(rows) == 2 and all(s in ("Success", "Failed") for _, s in rows)
        return rows if done else None

    try:
        started = run_dvc(repo, "queue", "start", "-j", "2")
        assert started.returncode == 0, started.stderr
        # The timeout is a hang guard only.
        rows = wait_for(settled, timeout=900, what="the queued experiments", poll=0.5)
    finally:
        with contextlib.suppress(Exception):
            run_dvc(repo, "queue", "stop", timeout=120)
    return rows


def test_two_queued_experiments_land_in_the_user_store(queued: tuple[Path, list]) -> None:
    repo, rows = queued
    names = {name for name, _ in rows}
    for name, status in rows:
        logs = run_dvc(repo, "queue", "logs", name).stdout
        assert status == "Success", logs[-3000:]
        assert "database is locked" not in logs
        assert "MLflow logging failed" not in logs

    client = client_for(repo)
    experiment = client.get_experiment_by_name("vision-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3
    queued_runs = [r for r in runs if r.data.tags.get("dvc.experiment")]
    assert {r.data.tags["dvc.experiment"] for r in queued_runs} == names
    assert {r.data.params["train.lr"] for r in queued_runs} == set(RATES)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert "train/val_accuracy" in run.data.metrics
        history = client.get_metric_history(run.info.run_id, "train/loss")
        epochs = int(run.data.params["train.epochs"])
        assert sorted(m.step for m in history) == list(range(1, epochs + 1))
    # Two at a time: the later run opened before the earlier one was closed (the runs'
    # start and end times are when each training opened and finished its run).
    first, later = sorted(queued_runs, key=lambda r: r.info.start_time)
    assert later.info.start_time < first.info.end_time, (
        f"one after the other: {first.info.run_name} ended at {first.info.end_time}, "
        f"{later.info.run_name} started at {later.info.start_time}"
    )
    for run in queued_runs:
        assert run.info.run_name == run.data.tags["dvc.experiment"]
        # artifacts live where the experiment keeps them (beside the db it was made in),
        # not in the temporary copy the experiment ran in, which DVC deletes
        assert run.info.artifact_uri.startswith(experiment.artifact_location)
        assert "/.dvc/tmp/" not in run.info.artifact_uri
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))


def test_compare_ranks_the_runs(
    queued: tuple[Path, list],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    repo, _ = queued
    table_csv, table_md = tmp_path / "runs.csv", tmp_path / "runs.md"
    args = ("--sort", SORT, "--csv", str(table_csv), "--markdown", str(table_md))
    done = run_script(repo, "vision-compare", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 5  # header, separator, one row per run
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert "train.lr" in header  # the param that differs between the runs
    assert "train.batch_size" not in header  # the same in all: not a column
    assert {SORT, "train/images_per_second"} <= set(header)
    assert table_md.read_text() == done.stdout

    rows = list(csv.DictReader(table_csv.open()))
    assert {r["train.lr"] for r in rows} == {BASE_RATE, *RATES}
    accuracies = [float(r[SORT]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    best = rows[0]["run_id"]
    assert lines[2].startswith(f"| {best[:8]} |")

    # The other options, in this process (the command line is the same main()).
    from stages.core.errors import StageError
    from stages.tools import compare

    monkeypatch.chdir(repo)
    capsys.readouterr()
    # Crowning is the promote stage's, behind its gates: the old flag says where it went.
    with pytest.raises(StageError, match=r"^compare --register is gone"):
        compare.main(["--register", "digits-classifier"])
    compare.main(["--sort", SORT, "--ascending"])
    top = {r["run"] for r in rows if float(r[SORT]) == accuracies[0]}
    assert capsys.readouterr().out.strip().splitlines()[-1].split("|")[1].strip() in top
    with pytest.raises(StageError, match=r"^compare: no run has"):
        compare.main(["--sort", "no/such_metric"])
