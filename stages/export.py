"""Stage export: ONNX with a dynamic batch axis, checked against PyTorch on the test split."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from stages import datasets, logs, models, paths, runtimes, tracking
from stages.errors import StageError
from stages.outputs import atomic_file, write_json
from stages.params import Export, Params, load_params

log = logging.getLogger("stages.export")


def to_onnx(model: torch.nn.Module, example: torch.Tensor, file: Path, cfg: Export) -> str:
    """Export with torch.export (dynamo); the legacy exporter only when asked or needed."""
    names = {"input_names": ["images"], "output_names": ["logits"]}
    if not cfg.legacy:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    (example,),
                    str(file),
                    dynamo=True,
                    opset_version=cfg.opset,
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                    external_data=False,
                    verbose=False,
                    **names,
                )
            return "dynamo"
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning(
                "torch.export could not export the model (%s); falling back to the "
                "legacy TorchScript exporter",
                reason,
            )
    torch.onnx.export(
        model,
        (example,),
        str(file),
        dynamo=False,
        opset_version=cfg.opset,
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        **names,
    )
    return "torchscript"


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Largest absolute logit difference and the share of equal argmax predictions."""
    return {
        "max_abs_diff": float(np.abs(reference - candidate).max()),
        "argmax_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
    }


def check_gates(result: dict[str, float], cfg: Export) -> None:
    """Refuse an ONNX model that no longer agrees with PyTorch."""
    if result["max_abs_diff"] > cfg.atol:
        raise StageError(
            f"export: ONNX differs from PyTorch by up to {result['max_abs_diff']:.3g}"
            f" on the test split, more than export.atol={cfg.atol:g}"
        )
    if result["argmax_agreement"] < cfg.min_agreement:
        raise StageError(
            f"export: ONNX picks the same class as PyTorch on only "
            f"{result['argmax_agreement']:.4f} of the test split, below "
            f"export.min_agreement={cfg.min_agreement:g}"
        )


def main(params: Params) -> None:
    """Export models/model.pt to models/model.onnx and gate it on parity with PyTorch."""
    logs.setup("export")
    cfg = params.export
    with tracking.Tracker(params.mlflow, "export") as tracker:
        tracker.attach(params)
        model, config = models.load(paths.MODEL)
        test = datasets.load_split("test")
        reference = runtimes.logits(runtimes.pytorch(paths.MODEL), test.images)
        # Exported to a temporary file and moved into place only when every check passed:
        # a failed gate leaves no model for convert to pick up.
        with atomic_file(paths.ONNX) as tmp:
            exporter = to_onnx(model, models.example_input(config, 2), tmp, cfg)
            onnx.checker.check_model(str(tmp), full_check=True)
            result = parity(reference, runtimes.logits(runtimes.onnxruntime(tmp), test.images))
            result["count"] = len(test)
            check_gates(result, cfg)
        metrics = {
            **result,
            "opset": cfg.opset,
            "exporter": exporter,
            "size_mb": paths.ONNX.stat().st_size / 2**20,
        }
        write_json(paths.EXPORT_METRICS, metrics)
        tracker.log_params(params.flat("export"))
        tracker.log_metrics(tracking.prefixed("export", metrics))
        tracker.log_onnx_model(paths.ONNX, models.example_input(config, 1))
    log.info(
        "ONNX (%s, opset %d): max |diff| %.2e, argmax agreement %.4f on %d images",
        exporter,
        cfg.opset,
        result["max_abs_diff"],
        result["argmax_agreement"],
        len(test),
    )


if __name__ == "__main__":
    main(load_params())
