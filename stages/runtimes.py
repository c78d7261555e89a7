"""The four ways to run a model: PyTorch eager, ONNX Runtime, OpenVINO FP16 and INT8.

Each runtime is a callable from a float32 N x C x H x W batch of 0..1 pixels (a NumPy
array) to logits, so convert, benchmark and predict treat them alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from stages import models
from stages.errors import StageError

Runtime = Callable[[np.ndarray], np.ndarray]


def cores(threads: int) -> int:
    """0 means every core of this machine."""
    return threads or os.cpu_count() or 1


def pytorch(file: Path, threads: int = 0) -> Runtime:
    """The saved PyTorch model in eval mode, on the CPU, under no_grad."""
    torch.set_num_threads(cores(threads))
    model, _ = models.load(file)

    @torch.inference_mode()
    def run(batch: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(batch)).numpy()

    return run


def onnxruntime(file: Path, threads: int = 0) -> Runtime:
    """An ONNX Runtime CPU session with a fixed intra-op thread count."""
    import onnxruntime as ort

    if not Path(file).exists():
        raise StageError(f"{file}: not found (run the export stage first)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = cores(threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: batch})[0]

    return run


def openvino_model(file: Path, threads: int = 0, hint: str = "LATENCY"):
    """An OpenVINO IR compiled for the CPU with a thread count and a performance hint."""
    import openvino as ov

    if not Path(file).exists():
        raise StageError(f"{file}: not found (run the convert stage first)")
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": cores(threads), "PERFORMANCE_HINT": hint}
    return core.compile_model(str(file), "CPU", config)


def openvino(file: Path, threads: int = 0, hint: str = "LATENCY") -> Runtime:
    """A compiled OpenVINO IR as a synchronous callable."""
    compiled = openvino_model(file, threads, hint)
    request = compiled.create_infer_request()

    def run(batch: np.ndarray) -> np.ndarray:
        # copy: the request's output buffer is reused by the next call
        return request.infer({0: batch})[0].copy()

    return run


def load(kind: str, file: Path, threads: int = 0) -> Runtime:
    """A runtime by the model file's kind: .pt, .onnx or .xml."""
    loaders = {".pt": pytorch, ".onnx": onnxruntime, ".xml": openvino}
    try:
        return loaders[kind](file, threads)
    except KeyError:
        raise StageError(f"{file}: unknown model type '{kind}' (use .pt, .onnx or .xml)") from None


def logits(run: Runtime, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Logits of a whole uint8 image tensor, in batches."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].float().div_(255.0).numpy()
        out.append(run(batch))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
