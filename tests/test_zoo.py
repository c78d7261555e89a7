"""The model zoo: every net trains, evaluates, exports to ONNX and converts to OpenVINO."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.processes import copy_repo, prepared_repo
from helpers.repos import write_params
from stages import convert, evaluate, export, train
from stages.core import paths
from stages.core.params import load_params
from stages.models import zoo

# One optimizer step on a tiny batch: the heavy nets (GoogLeNet is ~100 GFLOP a step of
# 64 images even at 16 px) would otherwise dominate the test suite on a CPU.
COUNTS = {"train": 32, "val": 16, "test": 32}
HEAVY = pytest.mark.slow  # (the default cnn goes through these steps in the fast tests)


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits prepared at 16 px (the zoo's smallest common size), cut to a few dozen."""
    return prepared_repo(
        tmp_path_factory.mktemp("zoo") / "repo",
        counts=COUNTS,
        data={"image_size": 16},
        train={"epochs": 1, "warmup_epochs": 0},
        # The INT8 accuracy gate is the convert stage's business (tested there); an
        # untrained net scored on 32 images would trip it at random.
        openvino={"calibration_size": 16, "max_accuracy_drop": 1.0},
        mlflow={"enabled": False},
    )


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
    write_params(repo, model={"name": name})
    params = load_params()

    train.main(params)
    scores = json.loads(paths.TRAIN_METRICS.read_text())
    assert math.isfinite(scores["train_loss"])
    model, config = zoo.load(paths.MODEL)
    assert config["name"] == name
    assert sum(p.numel() for p in model.parameters()) > 0

    evaluate.main(params)
    assert len(paths.CONFUSION.read_text().splitlines()) == COUNTS["test"] + 1

    export.main(params)  # raises when the ONNX parity gates fail
    parity = json.loads(paths.EXPORT_METRICS.read_text())
    assert parity["max_abs_diff"] <= params.export.atol
    assert parity["argmax_agreement"] >= params.export.min_agreement

    convert.main(params)
    assert set(json.loads(paths.CONVERT_METRICS.read_text())) >= {"accuracy_int8"}
    images = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        expected = model(images).numpy()
    core = ov.Core()
    for ir in (paths.IR_FP16, paths.IR_INT8):
        compiled = core.compile_model(str(ir), "CPU")
        logits = compiled(images.numpy())[0]
        assert logits.shape == (3, 10) and np.isfinite(logits).all()
        # A loose check that the IR is this model and not another: same scale of logits.
        assert np.abs(logits - expected).max() < 0.5 + 0.5 * np.abs(expected).max()
