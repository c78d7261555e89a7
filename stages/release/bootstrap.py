"""Paired statistics for the release decision: a bootstrap of the metric's difference between
two models scored on the same test images."""

from __future__ import annotations

import numpy as np

from stages.core.params import Promote

# Bootstrap resamples: the interval's ends move by well under a tenth of a point between
# seeds at this count (2,000 is the usual floor for percentile intervals).
RESAMPLES = 2000

# Two-sided level of the interval around the INT8 accuracy change in the model card.
CHANGE_LEVEL = 0.95


def score(metric: str, labels: np.ndarray, predicted: np.ndarray, classes: int, axis: int = -1):
    """Accuracy, or macro F1 (0 for a class neither true nor predicted), along `axis`."""
    if metric == "accuracy":
        return (labels == predicted).mean(axis)
    f1 = []
    for k in range(classes):
        hits = ((predicted == k) & (labels == k)).sum(axis)
        total = (predicted == k).sum(axis) + (labels == k).sum(axis)
        f1.append(np.divide(2 * hits, total, out=np.zeros(np.shape(hits)), where=total > 0))
    return np.mean(f1, axis=0)


def paired_difference(
    metric: str,
    labels: np.ndarray,
    new: np.ndarray,
    old: np.ndarray,
    classes: int,
    level: float,
    alternative: str,
    seed: int,
) -> tuple[float, float, float]:
    """metric(new) - metric(old) on the same images, and its paired-bootstrap interval."""
    from scipy.stats import bootstrap

    def difference(truth, a, b, axis=-1):
        return score(metric, truth, a, classes, axis) - score(metric, truth, b, classes, axis)

    observed = float(difference(labels, new, old))
    if np.array_equal(new, old):  # every resample says 0 (scipy warns on a constant)
        return observed, observed, observed
    result = bootstrap(
        (labels, new, old),
        difference,
        paired=True,
        vectorized=True,
        n_resamples=RESAMPLES,
        batch=max(1, 2_000_000 // len(labels)),  # bounded memory on large test splits
        confidence_level=level,
        alternative=alternative,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return observed, float(interval.low), float(interval.high)


def compare(
    labels: np.ndarray, new: np.ndarray, old: np.ndarray, classes: int, cfg: Promote, seed: int
) -> dict[str, float]:
    """This run against the champion on the same images: both scores, the improvement and
    the lower end of its one-sided interval, and the images only one of them gets right."""
    improvement, low, _ = paired_difference(
        cfg.metric, labels, new, old, classes, 1 - cfg.alpha, "greater", seed
    )
    return {
        "score": float(score(cfg.metric, labels, new, classes)),
        "champion_score": float(score(cfg.metric, labels, old, classes)),
        "improvement": improvement,
        "improvement_low": low,
        "only_this_right": int(((new == labels) & (old != labels)).sum()),
        "only_champion_right": int(((new != labels) & (old == labels)).sum()),
    }
