"""Stage evaluate: accuracy and per-class precision/recall/F1 on the test split."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from stages import datasets, logs, paths, plots, runtimes, tracking
from stages.outputs import write_csv, write_json
from stages.params import Params, load_params


def scores(labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro F1 and per-class precision/recall/F1/support (scikit-learn)."""
    index = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=index, zero_division=0
    )
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
    }
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1.mean()),
        "count": len(labels),
        "per_class": per_class,
    }


def main(params: Params) -> None:
    """Score models/model.pt on the test split; write metrics, confusion data and PNG."""
    log = logs.setup("evaluate")
    with tracking.Tracker(params.mlflow, "evaluate") as tracker:
        tracker.attach(params)
        meta = datasets.load_meta()
        test = datasets.load_split("test")
        model = runtimes.pytorch(paths.MODEL)
        predicted = runtimes.logits(model, test.images, params.evaluate.batch_size).argmax(1)
        labels = test.labels.numpy()
        classes = meta["classes"]
        metrics = scores(labels, predicted, classes)
        matrix = confusion_matrix(labels, predicted, labels=list(range(len(classes))))
        write_json(paths.EVALUATE_METRICS, metrics)
        write_csv(
            paths.CONFUSION,
            [
                {"actual": classes[a], "predicted": classes[p]}
                for a, p in zip(labels, predicted, strict=True)
            ],
        )
        plots.save_confusion(matrix, classes, paths.PLOTS / "evaluate" / "confusion.png")
        tracker.log_params(params.flat("evaluate"))
        tracker.log_metrics(tracking.prefixed("evaluate", metrics))
        tracker.log_artifacts(paths.PLOTS / "evaluate", "plots")
        # The model joins its run here, not in train, where packaging it would slow training.
        tracker.log_pytorch_model(paths.MODEL)
    log.info(
        "test accuracy %.4f (macro F1 %.4f) on %d images",
        metrics["accuracy"],
        metrics["macro_f1"],
        metrics["count"],
    )


if __name__ == "__main__":
    main(load_params())
