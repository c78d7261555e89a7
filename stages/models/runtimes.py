"""The four ways to run a model: PyTorch eager, ONNX Runtime, OpenVINO FP16 and INT8.

Each runtime is a callable from a float32 N x C x H x W batch of 0..1 pixels (a NumPy
array) to logits, so convert, benchmark and predict treat them alike.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from stages.core import processes
from stages.core.errors import StageError, first_line
from stages.models import zoo

Runtime = Callable[[np.ndarray], np.ndarray]


def cores(threads: int = 0) -> int:
    """`threads`, or for 0 the cores this process may run on."""
    return threads or processes.usable_cores()


def pytorch(file: Path, threads: int = 0) -> Runtime:
    """The saved PyTorch model in eval mode, on the CPU, under inference_mode."""
    torch.set_num_threads(cores(threads))
    model, _ = zoo.load(file)

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
    try:
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for every bad file
        raise StageError(f"{file}: not a usable ONNX model ({first_line(exc, 200)})") from None
    name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: batch})[0]

    return run


def openvino_model(file: Path, threads: int = 0, hint: str = "LATENCY"):
    """An OpenVINO IR compiled for the CPU with a thread count and a performance hint.

    The inference precision is left at OpenVINO's default (bf16 on CPUs with AVX512_BF16
    or AMX, f32 elsewhere): what a deployment gets, so convert's accuracy and benchmark's
    speed describe the same thing.
    """
    import openvino as ov

    if not Path(file).exists():
        raise StageError(f"{file}: not found (run the convert stage first)")
    config = {"INFERENCE_NUM_THREADS": cores(threads), "PERFORMANCE_HINT": hint}
    try:
        return ov.Core().compile_model(str(file), "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError with a multi-line C++ trace
        raise StageError(f"{file}: not a usable OpenVINO IR ({first_line(exc, 200)})") from None


def openvino(file: Path, threads: int = 0, hint: str = "LATENCY") -> Runtime:
    """A compiled OpenVINO IR as a synchronous callable."""
    compiled = openvino_model(file, threads, hint)
    request = compiled.create_infer_request()

    def run(batch: np.ndarray) -> np.ndarray:
        # copy: the request's output buffer is reused by the next call
        return request.infer({0: batch})[0].copy()

    return run


def openvino_precision(file: Path) -> str:
    """The precision OpenVINO's CPU plugin computes in by default (f32 or bf16)."""
    return openvino_model(file, 1).get_property("INFERENCE_PRECISION_HINT").get_type_name()


LOADERS: dict[str, Callable[[Path, int], Runtime]] = {
    ".pt": pytorch,
    ".onnx": onnxruntime,
    ".xml": openvino,
}


def load(file: Path, threads: int = 0) -> Runtime:
    """A runtime chosen by the model file's suffix: .pt, .onnx or .xml (OpenVINO IR)."""
    file = Path(file)
    loader = LOADERS.get(file.suffix.lower())
    if loader is None:
        raise StageError(
            f"{file}: unknown model type '{file.suffix}' (use a .pt, .onnx or OpenVINO .xml file)"
        )
    return loader(file, threads)


def size_mb(file: Path) -> float:
    """Size on disk of a model file (an IR's .xml graph plus its .bin weights)."""
    files = [file, file.with_suffix(".bin")] if file.suffix == ".xml" else [file]
    return sum(f.stat().st_size for f in files) / 2**20


def agreement(reference: np.ndarray, logits: np.ndarray) -> float:
    """Share of images where two models' logits pick the same class."""
    return float((reference.argmax(1) == logits.argmax(1)).mean())


def logits(run: Runtime, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Logits of a whole uint8 image tensor, in batches."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].float().div_(255.0).numpy()
        out.append(run(batch))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
