"""The OpenVINO IR as an MLflow pyfunc model ("models from code": MLflow runs this file).

MLflow copies this file into the model and executes it wherever the model is loaded or
served, where this repository does not exist: it imports only MLflow, OpenVINO, NumPy and
pandas, never the `stages` package. Its inputs come from the model itself:
`context.artifacts` (the IR's .xml and .bin) and `context.model_config` (the class names,
in the order of the logits; the IR's precision; OpenVINO compile settings).

Input: float32 N x C x H x W pixels in 0..1 at the trained size, exactly the tensor the IR
takes (the network normalizes inside). Output: a DataFrame with `label` (the class name)
and one softmax probability column per class, named by class, in class order.
"""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import openvino as ov
import pandas as pd

log = logging.getLogger("openvino_pyfunc")

# LATENCY: a served request is one small batch, answered as soon as possible. A deployer
# overrides it (threads, THROUGHPUT) at load time: load_model(uri, model_config={...}).
DEFAULT_COMPILE_CONFIG = {"PERFORMANCE_HINT": "LATENCY"}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from logits, computed stably in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class OpenVINOClassifier(mlflow.pyfunc.PythonModel):
    """An image classifier: OpenVINO IR logits to a label and per-class probabilities."""

    def load_context(self, context) -> None:
        """Compile the IR from the model's artifacts on OpenVINO's CPU device."""
        config = context.model_config or {}
        self.classes = [str(name) for name in config["classes"]]
        core = ov.Core()
        network = core.read_model(context.artifacts["xml"], context.artifacts["bin"])
        width = network.output(0).get_partial_shape()[-1]
        if width.is_static and width.get_length() != len(self.classes):
            raise ValueError(
                f"the IR gives {width.get_length()} scores per image but model_config lists "
                f"{len(self.classes)} classes"
            )
        compile_config = {**DEFAULT_COMPILE_CONFIG, **config.get("openvino_config", {})}
        self.compiled = core.compile_model(network, "CPU", compile_config)
        log.debug("compiled the %s IR for %d classes", config.get("precision"), len(self.classes))

    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        """float32 N x C x H x W pixels in 0..1 to `label` and one probability per class."""
        batch = np.ascontiguousarray(model_input, dtype=np.float32)
        # A request of its own per call: a server may call predict from several threads,
        # and an infer request serves one inference at a time.
        logits = self.compiled.create_infer_request().infer({0: batch})[0]
        probabilities = softmax(np.asarray(logits))
        labels = np.asarray(self.classes, dtype=object)[probabilities.argmax(axis=1)]
        frame = pd.DataFrame(probabilities, columns=self.classes)
        frame.insert(0, "label", labels)
        return frame


mlflow.models.set_model(OpenVINOClassifier())
