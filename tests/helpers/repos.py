"""Tmp copies of the repository with shrunk params, and running the project's commands in
them: what the fixtures and the tests share.

The shrunk params keep every stage real (real digits, real training, ONNX Runtime,
OpenVINO, NNCF, MLflow on SQLite) but small: three short epochs, a short benchmark.
"""

from __future__ import annotations

import contextlib
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

from stages.core import dvcyaml
from stages.core.processes import usable_cores

ROOT = Path(__file__).resolve().parents[2]

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

# Small but real: three short epochs on the bundled digits, short measurements.
SHRINK: dict[str, dict[str, Any]] = {
    # Three short epochs (14 of the 21 steps: train.max_steps), as many images as two
    # whole ones: two whole epochs left INT8 at the edge of its 0.5-point gate (0.83 points
    # below FP16 at one thread a worker, within it at two); these leave it at FP16's
    # accuracy, and calibrating on white pages still breaks plain INT8 (1.4 points).
    "train": {"epochs": 3, "max_steps": 14, "warmup_epochs": 1, "batch_size": 64},
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


def console_script(name: str) -> str:
    """The installed console script of this environment (vision-sweep, dvc, ...)."""
    return str(Path(sys.executable).parent / name)


def run_script(
    repo: Path, name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """An installed console script (`vision-sweep ...`, a Python file) inside the repo."""
    return run_module(repo, console_script(name), *args, env=env, timeout=timeout)


DVC = console_script("dvc")


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


# The pipeline's stages in order, as dvc.yaml declares them.
STAGES = tuple(stage.name for stage in dvcyaml.pipeline(ROOT / "dvc.yaml"))


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
