"""End to end: one `dvc repro` in a tmp git repository, as a user runs it, and what DVC and
MLflow then show."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.repos import EXPERIMENT, STAGES, client_for, clone, git, run_dvc, runs_of, write_params
from stages.core.params import load_params
from stages.release import pyfunc
from stages.tracking import mlflow_store

pytestmark = pytest.mark.slow
REGISTERED = load_params(Path(__file__).parent.parent / "params.yaml").promote.registered_model

FINAL_METRICS = (
    "train/images_per_second",
    "train/val_accuracy",
    "evaluate/accuracy",
    "evaluate/macro_f1",
    "evaluate/loss",
    "export/max_abs_diff",
    "export/argmax_agreement",
    "convert/accuracy_int8",
    "convert/accuracy_fp16",
    "convert/int8_accuracy_drop",
    "benchmark/pytorch/latency_ms",
    "benchmark/onnxruntime/throughput",
    "benchmark/openvino_int8/throughput",
)


def ran(output: str) -> list[str]:
    """The stages a dvc repro actually ran, from its output."""
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def artifacts(repo: Path, run_id: str, folder: str | None = None) -> set[str]:
    return {a.path for a in client_for(repo).list_artifacts(run_id, folder)}


def test_dvc_repro_runs_every_stage_into_its_outputs(pipeline: Path) -> None:
    assert ran((pipeline / "repro.log").read_text()) == list(STAGES)
    for output in (
        "data/prepared/meta.json",
        "models/model.pt",
        "models/checkpoint.pt",
        "models/model.onnx",
        "models/openvino/model.xml",
        "models/openvino/model.bin",
        "models/openvino/model_int8.xml",
        "plots/train/history.csv",
        "plots/evaluate/confusion.csv",
        "plots/evaluate/per_class.csv",
        "plots/benchmark/runtimes.csv",
        "plots/benchmark/runtimes.png",
        "models/deployable/MLmodel",
        "reports/model_card.md",
        "dvc.lock",
    ):
        assert (pipeline / output).exists(), output
    metrics = {
        name: json.loads((pipeline / "metrics" / f"{name}.json").read_text())
        for name in ("train", "evaluate", "export", "convert", "benchmark")
    }
    assert metrics["evaluate"]["accuracy"] > 0.5
    assert metrics["export"]["argmax_agreement"] >= 0.999
    assert metrics["convert"]["accuracy_int8"] > 0.5
    assert all(
        metrics["benchmark"][r]["throughput"] > 0
        for r in ("pytorch", "onnxruntime", "openvino_fp16", "openvino_int8")
    )


def test_dvc_shows_at_most_30_numbers_accuracy_first(pipeline: Path) -> None:
    done = run_dvc(pipeline, "metrics", "show", "--json")
    assert done.returncode == 0, done.stderr
    files = json.loads(done.stdout)[""]["data"]

    def numbers(value) -> list[float]:
        if isinstance(value, dict):
            return [n for item in value.values() for n in numbers(item)]
        return [value] if isinstance(value, int | float) else []

    shown = {name: numbers(entry["data"]) for name, entry in files.items()}
    assert sum(len(values) for values in shown.values()) <= 30, shown
    assert next(iter(files["metrics/evaluate.json"]["data"])) == "accuracy"
    assert next(iter(files["metrics/train.json"]["data"])) == "val_accuracy"


def test_dvc_repro_records_one_complete_mlflow_run(pipeline: Path) -> None:
    [run] = runs_of(pipeline)
    run_id = run.info.run_id
    key = json.loads((pipeline / "models" / "mlflow_run.json").read_text())["run_key"]
    assert run.data.tags[mlflow_store.RUN_KEY_TAG] == key
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["train.lr"] == "0.002"
    assert params["train.epochs"] == "3"
    assert params["model.name"] == "cnn"
    assert params["seed"] == "42"
    assert params["evaluate.batch_size"] == "512"
    assert params["openvino.calibration_size"] == "50"
    assert params["benchmark.batch_size"] == "8"
    assert params["data.source"] == "digits"
    assert not any(p.startswith(("mlflow.", "runtime.")) for p in params)  # settings

    client = client_for(pipeline)
    for name in ("train/loss", "val/loss", "train/accuracy", "val/accuracy"):
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == [1, 2, 3], name
    for name in FINAL_METRICS:
        assert name in run.data.metrics, name
    evaluate = json.loads((pipeline / "metrics" / "evaluate.json").read_text())
    assert run.data.metrics["evaluate/accuracy"] == pytest.approx(evaluate["accuracy"])

    [dataset] = run.inputs.dataset_inputs
    meta = json.loads((pipeline / "data" / "prepared" / "meta.json").read_text())
    assert dataset.dataset.digest == meta["digest"][:36]
    assert "data/prepared" in dataset.dataset.source

    tags = run.data.tags
    assert tags["git.commit"] == git(pipeline, "rev-parse", "HEAD").strip()
    assert tags["git.dirty"] in ("true", "false")
    params_file = pipeline / "params.yaml"
    assert tags["params.hash"] == load_params(params_file).digest("seed", "model", "train")
    assert tags["world_size"] == "1"
    assert tags["device"] == "cpu"
    assert "dvc.experiment" not in tags  # a plain `dvc repro` is no DVC experiment

    assert {"plots", "snapshot", "openvino"} <= artifacts(pipeline, run_id)
    plots = artifacts(pipeline, run_id, "plots")
    for name in ("curves.png", "confusion.png", "per_class.csv", "runtimes.png", "runtimes.csv"):
        assert f"plots/{name}" in plots, name
    assert "plots/.gitignore" not in plots
    assert artifacts(pipeline, run_id, "snapshot") == {"snapshot/params.yaml", "snapshot/dvc.lock"}
    assert {"openvino/model.xml", "openvino/model_int8.xml"} <= artifacts(
        pipeline, run_id, "openvino"
    )
    found = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    assert sorted(m.name for m in found) == [
        mlflow_store.ONNX_MODEL,
        pyfunc.MODEL_NAME,
        mlflow_store.PYTORCH_MODEL,
    ]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{pipeline / 'mlflow.db'}")
    for output in run.outputs.model_outputs:
        info = mlflow.models.get_model_info(f"models:/{output.model_id}")
        assert info.signature is not None
        assert info.saved_input_example_info is not None


def test_the_first_run_is_the_champion_and_explains_itself(pipeline: Path) -> None:
    [run] = runs_of(pipeline)
    decided = json.loads((pipeline / "metrics" / "promote.json").read_text())
    assert (decided["decision"], decided["version"]) == ("champion", 1)
    client = client_for(pipeline)
    champion = client.get_model_version_by_alias(REGISTERED, "champion")
    assert champion.run_id == run.info.run_id
    card = (pipeline / "reports" / "model_card.md").read_text()
    assert run.data.tags["mlflow.note.content"] == card
    assert run.data.tags["promote.decision"] == "champion"
    assert run.data.tags["convert.int8_method"] == "plain"
    assert "reports/model_card.md" in artifacts(pipeline, run.info.run_id, "reports")
    # A readable name where no DVC experiment names the run: model, data, short commit.
    commit = git(pipeline, "rev-parse", "HEAD").strip()[:7]
    assert run.info.run_name.startswith(f"cnn-digits-{commit}")


def test_dvc_artifacts_get_hands_out_the_deployable_model(pipeline: Path, tmp_path: Path) -> None:
    # dvc.yaml's `artifacts:` entry: once a version is tagged (GTO, as DVC Studio does),
    # `dvc artifacts get` fetches the deployable folder from the repository.
    repo = clone(pipeline, tmp_path / "repo")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "results")
    gto = Path(sys.executable).parent / "gto"
    subprocess.run([gto, "register", REGISTERED], cwd=repo, check=True, capture_output=True)
    out = tmp_path / "deploy"
    got = run_dvc(tmp_path, "artifacts", "get", str(repo), REGISTERED, "-o", str(out))
    assert got.returncode == 0, got.stderr[-2000:]
    shipped = repo / "models" / "deployable"
    names = sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert (out / "MLmodel").read_text() == (shipped / "MLmodel").read_text()


def test_settings_rerun_nothing_an_evaluate_param_reruns_only_evaluate(
    pipeline: Path, tmp_path: Path
) -> None:
    repo = clone(pipeline, tmp_path / "repo")
    again = run_dvc(repo, "repro")
    assert again.returncode == 0, again.stderr[-3000:]
    assert ran(again.stdout) == []
    # The registry is outside DVC: a run that runs nothing registers nothing either.
    assert len(client_for(repo).search_model_versions(f"name = '{REGISTERED}'")) == 1

    write_params(
        repo,
        mlflow={"experiment": "elsewhere", "system_metrics": True, "log_models": False},
        runtime={"threads": 3, "resume": False},
    )
    status = run_dvc(repo, "status")
    assert status.returncode == 0, status.stderr
    assert "up to date" in status.stdout, status.stdout

    write_params(repo, mlflow={"experiment": EXPERIMENT}, evaluate={"batch_size": 100})
    partial = run_dvc(repo, "repro")
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert "train" not in ran(partial.stdout) and ran(partial.stdout)[0] == "evaluate"
    [run] = runs_of(repo)  # evaluate added to the same run
    assert run.data.params["evaluate.batch_size"] == "512"  # MLflow params are write-once


def test_a_failed_stage_leaves_no_output_and_dvc_checkout_restores_it(
    pipeline: Path, tmp_path: Path
) -> None:
    # What the README says: DVC deletes a stage's outputs before running it, the stage
    # writes nothing unchecked, and the last good outputs come back from DVC's cache.
    repo = clone(pipeline, tmp_path / "repo")
    good = (repo / "models" / "model.onnx").read_bytes()
    # What DVC does with outputs is the point, not the record (a setting: no rerun).
    write_params(repo, export={"atol": 1e-12}, mlflow={"enabled": False})
    failed = run_dvc(repo, "repro", "export")
    assert failed.returncode != 0
    assert "error: export: ONNX differs from PyTorch" in failed.stderr + failed.stdout
    assert not (repo / "models" / "model.onnx").exists()
    assert not [p.name for p in (repo / "models").iterdir() if p.name.startswith(".model")]
    restored = run_dvc(repo, "checkout", "export")
    assert restored.returncode == 0, restored.stderr
    assert (repo / "models" / "model.onnx").read_bytes() == good
