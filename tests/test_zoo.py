"""The model zoo: every net trains, evaluates, exports to ONNX and converts to OpenVINO."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.processes import copy_repo, prepared_repo
from helpers.repos import ROOT, read_params, write_params
from stages import convert, evaluate, export, train
from stages.core import paths
from stages.core.params import load_params
from stages.data import datasets
from stages.models import runtimes, zoo

# Batches of 8, one epoch cut by train.max_steps: the heavy nets (GoogLeNet is ~1 GFLOP a
# training image even at 16 px) would otherwise dominate the test suite on a CPU.
BATCH = 8
# (train.max_steps, train.lr) per net: the fewest steps after which its eval-mode test
# accuracy is well above chance. The batch-norm nets need a small lr and, GoogLeNet most,
# steps: their running variances start at 1 and decay by 0.9 a step towards the true ones
# (~0.03 under GoogLeNet's 0.01-std init), so eval mode predicts one class until ~50 steps.
# Test accuracy on 32 images measured on a 2-core VM: lenet5 0.75, resnet18 0.78, vgg11_bn
# 0.75, googlenet 0.91 (0.72 after 64 steps); chance is 0.1.
TRAINING = {
    "lenet5": (72, 0.005),
    "resnet18": (24, 0.0005),
    "vgg11_bn": (32, 0.0005),
    "googlenet": (72, 0.0005),
}
ACCURACY_FLOOR = 0.4
COUNTS = {"train": BATCH * max(steps for steps, _ in TRAINING.values()), "val": 16, "test": 32}
HEAVY = pytest.mark.slow  # (the default cnn goes through these steps in the fast tests)


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits prepared at 16 px (the zoo's smallest common size), cut to a few hundred."""
    return prepared_repo(
        tmp_path_factory.mktemp("zoo") / "repo",
        counts=COUNTS,
        data={"image_size": 16},
        train={"epochs": 1, "warmup_epochs": 0, "batch_size": BATCH},
        # INT8's accuracy gate (openvino.max_accuracy_drop) stays as shipped.
        openvino={"calibration_size": 16},
        mlflow={"enabled": False},
    )


def ir_accuracy(xml: Path) -> float:
    """An IR's accuracy on the prepared test split, run as convert scores it."""
    test = datasets.load_split("test")
    logits = runtimes.logits(runtimes.openvino(xml), test.images)
    return float((logits.argmax(1) == test.labels.numpy()).mean())


@pytest.mark.parametrize(
    "name",
    [
        # cnn: the default, through every stage in the `trained` fixture
        pytest.param("lenet5", marks=HEAVY),
        pytest.param("resnet18", marks=HEAVY),
        pytest.param("vgg11_bn", marks=HEAVY),
        pytest.param("googlenet", marks=HEAVY),
    ],
)
def test_model_trains_evaluates_exports_and_converts(
    name: str, tiny16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openvino as ov

    repo = copy_repo(tiny16, tmp_path / "repo")
    monkeypatch.chdir(repo)
    steps, lr = TRAINING[name]
    write_params(repo, model={"name": name}, train={"max_steps": steps, "lr": lr})
    params = load_params()
    gate = params.openvino.max_accuracy_drop
    assert gate == read_params(ROOT)["openvino"]["max_accuracy_drop"]  # as shipped

    train.main(params)
    model, config = zoo.load(paths.MODEL)
    assert config["name"] == name

    evaluate.main(params)
    assert len(paths.CONFUSION.read_text().splitlines()) == COUNTS["test"] + 1
    accuracy = json.loads(paths.EVALUATE_METRICS.read_text())["accuracy"]
    assert accuracy >= ACCURACY_FLOOR, f"{name} did not learn: test accuracy {accuracy}"

    export.main(params)  # raises when the ONNX parity gates fail
    parity = json.loads(paths.EXPORT_METRICS.read_text())
    assert parity["max_abs_diff"] <= params.export.atol
    assert parity["argmax_agreement"] >= params.export.min_agreement

    convert.main(params)
    converted = json.loads(paths.CONVERT_METRICS.read_text())
    methods = list(params.openvino.int8_methods)
    method = converted["int8_method"]
    assert converted["accuracy_fp16"] == ir_accuracy(paths.IR_FP16)
    if method == "none":
        # Every rung tried and refused: no INT8 file for benchmark or promote to find,
        # and the FP16 IR (scored above) is the deployable one.
        assert list(converted["int8_attempts"]) == methods
        assert not paths.IR_INT8.exists() and not paths.IR_INT8.with_suffix(".bin").exists()
        assert "accuracy_int8" not in converted
        shipped = [paths.IR_FP16]
    else:
        # The rungs up to the one that passed, in order; the file on disk is that one.
        assert list(converted["int8_attempts"]) == methods[: methods.index(method) + 1]
        int8 = ir_accuracy(paths.IR_INT8)
        assert int8 == converted["accuracy_int8"]
        assert accuracy - int8 <= gate + 1e-9, f"INT8 by {method}: {int8} vs PyTorch {accuracy}"
        shipped = [paths.IR_FP16, paths.IR_INT8]

    images = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        expected = model(images).numpy()
    core = ov.Core()
    for ir in shipped:
        compiled = core.compile_model(str(ir), "CPU")
        logits = compiled(images.numpy())[0]
        assert logits.shape == (3, 10) and np.isfinite(logits).all()
        # A loose check that the IR is this model and not another: same scale of logits.
        assert np.abs(logits - expected).max() < 0.5 + 0.5 * np.abs(expected).max()
