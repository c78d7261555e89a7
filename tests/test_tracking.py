"""MLflow as the experiment record: one comparable run per pipeline result.

One real `dvc repro` (module fixture) is shared: its run is checked field by field, then a
copy of that repository loses its store (rebuild, sync). Comparing real runs and the
champion alias are tested on queued experiments (test_queue.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from train_helpers import free_port, prepared_repo

from conftest import ROOT, commit_all, git, make_repo, run_dvc, run_module, write_params
from stages import tracking
from stages.errors import StageError
from stages.params import load_params

EXPERIMENT = "vision-pipeline"
FINAL_METRICS = (
    "train/images_per_second",
    "train/val_accuracy",
    "evaluate/accuracy",
    "evaluate/macro_f1",
    "export/max_abs_diff",
    "export/argmax_agreement",
    "convert/accuracy_int8",
    "convert/accuracy_fp16",
    "benchmark/pytorch/latency_ms",
    "benchmark/onnxruntime/throughput",
    "benchmark/openvino_int8/throughput",
)


def client_for(repo: Path):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def runs_of(repo: Path) -> list:
    """Every run of the pipeline's experiment in the repo's SQLite store."""
    client = client_for(repo)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def recorded_run_id(repo: Path) -> str:
    return json.loads((repo / "models" / "mlflow_run.json").read_text())["run_id"]


def steps(repo: Path, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client_for(repo).get_metric_history(run_id, key))


def model_names(repo: Path, run) -> list[str]:
    """Names of the logged models linked to the run, sorted (a duplicate shows twice)."""
    found = client_for(repo).search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    return sorted(m.name for m in found)


def artifacts(repo: Path, run_id: str, folder: str | None = None) -> set[str]:
    return {a.path for a in client_for(repo).list_artifacts(run_id, folder)}


def stage(repo: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m stages.<name>` in the repo, as DVC runs it; asserts success."""
    done = run_module(repo, "-m", f"stages.{name}", *args)
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-4000:]}"
    return done


# -- unit ------------------------------------------------------------------------------
def test_stages_never_import_mlflow() -> None:
    """tracking.py owns every MLflow call; the other modules go through it."""
    pattern = re.compile(r"^\s*(import mlflow|from mlflow\b)", re.MULTILINE)
    offenders = [
        f.name
        for f in (ROOT / "stages").glob("*.py")
        if f.name != "tracking.py" and pattern.search(f.read_text())
    ]
    assert offenders == []


def test_store_is_env_then_params_then_sqlite_at_the_user_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_params(ROOT / "params.yaml").mlflow
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    # A queued experiment runs in a temporary copy; DVC_ROOT names the user's repository.
    monkeypatch.setenv("DVC_ROOT", "/home/me/project")
    assert tracking.tracking_uri(cfg) == "sqlite:////home/me/project/mlflow.db"
    relative = cfg.model_copy(update={"tracking_uri": "sqlite:///records/runs.db"})
    assert tracking.tracking_uri(relative) == "sqlite:////home/me/project/records/runs.db"
    server = cfg.model_copy(update={"tracking_uri": "http://mlflow.internal:5000"})
    assert tracking.tracking_uri(server) == "http://mlflow.internal:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert tracking.tracking_uri(server) == "http://127.0.0.1:5001"


def test_metric_names_group_by_split_and_stage() -> None:
    row = {
        "epoch": 3,
        "train_loss": 0.5,
        "train_accuracy": 0.8,
        "val_loss": 0.6,
        "val_accuracy": 0.7,
        "lr": 0.001,
        "images_per_second": 900.0,
    }
    assert set(tracking.epoch_metrics(row)) == {
        "train/loss",
        "train/accuracy",
        "val/loss",
        "val/accuracy",
        "train/lr",
        "train/epoch_images_per_second",
    }
    nested = {"pytorch": {"throughput": 10.0}, "exporter": "dynamo", "ok": True, "threads": 2}
    assert tracking.prefixed("benchmark", nested) == {
        "benchmark/pytorch/throughput": 10.0,
        "benchmark/threads": 2.0,
    }


def test_system_metrics_are_recorded_when_asked(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    cfg = load_params().mlflow.model_copy(update={"system_metrics": True})
    with tracking.Tracker(cfg, "train") as tracker:
        tracker.start({}, system_metrics=True)
        time.sleep(2)
    [run] = runs_of(repo)
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert run.info.status == "FINISHED"


def test_compare_table_keeps_differing_params_and_ranks_by_the_metric() -> None:
    import pandas as pd

    from stages import compare

    runs = pd.DataFrame(
        {
            "run_id": ["a" * 32, "b" * 32, "c" * 32],
            "status": ["FINISHED"] * 3,
            "tags.mlflow.runName": ["one", "two", "three"],
            "params.train.lr": ["0.002", "0.001", "0.004"],
            "params.train.epochs": ["2", "2", "2"],
            "params.data.root": ["/x", "/y", "/z"],
            "metrics.evaluate/accuracy": [0.90, 0.95, float("nan")],
            "metrics.benchmark/pytorch/latency_ms": [1.5, 0.7, 1.0],
            "metrics.evaluate/count": [360, 360, 360],
        }
    )
    table = compare.table(runs, "evaluate/accuracy")
    assert list(table.columns) == [
        "run",
        "name",
        "status",
        "train.lr",
        "evaluate/accuracy",
        "benchmark/pytorch/latency_ms",
        "run_id",
    ]
    assert list(table["name"]) == ["two", "one", "three"]  # best first, no value last
    assert list(compare.table(runs, "benchmark/pytorch/latency_ms")["name"]) == [
        "two",
        "three",
        "one",
    ]  # latency: smaller is better
    text = compare.markdown(table)
    assert text.splitlines()[0].startswith("| run | name | status | train.lr |")
    assert text.splitlines()[2] == "| bbbbbbbb | two | FINISHED | 0.001 | 0.95 | 0.7 |"
    with pytest.raises(StageError, match="no run has the metric"):
        compare.table(runs, "export/max_abs_diff")


CONCURRENT_WRITER = """
import sys, time
from pathlib import Path
from stages import tracking
from stages.errors import StageError
from stages.params import load_params
import mlflow  # paid before the start line, so both processes open the store together

Path(f"ready-{sys.argv[1]}").touch()
while not Path("go").exists():
    time.sleep(0.01)
with tracking.Tracker(load_params().mlflow, "train") as tracker:
    tracker.start({"writer": sys.argv[1]})
    for step in range(1, 31):
        tracker.log_metrics({"train/loss": 1.0 / step}, step=step)
    assert tracker.healthy
"""


def test_two_processes_create_and_write_one_sqlite_store_at_once(repo: Path) -> None:
    """First-time creation of mlflow.db and the writes after it, from two processes."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_WRITER, str(n)],
            cwd=repo,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (1, 2)
    ]
    deadline = time.monotonic() + 120
    while not all((repo / f"ready-{n}").exists() for n in (1, 2)):
        assert time.monotonic() < deadline, "writers did not start"
        assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs]
        time.sleep(0.05)
    assert not (repo / "mlflow.db").exists()
    (repo / "go").touch()
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert not any("locked" in e or "MLflow logging failed" in e for e in errors), errors
    runs = runs_of(repo)
    assert sorted(r.data.tags["writer"] for r in runs) == ["1", "2"]
    for run in runs:
        assert steps(repo, run.info.run_id, "train/loss") == list(range(1, 31))


@pytest.mark.slow
def test_unreachable_server_stops_train_before_any_training(tmp_path: Path) -> None:
    repo = prepared_repo(tmp_path / "repo", counts={"train": 100, "val": 20, "test": 20})
    url = f"http://127.0.0.1:{free_port()}"
    done = run_module(
        repo,
        "-m",
        "stages.launch",
        "--standalone",
        "--nproc-per-node=1",
        "-m",
        "stages.train",
        env={"MLFLOW_TRACKING_URI": url},
    )
    assert done.returncode != 0
    assert f"error: mlflow: tracking server {url} is unreachable" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error:")
    assert "Traceback" not in done.stderr
    assert not (repo / "models" / "checkpoint.pt").exists()
    assert not (repo / "models" / "model.pt").exists()


# -- one real dvc repro ------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A committed tmp repo (two epochs, so curves have two points) after `dvc repro`."""
    repo = make_repo(tmp_path_factory.mktemp("tracked") / "repo", commit=False)
    write_params(repo, train={"epochs": 2})
    commit_all(repo)
    done = run_dvc(repo, "repro")  # run_dvc passes on no inherited store or DVC variables
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    yield repo


def clone(pipeline: Path, dest: Path) -> Path:
    """A private copy of the reproduced repo, store included."""
    shutil.copytree(pipeline, dest, symlinks=True)
    return dest


@pytest.mark.slow
def test_dvc_repro_records_one_complete_run(pipeline: Path) -> None:
    runs = runs_of(pipeline)
    assert len(runs) == 1
    run = runs[0]
    run_id = run.info.run_id
    assert run_id == recorded_run_id(pipeline)
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["train.lr"] == "0.002"
    assert params["train.epochs"] == "2"
    assert params["model.name"] == "cnn"
    assert params["seed"] == "42"
    assert params["evaluate.batch_size"] == "512"
    assert params["openvino.calibration_size"] == "50"
    assert params["benchmark.batch_size"] == "8"
    assert params["data.source"] == "digits"

    for key in ("train/loss", "val/loss", "train/accuracy", "val/accuracy"):
        assert steps(pipeline, run_id, key) == [1, 2], key
    metrics = run.data.metrics
    for key in FINAL_METRICS:
        assert key in metrics, key
    evaluate = json.loads((pipeline / "metrics" / "evaluate.json").read_text())
    assert metrics["evaluate/accuracy"] == pytest.approx(evaluate["accuracy"])

    [dataset] = run.inputs.dataset_inputs
    meta = json.loads((pipeline / "data" / "prepared" / "meta.json").read_text())
    assert dataset.dataset.digest == meta["digest"][:36]
    assert "data/prepared" in dataset.dataset.source

    tags = run.data.tags
    head = git(pipeline, "rev-parse", "HEAD").strip()
    assert tags["git.commit"] == head
    assert tags["git.dirty"] in ("true", "false")
    assert tags["params.hash"] == load_params(pipeline / "params.yaml").digest(
        "seed", "model", "train"
    )
    assert tags["world_size"] == "1"
    assert tags["device"] == "cpu"
    assert "dvc.experiment" not in tags  # a plain `dvc repro` is no DVC experiment

    assert {"plots", "snapshot", "openvino"} <= artifacts(pipeline, run_id)
    plots = artifacts(pipeline, run_id, "plots")
    assert {"plots/curves.png", "plots/confusion.png", "plots/runtimes.png"} <= plots
    assert "plots/.gitignore" not in plots
    assert artifacts(pipeline, run_id, "snapshot") == {"snapshot/params.yaml", "snapshot/dvc.lock"}
    assert {"openvino/model.xml", "openvino/model_int8.xml"} <= artifacts(
        pipeline, run_id, "openvino"
    )
    assert model_names(pipeline, run) == [tracking.ONNX_MODEL, tracking.PYTORCH_MODEL]
    assert len(run.outputs.model_outputs) == 2
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{pipeline / 'mlflow.db'}")
    for output in run.outputs.model_outputs:
        info = mlflow.models.get_model_info(f"models:/{output.model_id}")
        assert info.signature is not None
        assert info.saved_input_example_info is not None


@pytest.mark.slow
def test_lost_run_is_rebuilt_found_by_later_stages_and_synced(
    pipeline: Path, tmp_path: Path
) -> None:
    repo = clone(pipeline, tmp_path / "repo")
    origin = recorded_run_id(repo)
    (repo / "mlflow.db").unlink()
    shutil.rmtree(repo / "mlruns")

    done = stage(repo, "evaluate")
    assert "rebuilding it from the DVC outputs" in done.stderr
    [run] = runs_of(repo)
    rebuilt = run.info.run_id
    assert rebuilt != origin
    assert run.data.tags[tracking.ORIGIN_TAG] == origin
    assert steps(repo, rebuilt, "train/loss") == [1, 2]
    assert run.data.params["train.lr"] == "0.002"
    assert "evaluate/accuracy" in run.data.metrics
    assert "train/images_per_second" in run.data.metrics
    assert "export/max_abs_diff" not in run.data.metrics

    stage(repo, "export")
    [run] = runs_of(repo)
    assert run.info.run_id == rebuilt  # found by its origin tag, not made again
    assert "export/max_abs_diff" in run.data.metrics
    assert model_names(repo, run) == [tracking.ONNX_MODEL, tracking.PYTORCH_MODEL]

    # sync adds what the later stages' outputs hold, twice without duplicating anything
    for _ in range(2):
        stage(repo, "tracking", "sync")
    [run] = runs_of(repo)
    assert run.info.run_id == rebuilt
    for key in FINAL_METRICS:
        assert key in run.data.metrics, key
    assert steps(repo, rebuilt, "train/loss") == [1, 2]
    assert steps(repo, rebuilt, "evaluate/accuracy") == [0]
    assert model_names(repo, run) == [tracking.ONNX_MODEL, tracking.PYTORCH_MODEL]
    assert {"openvino", "snapshot"} <= artifacts(repo, rebuilt)
