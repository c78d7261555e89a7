"""Helpers shared by the training tests: tiny prepared repos, subprocess runs, weights."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from helpers.repos import child_env, make_repo, write_params

LAUNCH = ("-m", "stages.launch")
# As dvc.yaml runs it: the stage runner, which starts the MLflow helper first.
TRAIN = ("-m", "stages", "train")


@contextlib.contextmanager
def inside(path: Path) -> Iterator[Path]:
    """Run the block with `path` as the working directory (stages use relative paths)."""
    old = Path.cwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)


def prepared_repo(dest: Path, counts: dict[str, int] | None = None, **sections: Any) -> Path:
    """A tmp repo with params updated and digits prepared, splits cut to `counts` images."""
    from stages import prepare
    from stages.core import paths
    from stages.core.params import load_params

    repo = make_repo(dest)
    if sections:
        write_params(repo, **sections)
    with inside(repo):
        prepare.main(load_params())
        if counts:
            meta = json.loads(paths.META.read_text())
            for split, n in counts.items():
                blob = torch.load(paths.split_file(split), weights_only=True)
                order = round_robin(blob["labels"])[:n]
                torch.save({k: v[order].clone() for k, v in blob.items()}, paths.split_file(split))
                meta["counts"][split] = n
            paths.META.write_text(json.dumps(meta, indent=2))
    return repo


def round_robin(labels: torch.Tensor) -> torch.Tensor:
    """Indices taking one image of each class in turn: any cut of 10+ holds every class."""
    per_class = [torch.nonzero(labels == c).flatten().tolist() for c in labels.unique()]
    longest = max(len(p) for p in per_class)
    return torch.tensor([p[i] for i in range(longest) for p in per_class if i < len(p)])


def copy_repo(source: Path, dest: Path) -> Path:
    """A copy of a prepared repo without any training outputs or MLflow store."""
    outputs = {"models", "metrics", "plots", "mlruns", "mlflow.db", "mlflow.db.lock"}

    def top_level_outputs(folder: str, names: list[str]) -> set[str]:
        # Only the repository's own folders: stages/models/ is code.
        return outputs & set(names) if Path(folder) == source else set()

    shutil.copytree(source, dest, ignore=top_level_outputs)
    return dest


def python(repo: Path, *args: str, **kwargs: Any) -> subprocess.Popen:
    """Start `python <args>` in the repo with stdout+stderr into repo/<log>."""
    log = kwargs.pop("log", "run.log")
    out = (repo / log).open("w")
    env = child_env(kwargs.pop("env", {}))
    return subprocess.Popen(
        [sys.executable, *args], cwd=repo, stdout=out, stderr=subprocess.STDOUT, env=env
    )


def finish(proc: subprocess.Popen, repo: Path, log: str = "run.log", timeout: float = 300) -> str:
    """Wait for a process started by `python`; assert success and return its output."""
    proc.wait(timeout=timeout)
    text = (repo / log).read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{text[-4000:]}"
    return text


def wait_for(check: Callable[[], Any], timeout: float, what: str, poll: float = 0.05) -> Any:
    """Poll until `check()` is truthy; fail the test naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextlib.contextmanager
def http_server(proc: subprocess.Popen, url: str, health: str, log: Path) -> Iterator[str]:
    """`url` once `proc` (started in its own session) answers OK on `health`; at the end
    its whole process group is killed. Fails with the server's log if it exits first."""
    import requests

    def up() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        with contextlib.suppress(requests.RequestException):
            return requests.get(f"{url}{health}", timeout=2).ok
        return False

    try:
        wait_for(up, timeout=180, what=f"{url}{health}", poll=0.2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def weights(repo: Path) -> dict[str, torch.Tensor]:
    """The trained model's state_dict from repo/models/model.pt."""
    return torch.load(repo / "models" / "model.pt", weights_only=True)["state_dict"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Every tensor bit-identical (torch.equal), same keys."""
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"tensors differ: {differ}"


def free_port() -> int:
    """A TCP port on loopback nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill(pid: int) -> None:
    """SIGKILL a process if it still exists."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def metrics(repo: Path) -> dict[str, Any]:
    """metrics/train.json of the repo."""
    return json.loads((repo / "metrics" / "train.json").read_text())
