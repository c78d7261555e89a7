"""Stage export: ONNX with a dynamic batch axis, checked against PyTorch on the test split."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from stages.core import logs, paths
from stages.core.errors import StageError, first_line
from stages.core.outputs import atomic_file, write_json
from stages.core.params import Export, Params
from stages.data import datasets
from stages.models import runtimes, zoo
from stages.tracking import helper

log = logging.getLogger(__name__)
NAMES = {"input_names": ["images"], "output_names": ["logits"]}


def _legacy(model: torch.nn.Module, example: torch.Tensor, file: Path, cfg: Export) -> None:
    torch.onnx.export(
        model,
        (example,),
        str(file),
        dynamo=False,
        opset_version=cfg.opset,
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        **NAMES,
    )


def to_onnx(model: torch.nn.Module, example: torch.Tensor, file: Path, cfg: Export) -> str:
    """Export with torch.export (dynamo); the legacy exporter only when asked or needed."""
    if cfg.legacy:
        log.info("export.legacy is true: using the TorchScript exporter")
    else:
        try:
            with warnings.catch_warnings():
                # torch.export's notes on internals are not the user's business; failures
                # still raise and are reported below.
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
                    **NAMES,
                )
            return "dynamo"
        except Exception as exc:
            log.warning(
                "torch.export could not export the model (%s); falling back to the "
                "legacy TorchScript exporter",
                first_line(exc),
            )
    try:
        _legacy(model, example, file, cfg)
    except Exception as exc:
        raise StageError(
            f"export: the model cannot be exported to ONNX ({first_line(exc)})"
        ) from None
    return "torchscript"


def check_graph(file: Path) -> None:
    """onnx.checker's full check (with shape inference) and a symbolic batch axis."""
    try:
        onnx.checker.check_model(str(file), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise StageError(f"export: the ONNX graph is invalid ({first_line(exc)})") from None
    graph = onnx.load(str(file), load_external_data=False).graph
    for value in (*graph.input, *graph.output):
        first = value.type.tensor_type.shape.dim[0]
        # A fixed batch would make the model reject every other batch size in ONNX
        # Runtime, OpenVINO and predict.
        if not first.dim_param:
            raise StageError(
                f"export: ONNX {value.name!r} has a fixed batch size {first.dim_value}, "
                "expected a dynamic batch axis"
            )


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Largest absolute logit difference and the share of equal argmax predictions."""
    return {
        "max_abs_diff": float(np.abs(reference - candidate).max()),
        "argmax_agreement": runtimes.agreement(reference, candidate),
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


def verify(file: Path, reference: np.ndarray, images: torch.Tensor, cfg: Export) -> dict:
    """Check an ONNX file and gate it on parity with PyTorch's logits for `images`."""
    check_graph(file)
    # runtimes.logits feeds batches of 256 and the remainder: two batch sizes, so the
    # dynamic axis is exercised, not only declared.
    result = parity(reference, runtimes.logits(runtimes.onnxruntime(file), images))
    check_gates(result, cfg)
    return result


def main(params: Params) -> None:
    """Export models/model.pt to models/model.onnx and gate it on parity with PyTorch."""
    logs.setup("export")
    cfg = params.export
    with helper.Recorder("export", params):
        model, config = zoo.load(paths.MODEL)
        test = datasets.load_split("test")
        reference = runtimes.logits(runtimes.pytorch(paths.MODEL), test.images)
        # Exported to a temporary file and moved into place only when every check passed:
        # a failed gate leaves no half-checked model for convert to pick up.
        with atomic_file(paths.ONNX) as tmp:
            exporter = to_onnx(model, zoo.example_input(config, 2), tmp, cfg)
            result = verify(tmp, reference, test.images, cfg)
        write_json(paths.EXPORT_METRICS, result)
    log.info(
        "ONNX (%s exporter, opset %d, %.1f MB): max |diff| %.2e, argmax agreement %.4f on %d "
        "images",
        exporter,
        cfg.opset,
        paths.ONNX.stat().st_size / 2**20,
        result["max_abs_diff"],
        result["argmax_agreement"],
        len(test),
    )
