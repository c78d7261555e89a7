"""Stage evaluate: accuracy, loss and per-class precision/recall/F1 on the test split."""

from __future__ import annotations

import logging

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
)

from stages.core import logs, paths, plots
from stages.core.outputs import write_csv, write_json
from stages.core.params import Params
from stages.data import datasets
from stages.models import runtimes
from stages.tracking import helper

log = logging.getLogger(__name__)


def scores(
    labels: np.ndarray, logits: np.ndarray, classes: list[str]
) -> tuple[dict[str, float], list[dict]]:
    """Accuracy, cross-entropy and macro F1; and per class precision/recall/F1/support."""
    index = list(range(len(classes)))
    predicted = logits.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=index, zero_division=0
    )
    shifted = logits - logits.max(1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(1, keepdims=True)
    summary = {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1.mean()),
        "loss": float(log_loss(labels, probabilities, labels=index)),
    }
    per_class = [
        {
            "class": name,
            "precision": float(p),
            "recall": float(r),
            "f1": float(f),
            "support": int(s),
        }
        for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
    ]
    return summary, per_class


def main(params: Params) -> None:
    """Score models/model.pt on the test split; write metrics, per-class scores, confusion."""
    logs.setup("evaluate")
    with helper.Recorder("evaluate", params):
        classes = datasets.load_meta()["classes"]
        test = datasets.load_split("test")
        model = runtimes.pytorch(paths.MODEL)
        logits = runtimes.logits(model, test.images, params.evaluate.batch_size)
        labels = test.labels.numpy()
        summary, per_class = scores(labels, logits, classes)
        predicted = logits.argmax(1)
        write_json(paths.EVALUATE_METRICS, summary)
        write_csv(paths.PER_CLASS, per_class)
        write_csv(
            paths.CONFUSION,
            [
                {"actual": classes[a], "predicted": classes[p]}
                for a, p in zip(labels, predicted, strict=True)
            ],
        )
        matrix = confusion_matrix(labels, predicted, labels=list(range(len(classes))))
        plots.save_confusion(matrix, classes, paths.CONFUSION_PNG)
    log.info(
        "test accuracy %.4f (macro F1 %.4f, loss %.4f) on %d images",
        summary["accuracy"],
        summary["macro_f1"],
        summary["loss"],
        len(labels),
    )
