"""Export and convert gates on real ONNX Runtime, OpenVINO and NNCF: export's pass on the
real model, fail on tampered ones and keep the previous file; convert's INT8 ladder ships
plain INT8 on the real model, climbs on garbage calibration and falls back to FP16."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper

from helpers.repos import write_params
from stages import convert, export
from stages.core import paths
from stages.core.errors import StageError
from stages.core.params import ParamsError, load_params
from stages.data import datasets
from stages.models import runtimes, zoo


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
    import onnxruntime as ort

    model, config = zoo.load(paths.MODEL)
    cfg = load_params().export
    file = tmp_path / "dynamo.onnx"
    assert export.to_onnx(model, zoo.example_input(config, 2), file, cfg) == "dynamo"

    # The file itself: a valid graph at the asked opset, batch symbolic in and out.
    onnx.checker.check_model(str(file), full_check=True)
    graph = onnx.load(str(file))
    assert graph.opset_import[0].version == cfg.opset
    (images,), (logits,) = graph.graph.input, graph.graph.output
    assert (images.name, logits.name) == ("images", "logits")
    batch = {v.type.tensor_type.shape.dim[0].dim_param for v in (images, logits)}
    assert len(batch) == 1 and "" not in batch, f"batch axes {batch}: not one symbol"
    assert [d.dim_value for d in images.type.tensor_type.shape.dim[1:]] == [
        config["channels"],
        config["image_size"],
        config["image_size"],
    ]
    # ONNX Runtime on it (not through the stages' runtime) against PyTorch, on real test
    # images at batch sizes other than the example's 2.
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    inputs = datasets.to_model_input(datasets.load_split("test").images)
    for count in (1, 7, len(inputs)):
        with torch.no_grad():
            expected = model(inputs[:count]).numpy()
        (got,) = session.run(None, {"images": inputs[:count].numpy()})
        assert got.shape == (count, len(config["classes"]))
        np.testing.assert_allclose(got, expected, rtol=0, atol=cfg.atol)
        assert (got.argmax(1) == expected.argmax(1)).all()


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
    model, config = zoo.load(paths.MODEL)
    file = trained_repo / "legacy.onnx"
    assert export.to_onnx(model, zoo.example_input(config, 2), file, cfg) == "torchscript"
    reference, images = reference_logits()
    assert export.verify(file, reference, images, cfg)["argmax_agreement"] == 1.0


# ---------------------------------------------------------------------------- convert


def int8_files() -> list[str]:
    """The INT8 IR's files in models/openvino."""
    return sorted(p.name for p in paths.OPENVINO.glob(f"{paths.IR_INT8.stem}.*"))


def quantization_points(xml: Path) -> int:
    """FakeQuantize ops in a saved IR: how much of it is INT8."""
    import openvino as ov

    return convert.int8_points(ov.Core().read_model(xml))


def test_convert_metrics_of_the_real_model(trained: Path) -> None:
    metrics = json.loads((trained / paths.CONVERT_METRICS).read_text())
    evaluated = json.loads((trained / paths.EVALUATE_METRICS).read_text())
    params = load_params(trained / paths.PARAMS)
    assert params.openvino.int8_methods == ["plain", "mixed", "accuracy_aware"]
    assert list(metrics) == [
        "accuracy_fp16",
        "accuracy_int8",
        "int8_accuracy_drop",
        "int8_method",
        "int8_attempts",
    ]
    for name in ("fp16", "int8"):
        assert 0.5 < metrics[f"accuracy_{name}"] <= 1.0
    assert metrics["int8_accuracy_drop"] == pytest.approx(
        evaluated["accuracy"] - metrics["accuracy_int8"]
    )
    assert metrics["int8_accuracy_drop"] <= params.openvino.max_accuracy_drop + convert.EPSILON
    # Real calibration: the first rung passes, and only the attempts made are recorded.
    assert metrics["int8_method"] == "plain"
    assert metrics["int8_attempts"] == {"plain": metrics["int8_accuracy_drop"]}
    # INT8 weights take a quarter of FP32's bytes, half of FP16's (plus scales and graph).
    assert runtimes.size_mb(trained / paths.IR_INT8) < 0.7 * runtimes.size_mb(
        trained / paths.IR_FP16
    )
    assert quantization_points(trained / paths.IR_INT8) > 0


@pytest.mark.parametrize(
    ("pytorch", "int8", "points", "why"),
    [
        (0.99, 0.985, 4, None),  # exactly the allowed drop: 0.99 - 0.985 > 0.005 in floats
        (0.9833, 0.9861, 4, None),  # INT8 better than PyTorch
        (0.99, 0.98, 4, r"0\.9800 is 1\.00 points below .* openvino\.max_accuracy_drop=0\.005$"),
        (1.0, 0.0, 4, r"max_accuracy_drop=0\.005$"),
        (0.99, 0.99, 0, r"every layer to float"),  # accurate, but nothing left is INT8
    ],
)
def test_int8_gate_on_numbers(pytorch: float, int8: float, points: int, why: str | None) -> None:
    cfg = load_params(Path(__file__).parent.parent / paths.PARAMS).openvino
    assert cfg.max_accuracy_drop == 0.005
    found = convert.rejection(int8, pytorch, points, cfg)
    if why is None:
        assert found is None
    else:
        assert found is not None and re.search(why, found), found


def calibrate_on_white_pages(repo: Path, every: int = 1) -> None:
    """Replace every `every`-th training image (convert calibrates on them) by a blank white one.

    Honest garbage: NNCF then measures activation ranges that real digits never produce,
    so the INT8 model really loses accuracy on the (untouched) test split. All white
    pages break every layer; half of them break some layers more than others.
    """
    file = repo / paths.split_file("train")
    blob = torch.load(file, weights_only=True)
    blob["images"][::every] = 255
    torch.save(blob, file)


@pytest.mark.slow  # several seconds on its own: out of the `not slow` loop
def test_garbage_calibration_climbs_the_ladder_to_accuracy_aware(trained_repo: Path) -> None:
    plain_points = quantization_points(paths.IR_INT8)
    calibrate_on_white_pages(trained_repo, every=2)
    write_params(trained_repo, openvino={"fp32": True})
    params = load_params()
    limit = params.openvino.max_accuracy_drop + convert.EPSILON
    convert.main(params)
    metrics = json.loads(paths.CONVERT_METRICS.read_text())
    assert list(metrics) == [
        "accuracy_fp32",
        "accuracy_fp16",
        "accuracy_int8",
        "int8_accuracy_drop",
        "int8_method",
        "int8_attempts",
    ]
    attempts = metrics["int8_attempts"]
    # Tried in the params' order; the first two really broke the limit on the test split.
    assert list(attempts) == ["plain", "mixed", "accuracy_aware"]
    assert attempts["plain"] > limit and attempts["mixed"] > limit
    assert metrics["int8_method"] == "accuracy_aware"
    assert metrics["int8_accuracy_drop"] == attempts["accuracy_aware"] <= limit
    # It returned the harmful layers to float and kept the others INT8.
    assert 0 < quantization_points(paths.IR_INT8) < plain_points
    # The FP32 IR is the ONNX model with its weights kept whole: twice the FP16 bytes,
    # PyTorch's accuracy (within a point: OpenVINO computes in bf16 on CPUs that have it).
    assert paths.IR_FP32.exists()
    evaluated = json.loads(paths.EVALUATE_METRICS.read_text())
    assert metrics["accuracy_fp32"] == pytest.approx(evaluated["accuracy"], abs=0.01)
    assert runtimes.size_mb(paths.IR_FP32) == pytest.approx(
        2 * runtimes.size_mb(paths.IR_FP16), rel=0.05
    )
    assert leftovers(paths.MODELS) == []


@pytest.mark.slow  # several seconds on its own: out of the `not slow` loop
def test_a_float_model_from_the_ladder_is_not_shipped_and_fp16_is(
    trained_repo: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # NNCF's accuracy-aware loop may return every layer to float. It did for all white pages
    # on a CPU without native bf16; on one with bf16 it kept some layers INT8. That model is
    # accurate, but it is FP16 under the INT8 name: FP16 ships instead. Plain and mixed
    # really break on white pages; the accuracy-aware rung returns the graph it was given,
    # unquantized, as NNCF does when it reverts every layer.
    # No rung passes: no INT8 IR (the previous run's is gone), FP16 ships, no stage error.
    assert int8_files() == ["model_int8.bin", "model_int8.xml"]  # the previous run's
    calibrate_on_white_pages(trained_repo)
    real = convert.quantize

    def quantize(ov_model, method: str, *args):
        return ov_model if method == "accuracy_aware" else real(ov_model, method, *args)

    monkeypatch.setattr(convert, "quantize", quantize)
    params = load_params()
    capfd.readouterr()
    convert.main(params)
    metrics = json.loads(paths.CONVERT_METRICS.read_text())
    attempts = metrics["int8_attempts"]
    assert metrics == {  # no INT8 accuracy where no INT8 IR ships
        "accuracy_fp16": metrics["accuracy_fp16"],
        "int8_method": "none",
        "int8_attempts": attempts,
    }
    assert list(attempts) == ["plain", "mixed", "accuracy_aware"]
    limit = params.openvino.max_accuracy_drop + convert.EPSILON
    assert attempts["plain"] > limit and attempts["mixed"] > limit
    assert attempts["accuracy_aware"] <= limit
    assert int8_files() == []
    assert paths.IR_FP16.exists() and paths.IR_FP16.with_suffix(".bin").exists()
    assert leftovers(paths.MODELS) == []
    lines = capfd.readouterr().err.splitlines()
    failed = [line for line in lines if "not shipped" in line]
    assert len(failed) == 3
    assert "every layer to float" in failed[2]
    assert lines[-1].endswith(
        "no INT8 passed (tried plain, mixed, accuracy_aware): FP16 is the deployable IR"
    )


def test_no_int8_methods_writes_fp16_only(trained_repo: Path) -> None:
    write_params(trained_repo, openvino={"int8_methods": []})
    convert.main(load_params())
    metrics = json.loads(paths.CONVERT_METRICS.read_text())
    assert list(metrics) == ["accuracy_fp16", "int8_method", "int8_attempts"]
    assert metrics["int8_method"] == "none" and metrics["int8_attempts"] == {}
    assert sorted(p.name for p in paths.OPENVINO.iterdir()) == ["model.bin", "model.xml"]


def activation_ranges(xml: Path) -> list[tuple[float, float]]:
    """The (low, high) input range of each FakeQuantize on an activation in an IR."""
    import openvino as ov

    def value(output) -> float:
        node = output.get_node()
        while node.get_type_name() != "Constant":  # FP16 constants sit behind a Convert
            node = node.input_value(0).get_node()
        return float(np.asarray(node.get_data()).ravel()[0])

    ranges = []
    for op in ov.Core().read_model(xml).get_ops():
        source = op.input_value(0).get_node().get_type_name() if op.get_input_size() else ""
        if op.get_type_name() == "FakeQuantize" and source != "Constant":
            ranges.append((value(op.input_value(1)), value(op.input_value(2))))
    return ranges


def symmetric(low: float, high: float) -> bool:
    """Unsigned (from 0) or signed about 0: what NNCF's performance preset produces."""
    return low == 0.0 or -low == pytest.approx(high, rel=0.02)


def test_the_ladder_follows_the_params_order_and_mixed_is_its_own_preset(
    trained_repo: Path,
) -> None:
    plain = activation_ranges(paths.IR_INT8)
    write_params(trained_repo, openvino={"int8_methods": ["mixed", "plain"]})
    params = load_params()
    convert.main(params)
    metrics = json.loads(paths.CONVERT_METRICS.read_text())
    assert metrics["int8_method"] == "mixed"
    assert list(metrics["int8_attempts"]) == ["mixed"]  # passed first: plain never tried
    assert metrics["int8_accuracy_drop"] <= params.openvino.max_accuracy_drop + convert.EPSILON
    # The performance preset quantizes every activation symmetrically; the mixed preset
    # gives the signed (normalized input) one an asymmetric range.
    assert plain and all(symmetric(*r) for r in plain)
    mixed = activation_ranges(paths.IR_INT8)
    assert len(mixed) == len(plain) and not all(symmetric(*r) for r in mixed)


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("int8_methods", ["plain", "int4"], "int8_methods.1: expected 'plain', 'mixed'"),
        (
            "int8_methods",
            ["mixed", "mixed"],
            "int8_methods: each INT8 method at most once",
        ),
        ("int8_methods", "plain", "int8_methods: expected a valid list"),
        ("accuracy_aware", True, "accuracy_aware: replaced by openvino.int8_methods ("),
    ],
)
def test_bad_int8_methods_are_one_line(tmp_path: Path, key: str, value, words: str) -> None:
    raw = yaml.safe_load((Path(__file__).parent.parent / paths.PARAMS).read_text())
    raw["openvino"][key] = value
    file = tmp_path / "params.yaml"
    file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError) as caught:
        load_params(file)
    assert str(caught.value).startswith(f"{file}: openvino.{words}")
    assert "\n" not in str(caught.value)


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
