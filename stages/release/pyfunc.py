"""The deployable model: an OpenVINO IR as an MLflow pyfunc model that needs no repository.

The model's code is stages/ir_model.py ("models from code": MLflow copies the file into
the model); the IR's .xml and .bin travel as its artifacts, the class names as its
model_config. `save` writes it to a folder, `log` into an MLflow run; both package the
same thing, so a folder and a registered version load and predict alike:

    mlflow.pyfunc.load_model("models:/vision-classifier@champion").predict(pixels)
    mlflow models serve -m models:/vision-classifier@champion --env-manager local
"""

from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.core import outputs
from stages.core.errors import StageError, first_line
from stages.tracking import mlflow_store

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo

# `logger`, not `log`: log() is this module's API.
logger = logging.getLogger(__name__)

IR_MODEL_CODE = Path(__file__).with_name("ir_model.py")
MODEL_NAME = "openvino-model"
# Two images, so the example shows (and MLflow's check exercises) a batch, not one image.
EXAMPLE_BATCH = 2
# What ir_model.py imports besides MLflow, pinned to what it was checked with here. MLflow
# adds its own pin (mlflow==<this version>); listing them stops MLflow from inferring them,
# which loads the model in a subprocess and takes seconds.
REQUIREMENTS = ("openvino", "numpy", "pandas")


def pip_requirements() -> list[str]:
    """The packages the model needs where it is served, pinned to the installed versions."""
    return [f"{name}=={version(name)}" for name in REQUIREMENTS]


def ir_precision(network: Any) -> str:
    """INT8 (NNCF's FakeQuantize), FP16 (compressed weights) or FP32, as the IR's graph has it."""
    ops = network.get_ops()
    if any(op.get_type_name() == "FakeQuantize" for op in ops):
        return "INT8"
    constants = (op for op in ops if op.get_type_name() == "Constant")
    if any(op.get_element_type().get_type_name() == "f16" for op in constants):
        return "FP16"
    return "FP32"


def read_ir(xml: Path, classes: list[str], shape: tuple[int, int, int]) -> str:
    """Check that the IR takes N x `shape` images and gives one score per class; its precision."""
    import openvino as ov

    xml = Path(xml)
    if not xml.is_file() or not xml.with_suffix(".bin").is_file():
        raise StageError(f"{xml}: not found with its .bin (run the convert stage first)")
    try:
        network = ov.Core().read_model(str(xml), str(xml.with_suffix(".bin")))
    except Exception as exc:  # OpenVINO raises RuntimeError with a multi-line C++ trace
        raise StageError(f"{xml}: not a usable OpenVINO IR ({first_line(exc, 200)})") from None
    taken = network.input(0).get_partial_shape()
    if taken.rank.is_dynamic or [str(d) for d in taken][1:] != [str(d) for d in shape]:
        raise StageError(
            f"{xml}: takes images of shape {taken}, not N x {' x '.join(map(str, shape))}"
        )
    width = network.output(0).get_partial_shape()[-1]
    if width.is_static and width.get_length() != len(classes):
        raise StageError(
            f"{xml}: gives {width.get_length()} scores, not one per class ({len(classes)})"
        )
    return ir_precision(network)


def model_arguments(xml: Path, classes: list[str], shape: tuple[int, int, int]) -> dict[str, Any]:
    """What save and log hand MLflow: code, artifacts, config, signature, example, requirements."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    classes = [str(name) for name in classes]
    # The output is a table: a class named "label", or two alike, would collide in it.
    if "label" in classes or len(set(classes)) != len(classes):
        raise StageError(f"class names must be unique and not 'label', got {classes}")
    precision = read_ir(xml, classes, shape)
    xml = Path(xml).resolve()
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *shape))]),
        outputs=Schema([ColSpec("string", "label"), *(ColSpec("double", c) for c in classes)]),
    )
    return {
        "python_model": str(IR_MODEL_CODE),
        "artifacts": {"xml": str(xml), "bin": str(xml.with_suffix(".bin"))},
        "model_config": {"classes": classes, "precision": precision},
        "signature": signature,
        "input_example": np.zeros((EXAMPLE_BATCH, *shape), dtype=np.float32),
        "pip_requirements": pip_requirements(),
        "metadata": {"precision": precision, "runtime": "openvino"},
    }


def save(xml: Path, classes: list[str], shape: tuple[int, int, int], dest: Path) -> None:
    """The IR as an MLflow pyfunc model in folder `dest`, replacing it only once it loads."""
    mlflow = mlflow_store.import_mlflow()
    arguments = model_arguments(xml, classes, shape)
    with outputs.atomic_dir(dest) as tmp:
        mlflow.pyfunc.save_model(str(tmp), **arguments)
        # save_model never runs the model: load and predict it before it replaces the old
        # one, so a model that cannot serve leaves the previous folder in place.
        mlflow.pyfunc.load_model(str(tmp)).predict(arguments["input_example"])
    logger.info(
        "saved the %s IR %s as an MLflow model in %s", arguments["metadata"]["precision"], xml, dest
    )


def log(
    xml: Path,
    classes: list[str],
    shape: tuple[int, int, int],
    run_id: str,
    name: str = MODEL_NAME,
) -> ModelInfo:
    """The IR as an MLflow pyfunc model logged into run `run_id`; its ModelInfo."""
    mlflow = mlflow_store.import_mlflow()
    from mlflow.models import Model

    arguments = model_arguments(xml, classes, shape)
    # The logged model goes into the active experiment: make it the run's own.
    experiment = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    mlflow.set_experiment(experiment_id=experiment)
    # Model.log is what mlflow.pyfunc.log_model calls; unlike it, it takes a run_id, so the
    # run is neither started nor ended here (a stage may hold it open, RUNNING).
    info = Model.log(None, mlflow.pyfunc, name=name, run_id=run_id, **arguments)
    logger.info(
        "logged the %s IR %s as %s", arguments["metadata"]["precision"], xml, info.model_uri
    )
    return info
