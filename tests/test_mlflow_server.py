"""A team's setup: the pipeline logging into an `mlflow server` (SQLite backend, served
artifacts), checked through the server's REST API; and the server dying mid-training."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from train_helpers import TRAIN, finish, free_port, prepared_repo, python, wait_for

from conftest import run_module

pytestmark = pytest.mark.slow

API = "/api/2.0/mlflow"
COUNTS = {"train": 400, "val": 60, "test": 60}


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """`mlflow server` on a free loopback port, its db and artifacts under root; its URL."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    log = (root / f"server-{port}.log").open("w")
    proc = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        # No job runner: its seven helper processes (for GenAI jobs) cost 15 s to start.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,  # its own process group: the workers go down with it
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            assert proc.poll() is None, (root / f"server-{port}.log").read_text()[-3000:]
            with contextlib.suppress(requests.RequestException):
                return requests.get(f"{url}/health", timeout=2).ok
            return False

        wait_for(healthy, timeout=180, what="mlflow server /health", poll=0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def api(url: str, method: str, path: str, **kwargs) -> dict:
    reply = requests.request(method, f"{url}{API}/{path}", timeout=30, **kwargs)
    reply.raise_for_status()
    return reply.json()


def runs(url: str) -> list[dict]:
    """Every run of the pipeline's experiment, as the REST API returns them."""
    with contextlib.suppress(requests.HTTPError):
        experiment = api(
            url, "GET", "experiments/get-by-name", params={"experiment_name": "vision-pipeline"}
        )["experiment"]
        found = api(
            url, "POST", "runs/search", json={"experiment_ids": [experiment["experiment_id"]]}
        )
        return found.get("runs", [])
    return []


def metric_steps(url: str, run_id: str, key: str) -> list[int]:
    history = api(url, "GET", "metrics/get-history", params={"run_id": run_id, "metric_key": key})
    return sorted(int(m.get("step", 0)) for m in history.get("metrics", []))


def metric_keys(run: dict) -> set[str]:
    return {m["key"] for m in run["data"].get("metrics", [])}


def stage(repo: Path, name: str, url: str, *args: str) -> subprocess.CompletedProcess:
    done = run_module(repo, "-m", f"stages.{name}", *args, env={"MLFLOW_TRACKING_URI": url})
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-4000:]}"
    return done


def test_pipeline_logs_through_a_server_that_dies_and_comes_back(tmp_path: Path) -> None:
    epochs = 20
    # No MLflow models: packaging them is tested elsewhere; here the files go through the
    # server, the plots show that.
    repo = prepared_repo(
        tmp_path / "repo", counts=COUNTS, train={"epochs": epochs}, mlflow={"log_models": False}
    )
    (tmp_path / "server").mkdir()
    with mlflow_server(tmp_path / "server") as url:
        train = python(repo, *TRAIN, env={"MLFLOW_TRACKING_URI": url})

        def first_epoch_logged() -> list[dict]:
            found = runs(url)
            return (
                found
                if found and metric_steps(url, found[0]["info"]["run_id"], "train/loss")
                else []
            )

        # Curves are live: the first epoch is on the server while training goes on.
        [run] = wait_for(first_epoch_logged, timeout=300, what="epoch 1 on the server", poll=0.2)
        still_training = not (repo / "metrics" / "train.json").exists()
    # The server is gone now; training goes on without it.
    output = finish(train, repo, timeout=600)
    assert still_training, "training ended before the server went down: raise the epochs"
    for output_file in ("models/model.pt", "metrics/train.json", "plots/train/history.csv"):
        assert (repo / output_file).exists(), output_file
    warnings = [line for line in output.splitlines() if "MLflow logging failed" in line]
    assert len(warnings) == 1, output[-3000:]
    assert "python -m stages.tracking sync" in warnings[0]
    assert "Traceback" not in output
    run_id = run["info"]["run_id"]
    key = json.loads((repo / "models" / "mlflow_run.json").read_text())["run_key"]
    assert {"key": "pipeline.run_key", "value": key} in run["data"]["tags"]

    with mlflow_server(tmp_path / "server") as url:  # back, on the same database
        stage(repo, "tracking", url, "sync")
        [run] = runs(url)
        assert run["info"]["run_id"] == run_id
        assert run["info"]["status"] == "FINISHED"
        assert metric_steps(url, run_id, "train/loss") == list(range(1, epochs + 1))
        assert "train/images_per_second" in metric_keys(run)
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["train.epochs"] == str(epochs)
        # Files go through the server to its artifact store, none into the repository.
        listed = api(url, "GET", "artifacts/list", params={"run_id": run_id, "path": "plots"})
        names = {f["path"] for f in listed.get("files", [])}
        assert {"plots/curves.png", "plots/history.csv"} <= names
    assert not (repo / "mlflow.db").exists()
    assert not (repo / "mlruns").exists()
    assert (tmp_path / "server" / "artifacts").is_dir()
