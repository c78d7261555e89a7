"""Stage convert: ONNX to OpenVINO IR (FP16, optional FP32) and INT8 through NNCF: the
methods of openvino.int8_methods are tried in order until one passes the accuracy gate;
when none does, no INT8 IR is written and FP16 is the deployable IR."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.core import logs, paths
from stages.core.errors import StageError
from stages.core.outputs import atomic_dir, write_json
from stages.core.params import OpenVINO, Params
from stages.data import datasets
from stages.models import runtimes
from stages.tracking import helper

log = logging.getLogger(__name__)
# Accuracies are fractions of a few hundred images: a drop of exactly the allowed amount
# (0.990 - 0.985) must not fail on the last bit of a float subtraction.
EPSILON = 1e-9


# Training images the accuracy-aware loop checks agreement on when there is no
# validation split (data.val_fraction: 0); never the test split the gate judges.
FALLBACK_VALIDATION = 1000


def shuffled(count: int, seed: int) -> list[int]:
    """A seeded permutation of range(count)."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()


def calibration_batches(images: torch.Tensor, count: int, seed: int) -> list[np.ndarray]:
    """A seeded random subset of training images, one 0..1 float image per item."""
    pick = shuffled(len(images), seed)[:count]
    return [datasets.to_model_input(images[i : i + 1]).numpy() for i in pick]


def validation_images(val: datasets.Split, train: datasets.Split, cfg: OpenVINO, seed: int):
    """The validation split, or training images NNCF did not calibrate on when it is empty."""
    if len(val):
        return val.images
    log.warning("the validation split is empty: accuracy-aware INT8 checks training images")
    rest = shuffled(len(train), seed)[cfg.calibration_size :][:FALLBACK_VALIDATION]
    return train.images[rest]


def agreement_items(run: runtimes.Runtime, images: torch.Tensor) -> list[tuple[np.ndarray, int]]:
    """(one 0..1 image, the class PyTorch picks for it) pairs for the accuracy-aware loop."""
    wanted = runtimes.logits(run, images).argmax(1).tolist()
    return [
        (datasets.to_model_input(images[i : i + 1]).numpy(), wanted[i]) for i in range(len(images))
    ]


def validate(compiled, items) -> tuple[float, list[float]]:
    """Share of images where a compiled model picks PyTorch's class, and per-image hits."""
    output = compiled.output(0)
    hits = [float(int(compiled(image)[output].argmax()) == wanted) for image, wanted in items]
    return float(np.mean(hits)), hits


def validation_items(
    pytorch: runtimes.Runtime, train: datasets.Split, cfg: OpenVINO, seed: int
) -> list[tuple[np.ndarray, int]]:
    """The accuracy-aware loop's items: validation (or unseen training) images, PyTorch's class."""
    images = validation_images(datasets.load_split("val"), train, cfg, seed)
    return agreement_items(pytorch, images)


def quantize(
    ov_model,
    method: str,
    calibration: list[np.ndarray],
    cfg: OpenVINO,
    validation: Callable[[], list[tuple[np.ndarray, int]]],
):
    """INT8 by one rung: NNCF's default or mixed preset, or accuracy-aware quantization.

    The accuracy-aware loop scores agreement with PyTorch's classes, not accuracy: a
    model that agrees on all but a share d of images loses at most d accuracy, and on a
    few hundred validation images accuracy alone can stay flat while predictions flip
    (the test split then shows the loss). `validation` is called only for that rung: the
    other rungs need no PyTorch pass over the validation images.
    """
    import nncf

    # NNCF resets its logger to INFO on import: keep its statistics out of the stage log.
    nncf.set_log_level(logging.WARNING)
    calibration_set = nncf.Dataset(calibration)
    if method == "accuracy_aware":
        return nncf.quantize_with_accuracy_control(
            ov_model,
            calibration_set,
            nncf.Dataset(validation(), lambda item: item[0]),
            validation_fn=validate,
            max_drop=cfg.max_accuracy_drop,
            drop_type=nncf.DropType.ABSOLUTE,
            subset_size=len(calibration),
        )
    # None is NNCF's own choice (the performance preset: symmetric activations, fastest);
    # mixed quantizes activations asymmetrically, for ranges far from symmetric about 0.
    preset = nncf.QuantizationPreset.MIXED if method == "mixed" else None
    return nncf.quantize(ov_model, calibration_set, preset=preset, subset_size=len(calibration))


def score_ir(xml: Path, test: datasets.Split, reference: np.ndarray) -> dict[str, float]:
    """Test accuracy of an IR and how often it picks PyTorch's class."""
    logits = runtimes.logits(runtimes.openvino(xml), test.images)
    labels = test.labels.numpy()
    return {
        "accuracy": float((logits.argmax(1) == labels).mean()),
        "agreement": runtimes.agreement(reference, logits),
    }


def within_limit(drop: float, cfg: OpenVINO) -> bool:
    """Whether an INT8 model lost at most openvino.max_accuracy_drop of test accuracy."""
    return drop <= cfg.max_accuracy_drop + EPSILON


def int8_points(ov_model) -> int:
    """How many quantization points (FakeQuantize ops) a quantized model holds."""
    return sum(op.get_type_name() == "FakeQuantize" for op in ov_model.get_ops())


def rejection(accuracy: float, accuracy_pytorch: float, points: int, cfg: OpenVINO) -> str | None:
    """Why an INT8 attempt must not ship, or None when it may."""
    drop = accuracy_pytorch - accuracy
    if not within_limit(drop, cfg):
        return (
            f"accuracy {accuracy:.4f} is {drop * 100:.2f} points below PyTorch's "
            f"{accuracy_pytorch:.4f}, more than openvino.max_accuracy_drop="
            f"{cfg.max_accuracy_drop:g}"
        )
    # The accuracy-aware loop may return every layer to float: a float model by the
    # INT8 name would be benchmarked and promoted as the INT8 one.
    if points == 0:
        return "NNCF returned every layer to float, so nothing in it is INT8"
    return None


def save_float_irs(onnx: Path, folder: Path, cfg: OpenVINO) -> dict[str, Path]:
    """The float IRs in `folder`: FP32 (when asked) and FP16, by name."""
    import openvino as ov

    ov_model = ov.convert_model(str(onnx))
    variants: dict[str, Path] = {}
    if cfg.fp32:  # saved before the FP16 copy so no compression can leak into it
        variants["fp32"] = folder / paths.IR_FP32.name
        ov.save_model(ov_model, variants["fp32"], compress_to_fp16=False)
    variants["fp16"] = folder / paths.IR_FP16.name
    ov.save_model(ov_model, variants["fp16"], compress_to_fp16=True)
    return variants


@dataclass
class Int8:
    """The outcome of the INT8 ladder."""

    method: str  # the rung whose IR ships, or "none"
    attempts: dict[str, dict[str, float]]  # test accuracy and drop of every rung tried
    agreement: float | None  # how often the shipped IR picks PyTorch's class

    def metrics(self) -> dict[str, Any]:
        """The INT8 part of metrics/convert.json."""
        shipped = self.attempts.get(self.method)
        head = {}
        if shipped:
            head = {"accuracy_int8": shipped["accuracy"], "int8_accuracy_drop": shipped["drop"]}
        # Each attempt's drop only (its accuracy is PyTorch's minus it): one number a rung
        # keeps `dvc metrics show` short.
        drops = {method: a["drop"] for method, a in self.attempts.items()}
        return head | {"int8_method": self.method, "int8_attempts": drops}


def quantize_int8_ladder(
    onnx: Path,
    xml: Path,
    cfg: OpenVINO,
    calibration: list[np.ndarray],
    validation: Callable[[], list[tuple[np.ndarray, int]]],
    judge: Callable[[Path], dict[str, float]],
    accuracy_pytorch: float,
) -> Int8:
    """Try openvino.int8_methods in order; the first that may ship stays at `xml`."""
    import openvino as ov

    attempts: dict[str, dict[str, float]] = {}
    for method in cfg.int8_methods:
        # A fresh graph per rung: NNCF must not start from an earlier rung's model.
        model = quantize(ov.convert_model(str(onnx)), method, calibration, cfg, validation)
        ov.save_model(model, xml)
        scored = judge(xml)
        attempts[method] = {
            "accuracy": scored["accuracy"],
            "drop": accuracy_pytorch - scored["accuracy"],
        }
        why = rejection(scored["accuracy"], accuracy_pytorch, int8_points(model), cfg)
        if why is None:
            return Int8(method, attempts, scored["agreement"])
        log.warning("INT8 by %s: %s: not shipped", method, why)
        # A failed INT8 is not shipped: benchmark and promote must not find it.
        xml.unlink()
        xml.with_suffix(".bin").unlink()
    return Int8("none", attempts, None)


def report(int8: Int8, metrics: dict[str, Any], precision: str, accuracy_pytorch: float) -> None:
    """The stage's last log line: the accuracies, sizes and which IR is deployable."""
    head = (
        f"OpenVINO IR (CPU computes in {precision}): FP16 accuracy "
        f"{metrics['accuracy_fp16']:.4f}, {runtimes.size_mb(paths.IR_FP16):.2f} MB"
    )
    if int8.method == "none":
        # Every rung tried and failed deserves a warning; an empty list was the user's choice.
        level = logging.WARNING if int8.attempts else logging.INFO
        why = f"no INT8 passed (tried {', '.join(int8.attempts)})"
        log.log(
            level,
            "%s (PyTorch %.4f); %s: FP16 is the deployable IR",
            head,
            accuracy_pytorch,
            why if int8.attempts else "openvino.int8_methods is empty",
        )
        return
    log.info(
        "%s; INT8 by %s: accuracy %.4f (PyTorch %.4f, INT8 agrees on %.4f), %.2f MB",
        head,
        int8.method,
        metrics["accuracy_int8"],
        accuracy_pytorch,
        int8.agreement,
        runtimes.size_mb(paths.IR_INT8),
    )


def main(params: Params) -> None:
    """Write models/openvino/ (FP16 + the first INT8 that passes) and their test accuracy."""
    logs.setup("convert")
    cfg = params.openvino
    with helper.Recorder("convert", params):
        if not paths.ONNX.exists():
            raise StageError(f"{paths.ONNX}: not found (run the export stage first)")
        test = datasets.load_split("test")
        train = datasets.load_split("train")
        pytorch = runtimes.pytorch(paths.MODEL)
        reference = runtimes.logits(pytorch, test.images)
        accuracy_pytorch = float((reference.argmax(1) == test.labels.numpy()).mean())
        calibration = calibration_batches(train.images, cfg.calibration_size, params.seed)

        def judge(xml: Path) -> dict[str, float]:
            return score_ir(xml, test, reference)

        # The whole folder is built aside and swapped in whole: a killed stage leaves the
        # previous IR, and no failed INT8 attempt is ever in the folder benchmark reads.
        with atomic_dir(paths.OPENVINO) as tmp:
            variants = save_float_irs(paths.ONNX, tmp, cfg)
            metrics = {f"accuracy_{name}": judge(xml)["accuracy"] for name, xml in variants.items()}
            int8 = quantize_int8_ladder(
                paths.ONNX,
                tmp / paths.IR_INT8.name,
                cfg,
                calibration,
                lambda: validation_items(pytorch, train, cfg, params.seed),
                judge,
                accuracy_pytorch,
            )
            metrics |= int8.metrics()
            precision = runtimes.openvino_precision(variants["fp16"])
        write_json(paths.CONVERT_METRICS, metrics)
    report(int8, metrics, precision, accuracy_pytorch)
