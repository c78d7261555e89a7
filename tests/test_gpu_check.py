"""benchmarks/gpu_check.py's dry run on the CPU: every step of the GPU check runs, or says
why it cannot, so the check works the day a GPU machine is lent (docs/gpu.md).

The dry run is the check itself at tiny sizes: generated digits through the real prepare
stage, the real train stage through stages.launch, the textbook loop, DDP in a one-rank
gloo group, the export and evaluate stages, `pytest -m gpu`; with mlflow, dvc, openvino,
nncf and optuna hidden, as they are absent on the GPU machine.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys

import pytest
import torch

from helpers.repos import ROOT, child_env

pytestmark = pytest.mark.slow

TRAIN_CMD = "python -m stages.launch --standalone --nproc-per-node=auto -m stages train"
MUST_RUN = ("environment", "imports", "prepare", "train b64", "textbook b64", "nccl")
MUST_RUN += ("export", "summary")


def test_dry_run_does_every_step_it_can(tmp_path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=600,
        check=False,
    )
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    failed = {name: s["reason"] for name, s in steps.items() if s["status"] == "failed"}
    assert done.returncode == 0 and not failed, failed or done.stderr[-3000:]
    assert report["failed"] == 0
    for name, step in steps.items():
        assert step["status"] in ("ok", "skipped"), name
        assert step["status"] == "ok" or step["reason"], f"{name} skipped without a reason"
    assert [name for name in MUST_RUN if steps[name]["status"] != "ok"] == []

    # What the numbers are about, and when.
    assert report["torch"] == torch.__version__ and report["python"]
    assert datetime.datetime.fromisoformat(report["date"]).tzinfo is not None
    assert report["total_seconds"] > 0
    assert steps["imports"]["hidden"] == ["mlflow", "dvc", "openvino", "nncf", "optuna"]
    assert steps["imports"]["eagerly_imported"] == []

    # Trained through the stage as dvc.yaml runs it, one process, the split's every image
    # each epoch; the model learnt (10 classes: chance is 0.1).
    images = steps["prepare"]["counts"]["train"] * report["params"]["train"]["epochs"]
    stage = steps["train b64"]
    assert stage["command"] == TRAIN_CMD
    assert stage["processes"] == 1 and stage["weights_saved_from"] == ["cpu"]
    assert stage["epochs"] == report["params"]["train"]["epochs"]
    assert stage["images_per_second"] > 0 and stage["steady_images_per_second"] > 0
    assert stage["test_accuracy"] > 0.3
    # GPU settings: recorded as left out, not silently dropped.
    assert {steps[name]["status"] for name in ("train b64+compile", "train b64-cl")} == {"skipped"}
    book = steps["textbook b64"]
    assert book["images"] == images and book["num_workers"] == 4
    assert book["images_per_second"] > 0 and book["test_accuracy"] > 0.3
    head = steps["summary"]["batch_64"]
    assert head["ratio"] == pytest.approx(
        stage["images_per_second"] / book["images_per_second"], rel=0.01
    )
    assert steps["summary"]["target_met"] is None  # a GPU's target, not a CPU's

    # DDP around the stage's own setup and epochs, the data held on the training device.
    ddp = steps["nccl"]
    assert (ddp["backend"], ddp["ddp"], ddp["world_size"]) == ("gloo", "DistributedDataParallel", 1)
    assert ddp["data_device"] == "cpu" and ddp["all_reduce"] == [1.0, 1.0, 1.0]

    # The export stage's gate: ONNX Runtime reproduces the trained model on the test split.
    export = steps["export"]
    assert steps[f"train {export['model_of']}"]["status"] == "ok"
    assert export["max_abs_diff"] <= export["atol"] and export["argmax_agreement"] >= 0.999

    log = (out / "gpu_check.log").read_text()
    assert "trained 2 epochs on 1 process(es)" in log
