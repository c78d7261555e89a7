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


def calibration_batches(images: torch.Tensor, count: int, seed: int) -> list[np.ndarray]:
    """A seeded random subset of training images, one 0..1 float image per item."""
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(images), generator=generator)[:count]
    return [datasets.to_model_input(images[i : i + 1]).numpy() for i in pick.tolist()]


def quantize(
    ov_model,
    calibration: list[np.ndarray],
    cfg: OpenVINO,
    test: datasets.Split,
    reference_accuracy: float,
):
    """INT8 by NNCF post-training quantization (accuracy-aware when asked)."""
    import nncf

    calibration_set = nncf.Dataset(calibration)
    if not cfg.accuracy_aware:
        return nncf.quantize(ov_model, calibration_set, subset_size=len(calibration))

    labels = test.labels.numpy()
    items = [
        (datasets.to_model_input(test.images[i : i + 1]).numpy(), int(labels[i]))
        for i in range(len(test))
    ]

    def validate(compiled, data) -> float:
        output = compiled.output(0)
        hits = [int(compiled(image)[output].argmax()) == label for image, label in data]
        return float(np.mean(hits))

    return nncf.quantize_with_accuracy_control(
        ov_model,
        calibration_set,
        nncf.Dataset(items, lambda item: item[0]),
        validation_fn=validate,
        max_drop=cfg.max_accuracy_drop,
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(calibration),
    )


def agreement(reference: np.ndarray, logits: np.ndarray) -> float:
    return float((reference.argmax(1) == logits.argmax(1)).mean())


def score_ir(xml: Path, test: datasets.Split, reference: np.ndarray) -> dict[str, float]:
    """Test accuracy of an IR and how often it picks PyTorch's class."""
    logits = runtimes.logits(runtimes.openvino(xml), test.images)
    labels = test.labels.numpy()
    return {
        "accuracy": float((logits.argmax(1) == labels).mean()),
        "agreement": agreement(reference, logits),
    }


def size_mb(xml: Path) -> float:
    """Size on disk of an IR: the .xml graph plus the .bin weights."""
    return (xml.stat().st_size + xml.with_suffix(".bin").stat().st_size) / 2**20


def main(params: Params) -> None:
    """Write models/openvino/ (FP16 + INT8 IR) and their accuracy against PyTorch."""
    import openvino as ov

    logs.setup("convert")
    cfg = params.openvino
    with tracking.Tracker(params.mlflow, "convert") as tracker:
        tracker.attach(params)
        if not paths.ONNX.exists():
            raise StageError(f"{paths.ONNX}: not found (run the export stage first)")
        test = datasets.load_split("test")
        train = datasets.load_split("train")
        reference = runtimes.logits(runtimes.pytorch(paths.MODEL), test.images)
        pytorch_accuracy = float((reference.argmax(1) == test.labels.numpy()).mean())
        metrics: dict[str, float] = {"accuracy_pytorch": pytorch_accuracy}
        # The whole folder is built aside and swapped in only after the accuracy gate.
        with atomic_dir(paths.OPENVINO) as tmp:
            ov_model = ov.convert_model(str(paths.ONNX))
            variants = {"fp16": tmp / paths.IR_FP16.name}
            ov.save_model(ov_model, variants["fp16"], compress_to_fp16=True)
            if cfg.fp32:
                variants["fp32"] = tmp / paths.IR_FP32.name
                ov.save_model(ov_model, variants["fp32"], compress_to_fp16=False)
            calibration = calibration_batches(train.images, cfg.calibration_size, params.seed)
            int8 = quantize(
                ov.convert_model(str(paths.ONNX)), calibration, cfg, test, pytorch_accuracy
            )
            variants["int8"] = tmp / paths.IR_INT8.name
            ov.save_model(int8, variants["int8"])
            for name, xml in variants.items():
                scored = score_ir(xml, test, reference)
                metrics[f"accuracy_{name}"] = scored["accuracy"]
                metrics[f"agreement_{name}"] = scored["agreement"]
                metrics[f"size_mb_{name}"] = size_mb(xml)
            metrics["int8_accuracy_drop"] = pytorch_accuracy - metrics["accuracy_int8"]
            if metrics["int8_accuracy_drop"] > cfg.max_accuracy_drop:
                raise StageError(
                    f"convert: INT8 accuracy {metrics['accuracy_int8']:.4f} is "
                    f"{metrics['int8_accuracy_drop'] * 100:.2f} points below PyTorch's "
                    f"{pytorch_accuracy:.4f}, more than openvino.max_accuracy_drop="
                    f"{cfg.max_accuracy_drop:g} (try openvino.accuracy_aware: true)"
                )
        metrics["calibration_size"] = len(calibration)
        write_json(paths.CONVERT_METRICS, metrics)
        tracker.log_params(params.flat("openvino"))
        tracker.log_metrics(tracking.prefixed("convert", metrics))
        tracker.log_artifacts(paths.OPENVINO, "openvino")
    log.info(
        "OpenVINO IR: FP16 accuracy %.4f, INT8 accuracy %.4f (PyTorch %.4f); %.2f MB -> %.2f MB",
        metrics["accuracy_fp16"],
        metrics["accuracy_int8"],
        pytorch_accuracy,
        metrics["size_mb_fp16"],
        metrics["size_mb_int8"],
    )


if __name__ == "__main__":
    main(load_params())
