"""Team mode through a DVC remote: what person A computed, person B gets without
recomputing anything (README "Team"). A local folder stands in for S3 or SSH, a bare git
repository for the team's git server."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import yaml
from test_sources import make_image_folder

from helpers.repos import clone, commit_all, git, make_repo, run_dvc, write_params

pytestmark = pytest.mark.slow

# What a pipeline result is made of: every DVC output and metrics file of dvc.yaml.
RESULTS = ("data/prepared", "models", "metrics", "plots")


def digests(repo: Path, folders: tuple[str, ...] = RESULTS) -> dict[str, str]:
    """sha256 of every visible file under the folders (git's and DVC's own files aside)."""
    out = {}
    for folder in folders:
        for file in sorted((repo / folder).rglob("*")):
            if file.is_file() and file.name != ".gitignore":
                out[file.relative_to(repo).as_posix()] = hashlib.sha256(
                    file.read_bytes()
                ).hexdigest()
    return out


def shared_results(repo: Path) -> dict[str, str]:
    """digests() of what a teammate gets from `repo`: all but its own checkpoint."""
    found = digests(repo)
    del found["models/checkpoint.pt"]
    return found


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def share(repo: Path, tmp_path: Path) -> Path:
    """Person A: a DVC remote set up in one command, results pushed, git pushed; the
    shared git repository."""
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    ok(run_dvc(repo, "remote", "add", "-d", "team", str(tmp_path / "dvc-remote")))
    commit_all(repo)  # dvc.lock, the metrics and the remote's config
    git(repo, "remote", "add", "origin", str(origin))
    git(repo, "push", "-q", "origin", "main")
    ok(run_dvc(repo, "push"))
    return origin


def teammate(origin: Path, dest: Path, *targets: str) -> Path:
    """Person B: a fresh clone with the results (of these targets) pulled."""
    subprocess.run(["git", "clone", "-q", str(origin), str(dest)], check=True)
    ok(run_dvc(dest, "pull", *targets))
    return dest


def test_a_teammate_pulls_the_results_and_reproduces_nothing(
    pipeline: Path, tmp_path: Path
) -> None:
    a = clone(pipeline, tmp_path / "a")
    # DVC's business only: A's experiments below need no MLflow run (a setting, reruns nothing)
    write_params(a, mlflow={"enabled": False})
    # the checkpoint is A's own file (resume after a kill), not something B must get
    assert (a / "models/checkpoint.pt").exists()
    origin = share(a, tmp_path)
    b = teammate(origin, tmp_path / "b")

    assert "up to date" in ok(run_dvc(b, "status"))
    assert "Running stage" not in ok(run_dvc(b, "repro"))
    assert digests(b) == shared_results(a)
    assert not (b / "models/checkpoint.pt").exists()

    # A shared experiment: pushed by A, pulled and applied by B, again nothing to run. (A
    # promote param: its experiments rerun the last stage only.)
    ok(run_dvc(a, "exp", "run", "-n", "strict", "-S", "promote.min_improvement=0.01"))
    ok(run_dvc(a, "exp", "push", "origin", "strict"))
    ok(run_dvc(b, "exp", "pull", "origin", "strict"))
    ok(run_dvc(b, "exp", "apply", "strict"))
    assert "Running stage" not in ok(run_dvc(b, "repro"))
    assert digests(b, ("metrics", "reports")) == digests(a, ("metrics", "reports"))
    assert yaml.safe_load((b / "params.yaml").read_text())["promote"]["min_improvement"] == 0.01

    # Results of params no commit holds: through DVC's run-cache. The restored run's
    # outputs are new to B (the deployable model folder differs from run to run):
    # `repro --pull` fetches them, where a plain `repro` would run the stage again.
    ok(run_dvc(a, "exp", "run", "-S", "promote.alpha=0.1"))
    ok(run_dvc(a, "push", "--run-cache"))
    write_params(b, promote={"alpha": 0.1})
    ok(run_dvc(b, "pull", "--run-cache"))
    restored = ok(run_dvc(b, "repro", "--pull"))
    assert "Running stage" not in restored and "Stage 'promote' is cached" in restored
    assert digests(b) == shared_results(a)


def test_raw_inputs_travel_through_dvc_so_prepare_does_not_rerun(tmp_path: Path) -> None:
    a = make_repo(tmp_path / "a", commit=False)
    make_image_folder(a / "data/raw/scans", per_class=6)
    write_params(a, data={"source": "image_folder", "root": "data/raw/scans"})
    commit_all(a)
    ok(run_dvc(a, "add", "data/raw/scans"))
    ok(run_dvc(a, "repro", "prepare"))
    origin = share(a, tmp_path)
    # only prepare has run (and is in dvc.lock): B pulls what it made, and the raw images
    b = teammate(origin, tmp_path / "b", "data/raw/scans.dvc", "prepare")

    assert (b / "data/raw/scans.dvc").exists()  # committed, the images are not
    assert digests(b, ("data",)) == digests(a, ("data",))
    assert "Running stage" not in ok(run_dvc(b, "repro", "prepare"))
