"""Stage promote: the run's deployable model into MLflow's registry; `@champion` moves only
on paired evidence.

    dvc repro                                 runs it last, after benchmark
    dvc repro -f -s promote                   decides again against today's registry
    python -m stages.promote --rollback [N]   points @champion back at the champion before
                                              (or at version N)

The deployable model is the INT8 IR when it passed its gate and is faster than the FP16 IR
by promote.min_speedup, else the FP16 IR: an MLflow pyfunc model (stages/ir_model.py) in
models/deployable/, logged into the run and registered as a new version of
promote.registered_model. The version becomes `@champion` when every gate passed and it
beats the current champion on the same test images by more than chance (a paired
bootstrap of the metric's difference, one-sided at promote.alpha, above
promote.min_improvement); otherwise `@challenger`, with the reason. metrics/promote.json
and reports/model_card.md (also the run's description in the MLflow UI) say what was
decided and why.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages import datasets, deploy, logs, model_card, paths, runtimes, tracking
from stages.errors import StageError, first_line
from stages.outputs import write_json, write_text
from stages.params import Params, Promote, load_params

log = logging.getLogger("stages.promote")

CHAMPION, CHALLENGER = "champion", "challenger"
# Bootstrap resamples: the interval's ends move by well under a tenth of a point between
# seeds at this count (2,000 is the usual floor for percentile intervals).
RESAMPLES = 2000
# Two-sided level of the interval around the INT8 accuracy change in the model card.
CHANGE_LEVEL = 0.95
# Version tags: what the next promote needs to know about a version, and what a person
# browsing the registry wants to read.
# The test split's own digest (its images and labels): two versions are compared only on
# the very same test images. meta.json's digest names the source, not the split.
DIGEST_TAG = "data.test_digest"
PREVIOUS_TAG = "promote.previous_champion"
# MLflow's limits: a tag value (the run's description is one), a version's description.
RUN_TEXT, VERSION_TEXT = 8000, 5000


# -- what ships ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Deployable:
    """The IR that ships, and why that one."""

    runtime: str  # the benchmark's name for it: openvino_int8 or openvino_fp16
    xml: Path
    reason: str


def choose_deployable(convert: dict[str, Any], benchmark: dict[str, Any], cfg: Promote):
    """INT8 when it passed its gate and is faster than FP16 by cfg.min_speedup, else FP16."""
    method = convert.get("int8_method", "none")
    if method == "none" or "openvino_int8" not in benchmark:
        reason = "the FP16 IR: no INT8 IR passed openvino.max_accuracy_drop"
        return Deployable("openvino_fp16", paths.IR_FP16, reason)
    speedup = benchmark["openvino_int8"]["throughput"] / benchmark["openvino_fp16"]["throughput"]
    if speedup >= cfg.min_speedup:
        reason = f"the INT8 IR ({method}): {speedup:.2f}x the FP16 IR's throughput"
        return Deployable("openvino_int8", paths.IR_INT8, reason)
    reason = (
        f"the FP16 IR: INT8 reached only {speedup:.2f}x its throughput "
        f"(promote.min_speedup {cfg.min_speedup:g})"
    )
    return Deployable("openvino_fp16", paths.IR_FP16, reason)


# -- paired statistics ----------------------------------------------------------------------
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


# -- the decision ---------------------------------------------------------------------------
@dataclass
class Decision:
    """Where the alias goes and why; version and comparison once registered."""

    alias: str  # champion, challenger, or "" when nothing was registered
    reasons: list[str]
    version: str = ""
    champion_version: str = ""
    comparison: dict[str, float] = field(default_factory=dict)


def decide(
    failed: list[str],
    champion: str,
    same_data: bool,
    comparison: dict[str, float],
    cfg: Promote,
) -> tuple[str, list[str]]:
    """The alias for a new version: the gates, then the champion, then the evidence."""
    if failed:
        return CHALLENGER, [f"gate failed: {reason}" for reason in failed]
    if not champion:
        return CHAMPION, ["no champion yet: the first model that passed every gate"]
    if not same_data:
        return CHALLENGER, [
            f"other data: champion version {champion} was scored on other test images "
            "(another test-split digest), so the two are not compared"
        ]
    c = comparison
    evidence = (
        f"{cfg.metric} {c['score']:.4f} against champion version {champion}'s "
        f"{c['champion_score']:.4f} on the same {c['only_this_right']} + "
        f"{c['only_champion_right']} images the two disagree on: {c['improvement']:+.4f}, "
        f"at least {c['improvement_low']:+.4f} at {1 - cfg.alpha:.0%} confidence"
    )
    if c["improvement_low"] > cfg.min_improvement:
        return CHAMPION, [f"better by more than chance: {evidence}"]
    return CHALLENGER, [
        f"not better by more than chance: {evidence} "
        f"(needs more than promote.min_improvement {cfg.min_improvement:g})"
    ]


def check_gates(deployed_accuracy: float, results: dict[str, dict], params: Params) -> list[str]:
    """The gates the deployable model must pass; what failed, in words."""
    failed = [
        f"{name} stage wrote no metrics"
        for name in ("evaluate", "export", "convert", "benchmark")
        if not results[name]
    ]
    pytorch = results["evaluate"].get("accuracy")
    limit = params.openvino.max_accuracy_drop
    if pytorch is not None and pytorch - deployed_accuracy > limit + 1e-9:
        failed.append(
            f"the deployable model's test accuracy {deployed_accuracy:.4f} is more than "
            f"openvino.max_accuracy_drop {limit:g} below PyTorch's {pytorch:.4f}"
        )
    return failed


# -- the registry (MLflow) ----------------------------------------------------------------
def predict_labels(model: Any, images: np.ndarray, classes: list[str]) -> np.ndarray:
    """Class indices a pyfunc model (ours: a `label` column) picks for 0..1 images."""
    index = {name: i for i, name in enumerate(classes)}
    labels = model.predict(images)["label"].astype(str)
    return np.array([index.get(name, -1) for name in labels])


class Registry:
    """promote.registered_model in the run's store, through the run's Store (and lock)."""

    def __init__(self, store: tracking.Store, name: str):
        self.store = store
        self.client = store.client
        self.name = name

    def version_of(self, run_id: str, runtime: str) -> str:
        """The version this run already registered for this deployable, or ""."""
        with self.store.lock:
            found = self.client.search_model_versions(
                f"name = '{self.name}' AND run_id = '{run_id}'"
            )
        mine = [v for v in found if v.tags.get("promote.deployable") == runtime]
        return str(max(int(v.version) for v in mine)) if mine else ""

    def register(self, deployable: Deployable, classes: list[str], shape, digest: str) -> str:
        """Log the deployable pyfunc model into the run and register it as a new version."""
        run_id = self.store.run_id
        with self.store.lock:
            info = deploy.log(deployable.xml, classes, shape, run_id)
        with self.store.lock, contextlib.redirect_stderr(io.StringIO()):
            # MLflow prints "Registered model ... / Created version ..." itself: the stage's
            # own line says it.
            version = self.store.mlflow.register_model(
                info.model_uri,
                self.name,
                tags={DIGEST_TAG: digest, "promote.deployable": deployable.runtime},
            )
        return str(version.version)

    def champion(self) -> Any:
        """The version `@champion` points at, or None."""
        from mlflow.exceptions import MlflowException

        with self.store.lock:
            try:
                return self.client.get_model_version_by_alias(self.name, CHAMPION)
            except MlflowException:  # no such model or alias yet
                return None

    def predictions(self, version: str, images: np.ndarray, classes: list[str]) -> np.ndarray:
        """What a registered version predicts for these images."""
        model = self.store.mlflow.pyfunc.load_model(f"models:/{self.name}/{version}")
        return predict_labels(model, images, classes)

    def record(self, decision: Decision, card: str) -> None:
        """The alias, the version's tags and description, the run's tags and description."""
        reason = "; ".join(decision.reasons)
        version = decision.version
        with self.store.lock:
            # A version that already is the champion keeps the reason it became one.
            if decision.champion_version != version:
                self.client.set_registered_model_alias(self.name, decision.alias, version)
                tags = {"promote.decision": decision.alias, "promote.reason": reason}
                if decision.alias == CHAMPION and decision.champion_version:
                    tags[PREVIOUS_TAG] = decision.champion_version
                for key, value in tags.items():
                    self.client.set_model_version_tag(self.name, version, key, value)
                summary = f"@{decision.alias}: {reason} (run {self.store.run_id})"
                self.client.update_model_version(
                    self.name, version, description=clip(summary, VERSION_TEXT)
                )
            run_tags = {
                "promote.decision": decision.alias,
                "promote.reason": clip(reason, RUN_TEXT),
                "promote.version": f"{self.name}/{version}",
                # The MLflow UI shows this tag as the run's description (markdown).
                "mlflow.note.content": clip(card, RUN_TEXT),
            }
            for key, value in run_tags.items():
                self.client.set_tag(self.store.run_id, key, value)


def clip(text: str, limit: int) -> str:
    """Text cut to a store's limit, saying where the whole is."""
    if len(text) <= limit:
        return text
    more = f"\n\n... (cut at {limit} characters: the whole is {paths.MODEL_CARD})"
    return text[: limit - len(more)] + more


def release(
    registry: Registry,
    deployable: Deployable,
    test: datasets.Split,
    predicted: np.ndarray,
    failed: list[str],
    meta: dict[str, Any],
    params: Params,
) -> Decision:
    """Register this run's deployable model (once per run and deployable) and decide."""
    classes = meta["classes"]
    shape = (meta["channels"], meta["image_size"], meta["image_size"])
    version = registry.version_of(registry.store.run_id, deployable.runtime)
    if not version:
        version = registry.register(deployable, classes, shape, datasets.split_digest(test))
    champion = registry.champion()
    if champion is not None and str(champion.version) == version:
        return Decision(CHAMPION, ["already the champion"], version, version)
    champion_version = "" if champion is None else str(champion.version)
    same_data = champion is not None and champion.tags.get(DIGEST_TAG) == datasets.split_digest(
        test
    )
    comparison: dict[str, float] = {}
    if same_data and not failed:
        images = datasets.to_model_input(test.images).numpy()
        old = registry.predictions(champion_version, images, classes)
        labels = test.labels.numpy()
        comparison = compare(labels, predicted, old, len(classes), params.promote, params.seed)
    alias, reasons = decide(failed, champion_version, same_data, comparison, params.promote)
    return Decision(alias, reasons, version, champion_version, comparison)


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


def main(params: Params) -> None:
    """Choose, package and gate the deployable model; register it and decide; write the card."""
    log = logs.setup("promote")
    cfg = params.promote
    store = open_store(params)  # a store that cannot be used stops here, before any work
    meta = datasets.load_meta()
    test = datasets.load_split("test")
    results = model_card.read_results()
    deployable = choose_deployable(results["convert"], results["benchmark"], cfg)
    deploy.save(deployable.xml, meta["classes"], image_shape(meta), paths.DEPLOYABLE)
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
        card = model_card.render(meta, params, results, deployable, decision, change, cfg)
        if store is not None:
            registry.record(decision, card)
    except StageError:
        raise
    except Exception as exc:
        if store is not None:
            store.finish("FAILED")
        raise StageError(f"promote: MLflow registry: {first_line(exc)}") from None
    write_json(paths.PROMOTE_METRICS, summary(decision, deployable))
    write_text(paths.MODEL_CARD, card)
    if store is not None:
        store.log_stages([s for s in tracking.pipeline() if s.name == "promote"])
        store.log_snapshot()
        store.finish("FINISHED")
    where = f"{cfg.registered_model} version {decision.version}" if decision.version else "-"
    log.info("deployable: %s; %s @%s", deployable.reason, where, decision.alias or "(none)")
    for reason in decision.reasons:
        log.info("  %s", reason)


def image_shape(meta: dict[str, Any]) -> tuple[int, int, int]:
    """C, H, W of the images the model takes."""
    return (meta["channels"], meta["image_size"], meta["image_size"])


def load_pyfunc(folder: Path) -> Any:
    """A pyfunc model folder, loaded as any user would load it."""
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(str(folder))


def open_store(params: Params) -> tracking.Store | None:
    """The run of the model in models/ in its store (filled from the outputs if new)."""
    if not params.mlflow.enabled:
        return None
    tracking.check_store(tracking.tracking_uri(params.mlflow))
    try:
        store = tracking.Store(params, "promote")
        store.open_run(tracking.read_run_key(), {})
        store.log_stages(tracking.before("promote", tracking.pipeline()))
        return store
    except StageError:
        raise
    except Exception as exc:
        raise StageError(f"mlflow: {first_line(exc)}") from None


# -- the command line -------------------------------------------------------------------
def rollback(params: Params, version: str | None) -> tuple[str, str]:
    """Point @champion at `version`, or at the champion before the current one."""
    cfg = params.promote
    store = tracking.Store(params, "promote")
    registry = Registry(store, cfg.registered_model)
    current = registry.champion()
    if current is None:
        raise StageError(f"promote: {cfg.registered_model} has no @champion to roll back")
    target = version or current.tags.get(PREVIOUS_TAG)
    if not target:
        raise StageError(
            f"promote: {cfg.registered_model} version {current.version} was the first "
            "champion: there is none before it (name a version: --rollback N)"
        )
    with store.lock:
        try:
            registry.client.get_model_version(cfg.registered_model, target)
        except Exception:
            raise StageError(f"promote: {cfg.registered_model} has no version {target}") from None
        registry.client.set_registered_model_alias(cfg.registered_model, CHAMPION, target)
        registry.client.set_model_version_tag(
            cfg.registered_model, target, "promote.decision", f"{CHAMPION} (rolled back to)"
        )
    return str(current.version), str(target)


def cli(argv: list[str] | None = None) -> None:
    """`python -m stages.promote`: the stage, or `--rollback [VERSION]`."""
    parser = argparse.ArgumentParser(prog="python -m stages.promote", description=__doc__)
    parser.add_argument(
        "--rollback",
        nargs="?",
        const="",
        metavar="VERSION",
        help="point @champion back at the previous champion (or at VERSION)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    params = load_params()
    if args.rollback is None:
        main(params)
        return
    logs.setup("promote")
    if not params.mlflow.enabled:
        raise StageError("promote: mlflow.enabled is false: there is no registry to roll back")
    tracking.check_store(tracking.tracking_uri(params.mlflow))
    before, after = rollback(params, args.rollback or None)
    name = params.promote.registered_model
    log.info("%s @champion: version %s -> version %s", name, before, after)


if __name__ == "__main__":
    cli()
