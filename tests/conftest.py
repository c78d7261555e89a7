"""The fixtures: tmp copies of the repository with shrunk params, and two pipelines (the
helpers they and the tests share are in tests/helpers/).

- `trained`: every stage's main() once, in this process, MLflow off (fast tests of the
  stages' outputs, the params each stage reads, predict, the gates);
- `pipeline`: one real `dvc repro` in a committed tmp repo, MLflow on (the slow tests of
  what a user gets: DVC's view, the MLflow run, queued experiments, resync).
Tests that change outputs work in private copies of either.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.repos import (
    GIT_ENV,
    INHERITED,
    STAGES,
    THREADS,
    ParamsSpy,
    Trained,
    built_once,
    make_repo,
    run_dvc,
    write_params,
)

# The longest tests first, so that the workers of `pytest -n auto` end together: xdist
# hands tests out in collection order, one at a time as a worker frees up (pyproject:
# --dist=load --maxschedchunk=1). How long a test takes is measured, not listed: each run
# keeps every test's wall time (set-up included, so a test that builds a shared fixture
# counts it) in pytest's cache, and the next run orders by it. Without a cache (a fresh
# clone) the `slow` tests go first, in pytest's order.
DURATIONS = "vision-pipeline/durations"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cache = getattr(config, "cache", None)  # none under -p no:cacheprovider
    known: dict[str, float] = cache.get(DURATIONS, {}) if cache else {}

    def longest_first(item: pytest.Item) -> tuple[float, int]:
        slow = item.get_closest_marker("slow") is not None
        return (-known.get(item.nodeid, 0.0), 0 if slow else 1)

    items.sort(key=longest_first)  # stable: ties stay in pytest's order


_measured: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _measured[report.nodeid] = _measured.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    cache = getattr(session.config, "cache", None)
    if cache is None or hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller hears every report and writes once
    cache.set(DURATIONS, {**cache.get(DURATIONS, {}), **_measured})


@pytest.fixture(scope="session", autouse=True)
def _share_of_cores() -> None:
    """The stages this worker runs in process (PyTorch's part) keep to its share too."""
    if THREADS:
        import torch

        torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests never write into a user's store or inherit a DVC run's variables."""
    for name in INHERITED:
        monkeypatch.delenv(name, raising=False)
    for name, value in GIT_ENV.items():
        monkeypatch.setenv(name, value)
    yield
    # What an in-process stage exported (MLflow does) must not reach the next test.
    for name in INHERITED:
        os.environ.pop(name, None)


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tmp git copy of the project with shrunk params; the test runs inside it."""
    path = make_repo(tmp_path / "repo")
    monkeypatch.chdir(path)
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Every stage's main() in order, in this process, on the shrunk params, MLflow off.

    Tests that change its outputs copy it first (`trained_repo`).
    """
    import importlib

    from stages.core.params import load_params

    with built_once(tmp_path_factory, "trained") as (folder, build):
        path = folder / "repo"
        if not build:
            reads = json.loads((folder / "reads.json").read_text())
            return Trained(path, {stage: set(read) for stage, read in reads.items()})
        make_repo(path, commit=False)
        write_params(path, mlflow={"enabled": False})
        reads: dict[str, set[str]] = {}
        old = Path.cwd()
        os.chdir(path)
        try:
            for stage in STAGES:
                params = ParamsSpy(load_params())
                importlib.import_module(f"stages.{stage}").main(params)
                reads[stage] = params.read
        finally:
            os.chdir(old)
        (folder / "reads.json").write_text(json.dumps({k: sorted(v) for k, v in reads.items()}))
    return Trained(path, reads)


@pytest.fixture(scope="session")
def trained(trained_run: Trained) -> Path:
    """The repo of `trained_run`."""
    return trained_run.repo


@pytest.fixture
def trained_repo(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the trained repo; cwd inside it."""
    dest = tmp_path / "trained"
    shutil.copytree(trained, dest, symlinks=True)
    monkeypatch.chdir(dest)
    return dest


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A committed tmp repo after one real `dvc repro` of the whole pipeline, MLflow on."""
    with built_once(tmp_path_factory, "pipeline") as (folder, build):
        repo = folder / "repo"
        if build:
            make_repo(repo)
            done = run_dvc(repo, "repro")  # passes on no inherited store or DVC variables
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            (repo / "repro.log").write_text(done.stdout + done.stderr)
    return repo
