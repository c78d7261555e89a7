"""Every file the pipeline reads or writes, relative to the repository root (DVC's cwd)."""

from __future__ import annotations

import os
from pathlib import Path

PARAMS = Path("params.yaml")
DVC_YAML = Path("dvc.yaml")
DVC_LOCK = Path("dvc.lock")

PREPARED = Path("data/prepared")
META = PREPARED / "meta.json"
SPLITS = ("train", "val", "test")


def split_file(split: str) -> Path:
    """The prepared tensor file of one split."""
    return PREPARED / f"{split}.pt"


MODELS = Path("models")
MODEL = MODELS / "model.pt"
CHECKPOINT = MODELS / "checkpoint.pt"
RUN_ID = MODELS / "mlflow_run.json"
ONNX = MODELS / "model.onnx"
OPENVINO = MODELS / "openvino"
IR_FP16 = OPENVINO / "model.xml"
IR_FP32 = OPENVINO / "model_fp32.xml"
IR_INT8 = OPENVINO / "model_int8.xml"
# The model that ships, as an MLflow pyfunc model folder (the promote stage's choice).
DEPLOYABLE = MODELS / "deployable"

METRICS = Path("metrics")
TRAIN_METRICS = METRICS / "train.json"
EVALUATE_METRICS = METRICS / "evaluate.json"
EXPORT_METRICS = METRICS / "export.json"
CONVERT_METRICS = METRICS / "convert.json"
BENCHMARK_METRICS = METRICS / "benchmark.json"
PROMOTE_METRICS = METRICS / "promote.json"

REPORTS = Path("reports")
MODEL_CARD = REPORTS / "model_card.md"

PLOTS = Path("plots")
TRAIN_HISTORY = PLOTS / "train" / "history.csv"
TRAIN_CURVES = PLOTS / "train" / "curves.png"
CONFUSION = PLOTS / "evaluate" / "confusion.csv"
CONFUSION_PNG = PLOTS / "evaluate" / "confusion.png"
PER_CLASS = PLOTS / "evaluate" / "per_class.csv"
BENCHMARK_PLOT = PLOTS / "benchmark" / "runtimes.csv"
BENCHMARK_PNG = PLOTS / "benchmark" / "runtimes.png"

# The default MLflow store, at the root of the user's repository.
MLFLOW_DB = "mlflow.db"


def repo_root() -> Path:
    """The user's repository: DVC_ROOT in queued experiments (temp copies), else cwd."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
