"""Stage promote: the run's deployable model into MLflow's registry; `@champion` moves only
on paired evidence.

    dvc repro                                 runs it last, after benchmark
    dvc repro -f -s promote                   decides again against today's registry
    vision-rollback [N]                       points @champion back at the champion before
                                              (or at version N)

The deployable model is the INT8 IR when it passed its gate and is faster than the FP16 IR
by promote.min_speedup, else the FP16 IR: an MLflow pyfunc model (stages/release/ir_model.py) in
models/deployable/, logged into the run and registered as a new version of
promote.registered_model. The version becomes `@champion` when every gate passed and it
beats the current champion on the same test images by more than chance (a paired
bootstrap of the metric's difference, one-sided at promote.alpha, above
promote.min_improvement); otherwise `@challenger`, with the reason. metrics/promote.json
and reports/model_card.md (also the run's description in the MLflow UI) say what was
decided and why.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np

from stages.core import dvcyaml, logs, outputs, paths
from stages.core.errors import StageError, first_line
from stages.core.outputs import read_csv, write_json, write_text
from stages.core.params import Params
from stages.data import datasets
from stages.models import runtimes
from stages.release import card, pyfunc
from stages.release.bootstrap import CHANGE_LEVEL, paired_difference
from stages.release.gates import Decision, Deployable, check_gates, choose_deployable
from stages.release.registry import Registry, load_pyfunc, open_store, predict_labels, release

log = logging.getLogger(__name__)


def int8_change(test: datasets.Split, reference: np.ndarray, seed: int) -> dict[str, float]:
    """INT8's test accuracy minus PyTorch's, with a two-sided paired-bootstrap interval."""
    if not paths.IR_INT8.exists():
        return {}
    int8 = runtimes.logits(runtimes.openvino(paths.IR_INT8), test.images).argmax(1)
    labels = test.labels.numpy()
    change, low, high = paired_difference(
        "accuracy", labels, int8, reference, 0, CHANGE_LEVEL, "two-sided", seed
    )
    return {"change": change, "low": low, "high": high, "level": CHANGE_LEVEL}


def summary(decision: Decision, deployable: Deployable) -> dict[str, Any]:
    """metrics/promote.json: the decision, its reasons and the numbers behind it."""
    out: dict[str, Any] = {
        "decision": decision.alias or "not registered",
        "deployable": deployable.runtime,
    }
    if decision.version:
        out["version"] = int(decision.version)
    # The scores themselves are in the reasons and the card: three numbers at most keep
    # `dvc metrics show` short.
    for key in ("improvement", "improvement_low"):
        if key in decision.comparison:
            out[key] = decision.comparison[key]
    out["reasons"] = [deployable.reason, *decision.reasons]
    return out


def read_results() -> dict[str, Any]:
    """Every earlier stage's metrics and tables, the class counts of each split and the
    test split's digest."""
    results: dict[str, Any] = {
        "train": outputs.read_json(paths.TRAIN_METRICS),
        "evaluate": outputs.read_json(paths.EVALUATE_METRICS),
        "export": outputs.read_json(paths.EXPORT_METRICS),
        "convert": outputs.read_json(paths.CONVERT_METRICS),
        "benchmark": outputs.read_json(paths.BENCHMARK_METRICS),
        "history": read_csv(paths.TRAIN_HISTORY),
        "per_class": read_csv(paths.PER_CLASS),
        "confusion": read_csv(paths.CONFUSION),
        "runtimes": read_csv(paths.BENCHMARK_PLOT),
    }
    splits = {name: datasets.load_split(name) for name in paths.SPLITS}
    results["class_counts"] = {name: Counter(s.labels.tolist()) for name, s in splits.items()}
    results["test_digest"] = datasets.split_digest(splits["test"])
    return results


def main(params: Params) -> None:
    """Choose, package and gate the deployable model; register it and decide; write the card."""
    logs.setup("promote")
    cfg = params.promote
    store = open_store(params)  # a store that cannot be used stops here, before any work
    meta = datasets.load_meta()
    test = datasets.load_split("test")
    results = read_results()
    deployable = choose_deployable(results["convert"], results["benchmark"], cfg)
    pyfunc.save(deployable.xml, meta["classes"], image_shape(meta), paths.DEPLOYABLE)
    images = datasets.to_model_input(test.images).numpy()
    predicted = predict_labels(load_pyfunc(paths.DEPLOYABLE), images, meta["classes"])
    accuracy = float((predicted == test.labels.numpy()).mean())
    failed = check_gates(accuracy, results, params)
    reference = runtimes.logits(runtimes.pytorch(paths.MODEL), test.images).argmax(1)
    change = int8_change(test, reference, params.seed)
    try:
        if store is None:
            decision = Decision("", ["not registered: mlflow.enabled is false"])
        else:
            registry = Registry(store, cfg.registered_model)
            decision = release(registry, deployable, test, predicted, failed, meta, params)
        card_text = card.render(meta, params, results, deployable, decision, change, cfg)
        if store is not None:
            registry.record(decision, card_text)
    except StageError:
        raise
    except Exception as exc:
        if store is not None:
            store.finish("FAILED")
        raise StageError(f"promote: MLflow registry: {first_line(exc)}") from None
    write_json(paths.PROMOTE_METRICS, summary(decision, deployable))
    write_text(paths.MODEL_CARD, card_text)
    if store is not None:
        store.log_stages([s for s in dvcyaml.pipeline() if s.name == "promote"])
        store.log_snapshot()
        store.finish("FINISHED")
    where = f"{cfg.registered_model} version {decision.version}" if decision.version else "-"
    log.info("deployable: %s; %s @%s", deployable.reason, where, decision.alias or "(none)")
    for reason in decision.reasons:
        log.info("  %s", reason)


def image_shape(meta: dict[str, Any]) -> tuple[int, int, int]:
    """C, H, W of the images the model takes."""
    return (meta["channels"], meta["image_size"], meta["image_size"])
