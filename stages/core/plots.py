"""PNG figures of the pipeline's results (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from stages.core.outputs import save_figure


def save_history(history: list[dict[str, float]], file: Path) -> None:
    """Loss and accuracy per epoch, train against validation."""
    epochs = [r["epoch"] for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    left.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    left.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    right.plot(epochs, [r["train_accuracy"] for r in history], "o-", label="train")
    right.plot(epochs, [r["val_accuracy"] for r in history], "o-", label="validation")
    right.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, file)


def save_confusion(matrix: np.ndarray, classes: list[str], file: Path) -> None:
    """The confusion matrix as a heat map with counts (rows: truth, columns: prediction)."""
    n = len(classes)
    side = min(max(4.0, 0.45 * n + 2), 16)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(matrix, cmap="Blues")
    ax.set(
        xticks=range(n),
        yticks=range(n),
        xlabel="predicted",
        ylabel="true",
        title="Confusion matrix (test split)",
    )
    ax.set_xticklabels(classes, rotation=90 if n > 12 else 0)
    ax.set_yticklabels(classes)
    if n <= 30:
        high = matrix.max() / 2 if matrix.size else 0
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(
                        j,
                        i,
                        int(matrix[i, j]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if matrix[i, j] > high else "black",
                    )
    save_figure(fig, file)


def save_runtimes(results: dict[str, dict[str, float]], file: Path) -> None:
    """Bars of throughput and batch-1 latency for each runtime."""
    names = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.bar(names, [results[n]["throughput"] for n in names], color="tab:blue")
    left.set(ylabel="images / second", title="Throughput (higher is better)")
    right.bar(names, [results[n]["latency_ms"] for n in names], color="tab:orange")
    right.set(ylabel="milliseconds", title="Latency at batch 1 (lower is better)")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=20)
        ax.grid(axis="y", alpha=0.3)
    save_figure(fig, file)
