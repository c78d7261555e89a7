"""Stage convert: ONNX to OpenVINO IR (FP16, optional FP32) and INT8 through NNCF."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from stages import datasets, logs, paths, runtimes, tracking
from stages.errors import StageError
from stages.outputs import atomic_dir, write_json
from stages.params import OpenVINO, Params, load_params

log = logging.getLogger("stages.convert")
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


def quantize(
    ov_model, calibration: list[np.ndarray], cfg: OpenVINO, validation: list[tuple[np.ndarray, int]]
):
    """INT8 by NNCF post-training quantization (accuracy-aware when asked).

    The accuracy-aware loop scores agreement with PyTorch's classes, not accuracy: a
    model that agrees on all but a share d of images loses at most d accuracy, and on a
    few hundred validation images accuracy alone can stay flat while predictions flip
    (the test split then shows the loss).
    """
    import nncf

    # NNCF resets its logger to INFO on import: keep its statistics out of the stage log.
    nncf.set_log_level(logging.WARNING)
    calibration_set = nncf.Dataset(calibration)
    if not cfg.accuracy_aware:
        return nncf.quantize(ov_model, calibration_set, subset_size=len(calibration))
    return nncf.quantize_with_accuracy_control(
        ov_model,
        calibration_set,
        nncf.Dataset(validation, lambda item: item[0]),
        validation_fn=validate,
        max_drop=cfg.max_accuracy_drop,
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(calibration),
    )


def score_ir(xml: Path, test: datasets.Split, reference: np.ndarray) -> dict[str, float]:
    """Test accuracy of an IR and how often it picks PyTorch's class."""
    logits = runtimes.logits(runtimes.openvino(xml), test.images)
    labels = test.labels.numpy()
    return {
        "accuracy": float((logits.argmax(1) == labels).mean()),
        "agreement": runtimes.agreement(reference, logits),
    }


def check_int8(drop: float, accuracy_int8: float, cfg: OpenVINO) -> None:
    """Refuse an INT8 model that lost more test accuracy than openvino.max_accuracy_drop."""
    if drop > cfg.max_accuracy_drop + EPSILON:
        hint = "" if cfg.accuracy_aware else " (try openvino.accuracy_aware: true)"
        raise StageError(
            f"convert: INT8 accuracy {accuracy_int8:.4f} is {drop * 100:.2f} points below "
            f"PyTorch's {accuracy_int8 + drop:.4f}, more than "
            f"openvino.max_accuracy_drop={cfg.max_accuracy_drop:g}{hint}"
        )


def main(params: Params) -> None:
    """Write models/openvino/ (FP16 + INT8 IR) and their test accuracy against PyTorch."""
    import openvino as ov

    log = logs.setup("convert")
    cfg = params.openvino
    with tracking.Recorder("convert", params):
        if not paths.ONNX.exists():
            raise StageError(f"{paths.ONNX}: not found (run the export stage first)")
        test = datasets.load_split("test")
        train = datasets.load_split("train")
        pytorch = runtimes.pytorch(paths.MODEL)
        reference = runtimes.logits(pytorch, test.images)
        validation: list[tuple[np.ndarray, int]] = []
        if cfg.accuracy_aware:
            images = validation_images(datasets.load_split("val"), train, cfg, params.seed)
            validation = agreement_items(pytorch, images)
        accuracy_pytorch = float((reference.argmax(1) == test.labels.numpy()).mean())
        # The whole folder is built aside and swapped in only after the accuracy gate:
        # a failed gate leaves no IR for benchmark to pick up.
        with atomic_dir(paths.OPENVINO) as tmp:
            ov_model = ov.convert_model(str(paths.ONNX))
            variants: dict[str, Path] = {}
            if cfg.fp32:  # saved before the FP16 copy so no compression can leak into it
                variants["fp32"] = tmp / paths.IR_FP32.name
                ov.save_model(ov_model, variants["fp32"], compress_to_fp16=False)
            variants["fp16"] = tmp / paths.IR_FP16.name
            ov.save_model(ov_model, variants["fp16"], compress_to_fp16=True)
            calibration = calibration_batches(train.images, cfg.calibration_size, params.seed)
            int8 = quantize(ov.convert_model(str(paths.ONNX)), calibration, cfg, validation)
            variants["int8"] = tmp / paths.IR_INT8.name
            ov.save_model(int8, variants["int8"])
            scored = {name: score_ir(xml, test, reference) for name, xml in variants.items()}
            metrics = {f"accuracy_{name}": s["accuracy"] for name, s in scored.items()}
            metrics["int8_accuracy_drop"] = accuracy_pytorch - metrics["accuracy_int8"]
            check_int8(metrics["int8_accuracy_drop"], metrics["accuracy_int8"], cfg)
            precision = runtimes.openvino_precision(variants["fp16"])
        write_json(paths.CONVERT_METRICS, metrics)
    log.info(
        "OpenVINO IR (CPU computes in %s): FP16 accuracy %.4f, INT8 accuracy %.4f "
        "(PyTorch %.4f, INT8 agrees on %.4f); %.2f MB -> %.2f MB",
        precision,
        metrics["accuracy_fp16"],
        metrics["accuracy_int8"],
        accuracy_pytorch,
        scored["int8"]["agreement"],
        runtimes.size_mb(paths.IR_FP16),
        runtimes.size_mb(paths.IR_INT8),
    )


if __name__ == "__main__":
    main(load_params())
