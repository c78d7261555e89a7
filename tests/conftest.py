"""Shared fixtures: tmp copies of the repository with shrunk params, and two pipelines.

The shrunk params keep every stage real (real digits, real training, ONNX Runtime,
OpenVINO, NNCF, MLflow on SQLite) but small: two epochs, a short benchmark.

- `trained`: every stage's main() once, in this process, MLflow off (fast tests of the
  stages' outputs, the params each stage reads, predict, the gates);
- `pipeline`: one real `dvc repro` in a committed tmp repo, MLflow on (the slow tests of
  what a user gets: DVC's view, the MLflow run, queued experiments, resync).
Tests that change outputs work in private copies of either.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from filelock import FileLock

from stages.core.processes import usable_cores

ROOT = Path(__file__).resolve().parent.parent
# What a clone holds that the pipeline needs (outputs, caches and the venv stay behind).
REPO_FILES = (
    "stages",
    "dvc.yaml",
    "params.yaml",
    "pyproject.toml",
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvcignore",
    ".gitignore",
    "data/raw/.gitignore",
)
GIT_ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}

# Under `pytest -n N` each worker's trainings get their share of the cores: more threads
# than free cores only spin (a 2-epoch training beside one busy core, 2-core VM: 12-14 s of
# CPU and 10.5-12 s of wall time with two threads, 7.5-7.7 s of each with one). A setting:
# reruns nothing.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(usable_cores() // WORKERS, 1) if WORKERS > 1 else 0

# Small but real: two epochs on the bundled digits (curves of two points), short measurements.
SHRINK: dict[str, dict[str, Any]] = {
    "train": {"epochs": 2, "warmup_epochs": 1, "batch_size": 64},
    "runtime": {"threads": THREADS},
    "openvino": {"calibration_size": 50},
    "benchmark": {
        "seconds": 0.2,
        "warmup_iterations": 1,
        "batch_size": 8,
        "benchmark_app": False,
        "threads": THREADS,
    },
}


def read_params(repo: Path) -> dict[str, Any]:
    return yaml.safe_load((repo / "params.yaml").read_text())


def write_params(repo: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """Update sections of repo/params.yaml (merged key by key) and return the whole."""
    params = read_params(repo)
    for name, values in sections.items():
        if isinstance(values, dict):
            params[name].update(values)
        else:
            params[name] = values
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        env={**os.environ, **GIT_ENV},
        check=True,
    )
    return done.stdout


def make_repo(dest: Path, commit: bool = True) -> Path:
    """A fresh git repository holding the project's files and shrunk params."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in REPO_FILES:
        source = ROOT / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            # With the bytecode this session compiled (git ignores it; it stays valid in the
            # copy, which keeps the files' times): the copy's processes need not compile.
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
    write_params(dest, **SHRINK)
    if commit:
        commit_all(dest)
    return dest


def commit_all(repo: Path) -> None:
    """Make `repo` a git repository (if needed) with everything in one commit."""
    if not (repo / ".git").exists():
        git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "pipeline")


def trim_pipeline(repo: Path, last: str) -> None:
    """repo/dvc.yaml without the stages after `last` (and their plots and artifact): for
    tests whose point lies before them, so that their experiments stay short."""
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    names = list(pipeline["stages"])
    dropped = names[names.index(last) + 1 :]
    for name in dropped:
        del pipeline["stages"][name]
    pipeline["plots"] = [p for p in pipeline["plots"] if not any(d in str(p) for d in dropped)]
    if "promote" in dropped:
        del pipeline["artifacts"]  # promote's output
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))


# Set by DVC, torchrun or MLflow itself: mlflow.set_tracking_uri() in an in-process stage
# exports MLFLOW_TRACKING_URI, which would send a later subprocess's runs to that store.
INHERITED = (
    "MLFLOW_TRACKING_URI",
    "DVC_ROOT",
    "DVC_EXP_NAME",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "TORCHELASTIC_RUN_ID",
    "VISION_SWEEP_TRIAL",
    "VISION_SWEEP_STORAGE",
)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without inherited run variables, plus `extra` (which wins)."""
    env = {k: v for k, v in os.environ.items() if k not in INHERITED}
    return {**env, **GIT_ENV, **(extra or {})}


# The longest tests first (wall time on 2 busy cores), so that the workers of `pytest -n
# auto` end together: xdist hands tests out in collection order, one at a time as a worker
# frees up (pyproject: --dist=load --maxschedchunk=1). A worker holds one test in reserve:
# compare follows the queue test (which builds `pipeline`) on the first worker, and the
# PostgreSQL test, which needs no pipeline, runs on the second meanwhile. Every other test
# keeps its place after these; a name missing here only costs speed.
LONGEST_FIRST = (
    "test_queue.py::test_two_queued_experiments_land_in_the_user_store",  # + pipeline
    "test_queue.py::test_compare_ranks_the_runs",
    "test_mlflow_server.py::test_pipeline_logs_to_postgresql",
    "test_params.py::",
    "test_sweep.py::test_sweep_prunes_and_resumes_after_kill",
    "test_sweep.py::test_sweep_trials_are_experiments_and_runs",
    "test_gpu_check.py::test_dry_run_does_every_step_it_can",
    "test_distributed.py::test_killed_launcher_stops_workers_then_two_nodes",  # + ddp_repo
    "test_team.py::test_a_teammate_pulls_the_results_and_reproduces_nothing",
    "test_mlflow_server.py::test_two_machines_share_one_sweep_study",
    "test_promote.py::test_champion_moves_only_on_evidence_and_rolls_back",
    "test_zoo.py::",
    "test_train.py::test_killed_run_resumes_bit_identical_into_the_same_run",
    "test_distributed.py::test_killed_dvc_repro_stops_launcher_and_workers",
    "test_pipeline.py::test_settings_rerun_nothing",
    "test_pipeline.py::test_a_failed_stage_leaves_no_output",
    "test_tracking.py::test_a_lost_store_is_filled_from_the_outputs",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.nodeid.rsplit("/", 1)[-1]
        return next((i for i, p in enumerate(LONGEST_FIRST) if name.startswith(p)), 99)

    items.sort(key=rank)  # stable: the rest stay in pytest's order


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


def run_module(
    repo: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`python -m ...` (or any argv after the interpreter) inside the repo, captured."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=repo,
        capture_output=True,
        text=True,
        env=child_env(env),
        timeout=timeout,
        check=False,
    )


DVC = str(Path(sys.executable).parent / "dvc")


def dvc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """child_env with this venv first on PATH, so that dvc's stages run its python."""
    bindir = str(Path(sys.executable).parent)
    return child_env({"PATH": bindir + os.pathsep + os.environ.get("PATH", ""), **(extra or {})})


def run_dvc(
    repo: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """The dvc CLI of this environment inside the repo (stages see this venv's python)."""
    return subprocess.run(
        [DVC, *args],
        cwd=repo,
        capture_output=True,
        text=True,
        env=dvc_env(env),
        timeout=timeout,
        check=False,
    )


STAGES = ("prepare", "train", "evaluate", "export", "convert", "benchmark", "promote")


class ParamsSpy:
    """Params that remember which top-level sections a stage reads."""

    def __init__(self, params: Any):
        self._params = params
        self.read: set[str] = set()

    def __getattr__(self, name: str):
        from stages.core.params import Params

        if name in ("flat", "digest"):
            method = getattr(self._params, name)

            def recorded(*sections: str):
                self.read.update(sections)
                return method(*sections)

            return recorded
        if name in Params.model_fields:
            self.read.add(name)
        return getattr(self._params, name)


@dataclass
class Trained:
    """A repo where every stage's main() ran once, and the params sections each one read."""

    repo: Path
    reads: dict[str, set[str]]


@contextlib.contextmanager
def built_once(factory: pytest.TempPathFactory, name: str) -> Iterator[tuple[Path, bool]]:
    """A folder that one test process of the session fills and every other one reuses.

    With pytest-xdist each worker is a process of its own with its own session fixtures:
    the first to get here builds (the block gets True), the others wait and reuse it.
    """
    base = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by this session's workers, new for each session
    folder = base / name
    with FileLock(str(base / f"{name}.lock")):
        done = folder / ".built"
        yield folder, not done.exists()
        done.parent.mkdir(parents=True, exist_ok=True)
        done.touch()


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


EXPERIMENT = "vision-pipeline"


def client_for(repo: Path):
    """An MLflow client on the repo's SQLite store."""
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def runs_of(repo: Path) -> list:
    """Every run of the pipeline's experiment in the repo's SQLite store."""
    client = client_for(repo)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def clone(repo: Path, dest: Path) -> Path:
    """A private copy of a repo, its git history, outputs and MLflow store included."""
    shutil.copytree(repo, dest, symlinks=True)
    return dest
