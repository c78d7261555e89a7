"""Export and convert gates on real ONNX Runtime, OpenVINO and NNCF: they pass on the real
models, fail on tampered ones, and a failure leaves the previous model in place."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import write_params
from stages import convert, datasets, export, models, paths, runtimes
from stages.errors import StageError
from stages.params import load_params


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders an atomic write would leave behind on failure."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def reference_logits() -> tuple[np.ndarray, torch.Tensor]:
    test = datasets.load_split("test")
    return runtimes.logits(runtimes.pytorch(paths.MODEL), test.images), test.images


# ---------------------------------------------------------------------------- export


def test_export_metrics_of_the_real_model(trained: Path) -> None:
    metrics = json.loads((trained / paths.EXPORT_METRICS).read_text())
    params = load_params(trained / paths.PARAMS)
    assert list(metrics) == ["max_abs_diff", "argmax_agreement"]
    assert 0 <= metrics["max_abs_diff"] <= params.export.atol
    assert metrics["argmax_agreement"] == 1.0
    graph = onnx.load(str(trained / paths.ONNX))
    assert graph.opset_import[0].version == params.export.opset


def test_the_new_exporter_handles_the_models(trained_repo: Path, tmp_path: Path) -> None:
    model, config = models.load(paths.MODEL)
    cfg = load_params().export
    file = tmp_path / "dynamo.onnx"
    assert export.to_onnx(model, models.example_input(config, 2), file, cfg) == "dynamo"


def test_onnx_batch_axis_is_dynamic(trained: Path) -> None:
    file = trained / paths.ONNX
    export.check_graph(file)
    run = runtimes.onnxruntime(file)
    for batch in (1, 3, 17):
        assert run(np.zeros((batch, 1, 28, 28), dtype=np.float32)).shape == (batch, 10)


def test_fixed_batch_onnx_is_refused(trained: Path, tmp_path: Path) -> None:
    model = onnx.load(str(trained / paths.ONNX))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 4
    fixed = tmp_path / "fixed.onnx"
    onnx.save(model, str(fixed))
    with pytest.raises(StageError, match="fixed batch size 4"):
        export.check_graph(fixed)


def tamper_logit_bias(source: Path, target: Path, delta: np.ndarray) -> None:
    """Add `delta` to the final layer's bias (the one initializer shaped like the logits)."""
    model = onnx.load(str(source))
    (bias,) = [i for i in model.graph.initializer if list(i.dims) == [len(delta)]]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + delta, bias.name))
    onnx.save(model, str(target))


def test_parity_gates_pass_the_real_onnx_and_fail_tampered_ones(trained_repo: Path) -> None:
    cfg = load_params().export
    reference, images = reference_logits()
    result = export.verify(paths.ONNX, reference, images, cfg)
    assert result["argmax_agreement"] == 1.0

    # A nudge no prediction notices, yet ten times the tolerance: the atol gate.
    nudged = trained_repo / "nudged.onnx"
    tamper_logit_bias(paths.ONNX, nudged, np.full(10, 10 * cfg.atol, dtype=np.float32))
    with pytest.raises(StageError, match=r"more than export\.atol"):
        export.verify(nudged, reference, images, cfg)

    # A bias that makes class 0 win almost everywhere: the agreement gate, even with a
    # tolerance too loose to notice.
    biased = trained_repo / "biased.onnx"
    delta = np.zeros(10, dtype=np.float32)
    delta[0] = 1000.0
    tamper_logit_bias(paths.ONNX, biased, delta)
    loose = cfg.model_copy(update={"atol": 1e6})
    with pytest.raises(StageError, match=r"below export\.min_agreement") as failure:
        export.verify(biased, reference, images, loose)
    assert "\n" not in str(failure.value)


def test_parity_gate_catches_an_onnx_stale_against_model_pt(trained_repo: Path) -> None:
    # The PyTorch weights moved on (retrained, edited) but the ONNX file did not.
    blob = torch.load(paths.MODEL, weights_only=True)
    first = next(k for k in blob["state_dict"] if k.endswith("weight"))
    blob["state_dict"][first] = blob["state_dict"][first] * 1.05
    torch.save(blob, paths.MODEL)
    reference, images = reference_logits()
    with pytest.raises(StageError, match=r"export\.atol"):
        export.verify(paths.ONNX, reference, images, load_params().export)


def test_failed_gate_keeps_the_previous_onnx(trained_repo: Path) -> None:
    before = paths.ONNX.read_bytes()
    # The real exporter's real difference (~1e-6) is far above this tolerance.
    write_params(trained_repo, export={"atol": 1e-12})
    with pytest.raises(StageError, match=r"export\.atol=1e-12"):
        export.main(load_params())
    assert paths.ONNX.read_bytes() == before
    assert leftovers(paths.MODELS) == []


def test_legacy_exporter_passes_the_same_gates(trained_repo: Path) -> None:
    cfg = load_params().export.model_copy(update={"legacy": True})
    model, config = models.load(paths.MODEL)
    file = trained_repo / "legacy.onnx"
    assert export.to_onnx(model, models.example_input(config, 2), file, cfg) == "torchscript"
    reference, images = reference_logits()
    assert export.verify(file, reference, images, cfg)["argmax_agreement"] == 1.0


# ---------------------------------------------------------------------------- convert


def test_convert_metrics_of_the_real_model(trained: Path) -> None:
    metrics = json.loads((trained / paths.CONVERT_METRICS).read_text())
    evaluated = json.loads((trained / paths.EVALUATE_METRICS).read_text())
    params = load_params(trained / paths.PARAMS)
    assert list(metrics) == ["accuracy_fp16", "accuracy_int8", "int8_accuracy_drop"]
    for name in ("fp16", "int8"):
        assert 0.5 < metrics[f"accuracy_{name}"] <= 1.0
    assert metrics["int8_accuracy_drop"] == pytest.approx(
        evaluated["accuracy"] - metrics["accuracy_int8"]
    )
    assert metrics["int8_accuracy_drop"] <= params.openvino.max_accuracy_drop + convert.EPSILON
    # INT8 weights take a quarter of FP32's bytes, half of FP16's (plus scales and graph).
    assert runtimes.size_mb(trained / paths.IR_INT8) < 0.7 * runtimes.size_mb(
        trained / paths.IR_FP16
    )


@pytest.mark.parametrize(
    ("pytorch", "int8", "passes"),
    [
        (0.99, 0.985, True),  # exactly the allowed drop: 0.99 - 0.985 > 0.005 in floats
        (0.9833, 0.9861, True),  # INT8 better than PyTorch
        (0.99, 0.98, False),
        (1.0, 0.0, False),
    ],
)
def test_int8_gate_on_numbers(pytorch: float, int8: float, passes: bool) -> None:
    cfg = load_params(Path(__file__).parent.parent / paths.PARAMS).openvino
    assert cfg.max_accuracy_drop == 0.005
    if passes:
        convert.check_int8(pytorch - int8, int8, cfg)
        return
    with pytest.raises(
        StageError, match=r"max_accuracy_drop=0\.005 \(try openvino\.accuracy_aware"
    ):
        convert.check_int8(pytorch - int8, int8, cfg)


def calibrate_on_white_pages(repo: Path) -> None:
    """Replace the training images (convert calibrates on them) by blank white ones.

    Honest garbage: NNCF then measures activation ranges that real digits never produce,
    so the INT8 model really loses accuracy on the (untouched) test split.
    """
    file = repo / paths.split_file("train")
    blob = torch.load(file, weights_only=True)
    blob["images"] = torch.full_like(blob["images"], 255)
    torch.save(blob, file)


def test_int8_gate_fails_on_garbage_calibration_and_keeps_the_previous_ir(
    trained_repo: Path,
) -> None:
    before = {f.name: f.read_bytes() for f in paths.OPENVINO.iterdir()}
    metrics_before = paths.CONVERT_METRICS.read_text()
    calibrate_on_white_pages(trained_repo)
    with pytest.raises(StageError, match=r"convert: INT8 accuracy .* points below PyTorch"):
        convert.main(load_params())
    assert {f.name: f.read_bytes() for f in paths.OPENVINO.iterdir()} == before
    assert paths.CONVERT_METRICS.read_text() == metrics_before
    assert leftovers(paths.MODELS) == []


def test_accuracy_aware_int8_recovers_from_garbage_calibration(trained_repo: Path) -> None:
    calibrate_on_white_pages(trained_repo)
    write_params(trained_repo, openvino={"accuracy_aware": True, "fp32": True})
    params = load_params()
    convert.main(params)
    metrics = json.loads(paths.CONVERT_METRICS.read_text())
    assert metrics["int8_accuracy_drop"] <= params.openvino.max_accuracy_drop + convert.EPSILON
    # The FP32 IR is the ONNX model with its weights kept whole: twice the FP16 bytes,
    # PyTorch's accuracy (within a point: OpenVINO computes in bf16 on CPUs that have it).
    assert paths.IR_FP32.exists()
    evaluated = json.loads(paths.EVALUATE_METRICS.read_text())
    assert metrics["accuracy_fp32"] == pytest.approx(evaluated["accuracy"], abs=0.01)
    assert runtimes.size_mb(paths.IR_FP32) == pytest.approx(
        2 * runtimes.size_mb(paths.IR_FP16), rel=0.05
    )


def test_accuracy_aware_never_validates_on_test_images() -> None:
    """With no validation split it checks training images NNCF did not calibrate on."""
    cfg = load_params(Path(__file__).parent.parent / paths.PARAMS).openvino
    # Image i holds the number i, so the picks can be told apart after the 0..1 scaling.
    train = datasets.Split(torch.arange(2000).view(-1, 1, 1, 1), torch.zeros(2000))
    empty = train.subset(np.array([], dtype=np.int64))
    picked = convert.validation_images(empty, train, cfg, seed=7)
    batches = convert.calibration_batches(train.images, cfg.calibration_size, 7)
    calibrated = {round(float(x[0, 0, 0, 0]) * 255) for x in batches}
    assert len(calibrated) == cfg.calibration_size
    assert len(picked) == convert.FALLBACK_VALIDATION
    assert calibrated.isdisjoint(int(v) for v in picked.flatten())
    val = train.subset(np.arange(5))
    assert torch.equal(convert.validation_images(val, train, cfg, seed=7), val.images)
