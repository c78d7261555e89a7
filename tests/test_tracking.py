"""MLflow as the record: where runs go, what each stage adds, a store that is lost and
filled again from the DVC outputs. The run of a real `dvc repro` is checked field by field
in test_pipeline.py; queued experiments and comparing their runs in test_queue.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.processes import free_port, wait_for
from helpers.repos import EXPERIMENT, ROOT, client_for, clone, runs_of, write_params
from stages import evaluate, train
from stages.core import dvcyaml, outputs, paths
from stages.core.errors import StageError
from stages.core.params import load_params
from stages.tools import sync
from stages.tracking import helper, mlflow_store


def steps(repo: Path, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client_for(repo).get_metric_history(run_id, key))


def model_names(repo: Path, run) -> list[str]:
    """Names of the logged models linked to the run, sorted (a duplicate shows twice)."""
    found = client_for(repo).search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    return sorted(m.name for m in found)


# -- unit ------------------------------------------------------------------------------
# tracking/ owns the runs, tools/compare.py the cross-run queries, release/registry.py the
# registry, release/pyfunc.py and release/ir_model.py the deployable pyfunc model.
TALK_TO_MLFLOW = ("tracking/", "tools/compare.py", "release/registry.py", "release/pyfunc.py")
TALK_TO_MLFLOW += ("release/ir_model.py",)


def test_only_the_modules_named_for_it_import_mlflow() -> None:
    """No stage's computation talks to MLflow: only the modules whose job it is."""
    pattern = re.compile(r"^\s*(import mlflow|from mlflow\b)", re.MULTILINE)
    package = ROOT / "stages"
    modules = {f.relative_to(package).as_posix(): f for f in package.rglob("*.py")}
    offenders = [
        name
        for name, f in modules.items()
        if not name.startswith(TALK_TO_MLFLOW) and pattern.search(f.read_text())
    ]
    assert offenders == []
    assert "tools/compare.py" in modules and "tracking/mlflow_store.py" in modules


def test_store_is_env_then_params_then_sqlite_at_the_user_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_params(ROOT / "params.yaml").mlflow
    monkeypatch.chdir(tmp_path)
    assert mlflow_store.tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    # A queued experiment runs in a temporary copy; DVC_ROOT names the user's repository.
    monkeypatch.setenv("DVC_ROOT", "/home/me/project")
    assert mlflow_store.tracking_uri(cfg) == "sqlite:////home/me/project/mlflow.db"
    relative = cfg.model_copy(update={"tracking_uri": "sqlite:///records/runs.db"})
    assert mlflow_store.tracking_uri(relative) == "sqlite:////home/me/project/records/runs.db"
    server = cfg.model_copy(update={"tracking_uri": "http://mlflow.internal:5000"})
    assert mlflow_store.tracking_uri(server) == "http://mlflow.internal:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert mlflow_store.tracking_uri(server) == "http://127.0.0.1:5001"
    assert mlflow_store.experiment_name(cfg) == EXPERIMENT
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sweep-1")
    assert mlflow_store.experiment_name(cfg) == "sweep-1"


def test_what_each_stage_records_is_read_from_dvc_yaml() -> None:
    stages = {s.name: s for s in dvcyaml.pipeline(ROOT / "dvc.yaml")}
    assert list(stages) == [
        "prepare", "train", "evaluate", "export", "convert", "benchmark", "promote",
    ]  # fmt: skip
    assert paths.MODEL_CARD in stages["promote"].files  # reports/ is logged as files
    assert stages["train"].params == ("seed", "model", "train")
    assert stages["evaluate"].metrics == (paths.EVALUATE_METRICS,)
    assert paths.PER_CLASS in stages["evaluate"].files
    assert paths.OPENVINO in stages["convert"].files
    # Models go in as MLflow models, not as loose files; inputs of later stages not at all.
    assert paths.MODEL not in stages["train"].files
    assert paths.CHECKPOINT not in stages["train"].files
    assert [s.name for s in dvcyaml.stages_before("export", list(stages.values()))] == [
        "prepare", "train", "evaluate",
    ]  # fmt: skip


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
    assert set(mlflow_store.epoch_metrics(row)) == {
        "train/loss",
        "train/accuracy",
        "val/loss",
        "val/accuracy",
        "train/lr",
        "train/epoch_images_per_second",
    }
    nested = {"pytorch": {"throughput": 10.0}, "exporter": "dynamo", "ok": True, "threads": 2}
    assert outputs.prefixed("benchmark", nested) == {
        "benchmark/pytorch/throughput": 10.0,
        "benchmark/threads": 2.0,
    }


def test_a_disabled_recorder_starts_no_helper(trained_repo: Path) -> None:
    params = load_params()
    assert params.mlflow.enabled is False
    with helper.Recorder("evaluate", params) as recorder:
        recorder.ready()
        recorder.log_epoch({"epoch": 1})
    assert recorder._proc is None
    assert not (trained_repo / "mlflow.db").exists()


def test_unreachable_server_stops_train_before_any_training(
    trained_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for output in (paths.CHECKPOINT, paths.MODEL):
        output.unlink()
    write_params(trained_repo, mlflow={"enabled": True})
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    with pytest.raises(StageError, match=f"mlflow: tracking server {url} is unreachable"):
        train.main(load_params())
    assert not paths.CHECKPOINT.exists()
    assert not paths.MODEL.exists()


CONCURRENT_WRITER = """
import sys, time
from pathlib import Path
from stages.tracking import mlflow_store
from stages.core.params import load_params
import mlflow  # paid before the start line, so both processes open the store together

Path(f"ready-{sys.argv[1]}").touch()
while not Path("go").exists():
    time.sleep(0.01)
store = mlflow_store.Store(load_params(), "train")
store.open_run(f"writer-{sys.argv[1]}", {"writer": sys.argv[1]})
for epoch in range(1, 31):
    store.log_epochs([{"epoch": epoch, "train_loss": 1.0 / epoch, "train_accuracy": 0.5,
                       "val_loss": 1.0, "val_accuracy": 0.5, "lr": 0.1,
                       "images_per_second": 1.0}])
store.finish("FINISHED")
"""


@pytest.mark.slow
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
    assert not any("locked" in e for e in errors), errors
    runs = runs_of(repo)
    assert sorted(r.data.tags["writer"] for r in runs) == ["1", "2"]
    for run in runs:
        assert steps(repo, run.info.run_id, "train/loss") == list(range(1, 31))


@pytest.mark.slow
def test_system_metrics_are_recorded_when_asked(
    trained_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    write_params(trained_repo, mlflow={"enabled": True, "system_metrics": True})
    store = mlflow_store.Store(load_params(), "train")
    store.open_run(mlflow_store.read_run_key(), {})
    store.watch_system()
    client = client_for(trained_repo)

    def sampled() -> bool:
        return "system/cpu_utilization_percentage" in client.get_run(store.run_id).data.metrics

    # The sampler's first log reaches the store: waited for, not slept on (the timeout is a
    # hang guard; at a 0.5 s interval it comes within a second or so).
    wait_for(sampled, timeout=120, what="MLflow's first system metrics", poll=0.1)
    store.finish("FINISHED")
    [run] = runs_of(trained_repo)
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_a_lost_store_is_filled_from_the_outputs_and_sync_adds_only_what_is_missing(
    pipeline: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    repo = clone(pipeline, tmp_path / "repo")
    key = json.loads((repo / paths.RUN_ID).read_text())["run_key"]
    (repo / "mlflow.db").unlink()
    shutil.rmtree(repo / "mlruns")

    # The first stage that finds no run of this model makes it, with what came before.
    # (In this process: its MLflow helper is a process of its own either way.)
    monkeypatch.chdir(repo)
    params = load_params()
    capfd.readouterr()
    evaluate.main(params)
    assert "MLflow had no run of the model in models/: filling it" in capfd.readouterr().err
    [run] = runs_of(repo)
    assert run.data.tags[mlflow_store.RUN_KEY_TAG] == key
    assert steps(repo, run.info.run_id, "train/loss") == [1, 2, 3]
    assert run.data.params["train.lr"] == "0.002"
    for name in ("train/images_per_second", "evaluate/accuracy"):
        assert name in run.data.metrics, name
    assert "export/max_abs_diff" not in run.data.metrics
    assert model_names(repo, run) == []  # packaged beside export and convert

    # sync adds what the other outputs hold, and what the run has already it leaves alone
    sync.main([])
    [run] = runs_of(repo)
    assert "benchmark/pytorch/throughput" in run.data.metrics
    assert steps(repo, run.info.run_id, "train/loss") == [1, 2, 3]
    assert steps(repo, run.info.run_id, "evaluate/accuracy") == [0]
    assert model_names(repo, run) == [mlflow_store.ONNX_MODEL, mlflow_store.PYTORCH_MODEL]
    assert run.info.status == "FINISHED"
    client = client_for(repo)
    openvino = client.list_artifacts(run.info.run_id, "openvino")
    assert len({a.path for a in openvino}) == len(openvino) >= 4
