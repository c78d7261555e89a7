"""reports/model_card.md: what a run's model is, how good, how fast, and why it ships (or not).

The promote stage writes it from the other stages' outputs and its own decision; the MLflow
run's description (and the registered version's) is the same text, so the run explains
itself in the MLflow UI."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from stages.core import paths

if TYPE_CHECKING:
    from stages.core.params import Params, Promote
    from stages.release.gates import Decision, Deployable


# The params a reader needs to judge a model; the rest is in params.yaml and the run.
KEY_PARAMS = (
    "seed",
    "model.name",
    "train.epochs",
    "train.batch_size",
    "train.optimizer",
    "train.lr",
    "train.schedule",
    "train.label_smoothing",
    "train.augment_shift",
)

# A full confusion matrix up to this many classes; beyond it, the most frequent mistakes.
MATRIX_CLASSES = 20

MISTAKES = 10

NAN = float("nan")  # a metric a stage did not write shows as nan


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table; numbers right-aligned."""
    aligned = [
        "---:" if rows and isinstance(rows[0][i], (int, float)) else "---"
        for i in range(len(header))
    ]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(aligned) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def cell(value: Any) -> str:
    """A value as a table cell: 4 significant digits, whole numbers above 1,000."""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def number(text: str) -> float | str:
    """A CSV cell as a number when it is one."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def data_section(meta: dict[str, Any], counts: dict[str, Counter], test: str) -> list[str]:
    """Source, digests, split sizes and class counts."""
    classes = meta["classes"]
    lines = [
        "## Data",
        f"Source `{meta['source']}`, {meta['channels']} channel(s) at "
        f"{meta['image_size']}x{meta['image_size']} pixels; source digest "
        f"`{meta['digest'][:16]}` (data/prepared/meta.json), test-split digest "
        f"`{test[:16]}` (versions are compared only on the same one).",
        "",
    ]
    header = ["class", *paths.SPLITS]
    rows = [[name, *(counts[s].get(i, 0) for s in paths.SPLITS)] for i, name in enumerate(classes)]
    rows.append(["**all**", *(sum(counts[s].values()) for s in paths.SPLITS)])
    return lines + table(header, rows)


def training_section(params: Params, results: dict[str, Any]) -> list[str]:
    """The params that matter, the training numbers and the per-epoch curves."""
    flat = params.flat("seed", "model", "train")
    lines = ["## Training", *table(["param", "value"], [[k, str(flat[k])] for k in KEY_PARAMS])]
    train = results["train"]
    if train:
        lines += [
            "",
            f"{train.get('train_seconds', 0):.1f} s of training at "
            f"{train.get('images_per_second', 0):.0f} images/s.",
        ]
    history = results["history"]
    if history:
        keys = ["epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr"]
        rows = [[number(row[k]) for k in keys] for row in history]
        lines += ["", "### Curves", *table(keys, rows), "", f"![curves](../{paths.TRAIN_CURVES})"]
    return lines


def scores_section(results: dict[str, Any], classes: list[str]) -> list[str]:
    """Test scores of PyTorch, per class, and the confusion matrix."""
    evaluate = results["evaluate"]
    lines = [
        "## Test scores (PyTorch)",
        f"Accuracy {evaluate.get('accuracy', NAN):.4f}, macro F1 "
        f"{evaluate.get('macro_f1', NAN):.4f}, loss {evaluate.get('loss', NAN):.4f}.",
        "",
    ]
    keys = ["class", "precision", "recall", "f1", "support"]
    lines += table(
        keys,
        [
            [number(row[k]) if k != "class" else row[k] for k in keys]
            for row in results["per_class"]
        ],
    )
    pairs = Counter((row["actual"], row["predicted"]) for row in results["confusion"])
    lines += ["", "### Confusion matrix (rows: actual, columns: predicted)"]
    if len(classes) <= MATRIX_CLASSES:
        rows = [[a, *(pairs.get((a, p), 0) for p in classes)] for a in classes]
        lines += table(["", *classes], rows)
    else:
        wrong = [(n, a, p) for (a, p), n in pairs.items() if a != p]
        wrong.sort(reverse=True)
        lines += table(
            ["actual", "predicted", "images"], [[a, p, n] for n, a, p in wrong[:MISTAKES]]
        )
    return lines


def runtime_section(results: dict[str, Any], change: dict[str, float]) -> list[str]:
    """ONNX parity, the INT8 attempts and accuracy change, and the runtime table."""
    export, convert = results["export"], results["convert"]
    lines = [
        "## ONNX and OpenVINO",
        "ONNX against PyTorch: largest logit difference "
        f"{export.get('max_abs_diff', NAN):.3g}, same class on "
        f"{export.get('argmax_agreement', NAN):.2%} of the test images.",
        "",
    ]
    attempts = convert.get("int8_attempts", {})
    if attempts:
        pytorch = results["evaluate"].get("accuracy", NAN)
        rows = [[name, pytorch - drop, drop] for name, drop in attempts.items()]
        lines += ["INT8 quantization attempts, in order (test accuracy, drop against PyTorch):"]
        lines += ["", *table(["method", "accuracy", "drop"], rows), ""]
    method = convert.get("int8_method", "none")
    if change:
        lines.append(
            f"INT8 ({method}) accuracy change against PyTorch: "
            f"{change['change'] * 100:+.2f} points, {change['level']:.0%} interval "
            f"[{change['low'] * 100:+.2f}, {change['high'] * 100:+.2f}] (paired bootstrap "
            "over the test images)."
        )
    else:
        lines.append("No INT8 IR: none of the INT8 attempts passed openvino.max_accuracy_drop.")
    runtimes = results["runtimes"]
    if runtimes:
        keys = ["runtime", "precision", "size_mb", "latency_ms", "throughput", "speedup_vs_pytorch"]
        lines += [
            "",
            f"### Runtimes (batch {runtimes[0]['batch_size']}, {runtimes[0]['threads']} threads)",
        ]
        lines += table(
            keys,
            [
                [number(row[k]) if k not in ("runtime", "precision") else row[k] for k in keys]
                for row in runtimes
            ],
        )
    return lines


def decision_section(deployable: Deployable, decision: Decision, cfg: Promote) -> list[str]:
    """What ships, the registry's decision and every reason."""
    lines = ["## Release", f"Deployable model: {deployable.reason}."]
    if decision.version:
        lines.append(
            f"Registered as `{cfg.registered_model}` version {decision.version}, "
            f"alias `@{decision.alias}`."
        )
    lines += ["", *[f"- {reason}" for reason in decision.reasons]]
    return lines


def render(
    meta: dict[str, Any],
    params: Params,
    results: dict[str, Any],
    deployable: Deployable,
    decision: Decision,
    change: dict[str, float],
    cfg: Promote,
) -> str:
    """The whole card as markdown."""
    evaluate = results["evaluate"]
    title = (
        f"# Model card: {params.model.name} on {meta['source']}, test accuracy "
        f"{evaluate.get('accuracy', NAN):.4f}"
    )
    sections = [
        [
            title,
            f"Decision: **{decision.alias or 'not registered'}**; "
            f"deployable: {deployable.runtime}.",
        ],
        data_section(meta, results["class_counts"], results["test_digest"]),
        training_section(params, results),
        scores_section(results, meta["classes"]),
        runtime_section(results, change),
        decision_section(deployable, decision, cfg),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"
