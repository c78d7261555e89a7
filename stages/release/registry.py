"""MLflow's model registry: versions of the deployable model, the `@champion` and `@challenger`
aliases, and the tags that say why."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from stages.core import dvcyaml, paths
from stages.core.errors import StageError, first_line
from stages.core.params import Params
from stages.data import datasets
from stages.release import pyfunc
from stages.release.bootstrap import compare
from stages.release.gates import CHAMPION, Decision, Deployable, decide
from stages.tracking import mlflow_store

# Version tags: what the next promote needs to know about a version, and what a person
# browsing the registry wants to read.
# The test split's own digest (its images and labels): two versions are compared only on
# the very same test images. meta.json's digest names the source, not the split.
DIGEST_TAG = "data.test_digest"

PREVIOUS_TAG = "promote.previous_champion"

# MLflow's limits: a tag value (the run's description is one), a version's description.
RUN_TEXT, VERSION_TEXT = 8000, 5000


def predict_labels(model: Any, images: np.ndarray, classes: list[str]) -> np.ndarray:
    """Class indices a pyfunc model (ours: a `label` column) picks for 0..1 images."""
    index = {name: i for i, name in enumerate(classes)}
    labels = model.predict(images)["label"].astype(str)
    return np.array([index.get(name, -1) for name in labels])


class Registry:
    """promote.registered_model in the run's store, through the run's Store (and lock)."""

    def __init__(self, store: mlflow_store.Store, name: str):
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
            info = pyfunc.log(deployable.xml, classes, shape, run_id)
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


def load_pyfunc(folder: Path) -> Any:
    """A pyfunc model folder, loaded as any user would load it."""
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(str(folder))


def open_store(params: Params) -> mlflow_store.Store | None:
    """The run of the model in models/ in its store (filled from the outputs if new)."""
    if not params.mlflow.enabled:
        return None
    mlflow_store.check_store(mlflow_store.tracking_uri(params.mlflow))
    try:
        store = mlflow_store.Store(params, "promote")
        store.open_run(mlflow_store.read_run_key(), {})
        store.log_stages(dvcyaml.stages_before("promote", dvcyaml.pipeline()))
        return store
    except StageError:
        raise
    except Exception as exc:
        raise StageError(f"mlflow: {first_line(exc)}") from None
