"""Sweeps (`vision-sweep`): every trial a DVC experiment and one MLflow run under
the sweep's parent, the study in Optuna's optuna.db; finished trials never run again, a
killed sweep resumes, the pruner stops a hopeless trial, and bad input stops at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers.repos import (
    child_env,
    client_for,
    clone,
    commit_all,
    console_script,
    git,
    make_repo,
    run_dvc,
    run_script,
    trim_pipeline,
    write_params,
)
from stages.core.errors import StageError
from stages.core.params import load_params
from stages.sweep import driver, space
from stages.tools import sweep

# One epoch on the digits: a trial costs its start-ups and a couple of seconds' training.
SWEEP = {
    "metric": "evaluate/accuracy",
    "direction": "maximize",
    "trials": 2,
    "jobs": 2,
    "until": "evaluate",
    "sampler": "tpe",
    "pruner": "none",
    "startup_trials": 1,
    "seed": 7,
    "space": {
        "train.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
        "train.batch_size": [32, 64],
        "train.epochs": [1],
        "train.warmup_epochs": [0],
    },
}

# Trials up to train only, judged by its validation accuracy: no evaluate stage to run.
TRAIN_ONLY = {"metric": "train/val_accuracy", "until": "train"}


def set_sweep(repo: Path, **changes: Any) -> dict[str, Any]:
    """repo/params.yaml with its sweep section replaced by SWEEP plus `changes`."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["sweep"] = {**SWEEP, **changes}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params["sweep"]


def run_sweep(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run_script(repo, "vision-sweep", *args)


def sweep_here(repo: Path, capfd: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """`vision-sweep ARGS` in this process, as its exit code and output: the
    driver's own start-up is not what these tests are about (its trials are processes
    either way; the killed driver and the one-line errors are run as processes)."""
    capfd.readouterr()
    old = Path.cwd()
    os.chdir(repo)
    try:
        sweep.main(list(args))
        code = 0
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    finally:
        os.chdir(old)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["vision-sweep", *args], code, out, err)


def load_study(repo: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{repo / 'optuna.db'}")


def experiments(repo: Path) -> dict[str, str]:
    """DVC experiment name -> its git ref."""
    refs = git(repo, "for-each-ref", "--format=%(refname)", "refs/exps/").split()
    return {ref.rsplit("/", 1)[-1]: ref for ref in refs if ref.count("/") > 3}


def shown(repo: Path, ref: str, file: str) -> dict[str, Any]:
    """A file of an experiment, from DVC's cache (every output is cached)."""
    import dvc.api

    return json.loads(dvc.api.read(file, repo=str(repo), rev=ref))


def sweep_runs(repo: Path, study: str) -> tuple[Any, list]:
    """The study's parent run and its trials' runs in the repo's MLflow store."""
    client = client_for(repo)
    found = client.search_runs(
        [client.get_experiment_by_name("vision-pipeline").experiment_id],
        f"tags.`sweep.study` = '{study}'",
    )
    parents = [r for r in found if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 1, [r.data.tags for r in found]
    return parents[0], [r for r in found if r.data.tags.get("sweep.role") != "parent"]


@pytest.mark.slow
def test_sweep_trials_are_experiments_and_runs(
    pipeline: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """2 trials at once: 2 DVC experiments, 2 MLflow runs under one parent, 2 Optuna
    trials whose values are the runs' metrics; run again, nothing runs; --apply runs the
    rest of the pipeline on the best, --clean removes the others."""
    repo = clone(pipeline, tmp_path / "repo")
    # `--apply` runs the stages after `until` on the best trial: export alone shows that as
    # well as four stages would (the whole pipeline is test_pipeline's).
    trim_pipeline(repo, "export")
    commit_all(repo)
    # Packaging the MLflow models (about 8 s of CPU in --apply's export) is test_pipeline's
    # to check; a setting, so it reruns nothing.
    write_params(repo, mlflow={"log_models": False})
    spec = set_sweep(repo)
    name = space.study_name(load_params(repo / "params.yaml").sweep)

    done = sweep_here(repo, capfd)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = load_study(repo, name).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    exps = experiments(repo)
    parent, runs = sweep_runs(repo, name)
    assert len(runs) == 2
    by_trial = {int(r.data.tags["sweep.trial"]): r for r in runs}
    for trial in trials:
        exp = f"{name}-{trial.number}"
        assert shown(repo, exps[exp], "metrics/evaluate.json")["accuracy"] == trial.value
        params = yaml.safe_load(git(repo, "show", f"{exps[exp]}:params.yaml"))
        assert params["train"]["lr"] == pytest.approx(trial.params["train.lr"])
        assert params["train"]["batch_size"] == trial.params["train.batch_size"]
        run = by_trial[trial.number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["sweep.state"] == "complete"
        assert run.info.run_name == exp
        assert run.data.metrics["evaluate/accuracy"] == pytest.approx(trial.value)
        assert float(run.data.params["train.lr"]) == pytest.approx(trial.params["train.lr"])
    files = {a.path for a in client_for(repo).list_artifacts(parent.info.run_id, "sweep")}
    assert files == {
        "sweep/optimization_history.png",
        "sweep/param_importances.png",
        "sweep/trials.csv",
    }
    # Optuna's choice: with 360 test images two trials can tie, and either may be "best".
    best = load_study(repo, name).best_trial
    assert best.value == max(t.value for t in trials)
    assert parent.data.tags["sweep.best_trial"] == str(best.number)
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| trial |") and "state" in table[0] and len(table) == 4
    # Two at a time, each on its own core.
    logs = [(repo / ".dvc/tmp/sweep" / f"{name}-{t.number}.log").read_text() for t in trials]
    assert all("Ran experiment(s)" in text for text in logs)
    # At once: the later trial's run opened before the earlier one's was closed (a trial's
    # run spans its stages, train to `until`; --apply below reopens the best one).
    first, later = sorted(runs, key=lambda r: r.info.start_time)
    assert later.info.start_time < first.info.end_time, (
        f"one after the other: {first.info.run_name} ended at {first.info.end_time}, "
        f"{later.info.run_name} started at {later.info.start_time}"
    )

    again = sweep_here(repo, capfd)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 of 2 trials finished; 0 to run" in again.stderr
    assert len(load_study(repo, name).get_trials()) == 2 and experiments(repo) == exps
    # The sweep section (and the mlflow one) is read by no stage: nothing to rerun.
    assert "up to date" in run_dvc(repo, "status").stdout

    applied = sweep_here(repo, capfd, "--apply", "--clean")
    assert applied.returncode == 0, applied.stderr[-3000:]
    workspace = yaml.safe_load((repo / "params.yaml").read_text())
    assert workspace["train"]["lr"] == pytest.approx(best.params["train.lr"])
    assert workspace["sweep"] == spec  # the sweep section travelled with the trial
    assert "up to date" in run_dvc(repo, "status").stdout
    assert "Running stage 'train'" not in applied.stdout  # the best trial's model is reused
    assert "Running stage 'export'" in applied.stdout
    best_run = client_for(repo).get_run(by_trial[best.number].info.run_id)
    assert "export/max_abs_diff" in best_run.data.metrics
    assert list(experiments(repo)) == [f"{name}-{best.number}"]


def wait_for(check, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_sweep_prunes_and_resumes_after_kill(
    pipeline: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """A trial far behind the median after an epoch is pruned (exit 0, pruned: true); a
    SIGKILLed sweep started again marks its running trial failed and reaches its total."""
    repo = clone(pipeline, tmp_path / "repo")
    good = {"train.lr": {"low": 4.0e-3, "high": 6.0e-3}, "train.epochs": [2]}
    set_sweep(repo, **TRAIN_ONLY, jobs=1, pruner="median", space=good)
    study = ["--study", "s"]
    first = sweep_here(repo, capfd, *study, "--trials", "1")
    assert first.returncode == 0, first.stderr[-3000:]

    # An lr that learns nothing in an epoch: far below trial 0 at epoch 1.
    hopeless = {**good, "train.lr": {"low": 1e-7, "high": 2e-7}}
    set_sweep(repo, **TRAIN_ONLY, jobs=1, pruner="median", space=hopeless)
    second = sweep_here(repo, capfd, *study, "--trials", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    pruned = load_study(repo, "s").trials[1]
    assert pruned.state.name == "PRUNED"
    ref = experiments(repo)["s-1"]
    assert shown(repo, ref, "metrics/train.json")["pruned"] is True
    assert list(pruned.intermediate_values) == [1]  # stopped after its first of 2 epochs
    _, runs = sweep_runs(repo, "s")
    assert {r.data.tags["sweep.trial"]: r.data.tags["sweep.state"] for r in runs} == {
        "0": "complete",
        "1": "pruned",
    }
    (run,) = [r for r in runs if r.data.tags["sweep.trial"] == "1"]
    assert len(client_for(repo).get_metric_history(run.info.run_id, "train/loss")) == 1

    # Long trials, no pruning: SIGKILL the sweep while trial 2 trains. From here on the
    # study and DVC's experiments are the point: the trials record no MLflow runs (a
    # setting: they train the same).
    set_sweep(repo, **TRAIN_ONLY, jobs=1, pruner="none", space=good)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = 4
    params["mlflow"]["enabled"] = False
    params["sweep"]["space"] = {"train.lr": good["train.lr"]}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = repo / ".dvc/tmp/sweep/s-2.log"
    killed = subprocess.Popen(
        [console_script("vision-sweep"), *study, "--trials", "3"],
        cwd=repo,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: log.exists() and "[train] epoch 1/4" in log.read_text(), "trial 2")
    finally:
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
    write_params(repo, train={"epochs": 1})  # the trial that completes the study: a short one
    resumed = sweep_here(repo, capfd, *study, "--trials", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "trial 2 was running when its sweep was stopped: marked failed" in resumed.stderr
    states = [t.state.name for t in load_study(repo, "s").trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE"]
    names = set(experiments(repo))
    assert {"s-0", "s-1", "s-3"} <= names and "s-2" not in names
    # The orphaned trial noticed that its sweep was gone, and stopped.
    wait_for(lambda: "the sweep (pid" in log.read_text(), "the orphan to stop", timeout=60)


@pytest.fixture
def bare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tmp copy of the project (no run yet); cwd inside it."""
    repo = make_repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    return repo


def driver_error(repo: Path, **changes: Any) -> str:
    """The one-line error of a sweep with these sweep settings, before any trial."""
    set_sweep(repo, **changes)
    params = load_params(repo / "params.yaml")
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    args = sweep.parse_args([])
    with pytest.raises(StageError) as caught:
        driver.Driver(params, raw, args).study()
    return str(caught.value)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"space": {"train.lrate": [0.1]}}, "sweep.space.train.lrate: not a parameter"),
        ({"space": {"train.lr": [-1]}}, "train.lr: the params schema rejects -1: expected greater"),
        ({"space": {"train.lr": {"low": 0.1, "high": 200}}}, "rejects 200.0: expected less than"),
        ({"space": {"mlflow.experiment": ["a"]}}, "mlflow.experiment: a setting"),
        ({"space": {"train.batch_size": {"low": 8, "high": 64.5}}}, "whole numbers"),
        ({"metric": "benchmark/pytorch/latency_ms"}, "no stage up to 'evaluate' writes it"),
        ({"until": "deploy"}, "sweep.until: no stage 'deploy'"),
        ({"sampler": "grid"}, "the grid sampler needs choices or a range with a step"),
    ],
)
def test_bad_sweep_stops_before_any_trial(bare: Path, changes: dict, expected: str) -> None:
    assert expected in driver_error(bare, **changes)
    assert not (bare / "optuna.db").exists()


@pytest.mark.slow  # several seconds on its own: out of the `not slow` loop
def test_unreachable_storage_and_bad_study_are_one_line(bare: Path) -> None:
    set_sweep(bare)
    # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    done = run_sweep(bare, "--storage", "postgresql+psycopg://me:secret@127.0.0.1:9/optuna")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: sweep: the Optuna storage postgresql+psycopg://***@")
    assert "Traceback" not in done.stderr and "secret" not in done.stderr
    bad = run_sweep(bare, "--study", "no spaces allowed")
    assert bad.returncode == 1 and "use letters, digits" in bad.stderr.strip().splitlines()[-1]
    assert not (bare / "optuna.db").exists()


def test_yaml_values_read_back_as_the_same_value() -> None:
    for value in (1e-05, 0.00123, 3.0, 64, True, "cnn", 2.5e-7):
        assert yaml.safe_load(driver.yaml_value(value)) == value


def test_sweep_section_is_validated_like_every_other(bare: Path) -> None:
    from stages.core.params import ParamsError

    set_sweep(bare, space={"train.lr": {"low": 0.01, "high": 0.001}})
    with pytest.raises(ParamsError, match=r"sweep\.space\.train\.lr: low \(0\.01\) must be below"):
        load_params(bare / "params.yaml")
    set_sweep(bare, direction="up")
    with pytest.raises(ParamsError, match=r"sweep\.direction"):
        load_params(bare / "params.yaml")
