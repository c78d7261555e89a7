"""The promote stage: which IR ships, the paired test, the decision, and the registry flow on
a real MLflow store (first champion, a better run moves the alias, a worse one and one on
other data do not, a rollback), plus the model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from helpers.repos import client_for, runs_of, write_params
from stages import benchmark, convert, evaluate, export, prepare, promote, train
from stages.core import paths
from stages.core.params import load_params
from stages.release import bootstrap, gates, registry
from stages.tools import rollback
from stages.tracking import mlflow_store

ROOT = Path(__file__).resolve().parent.parent
CFG = load_params(ROOT / paths.PARAMS).promote
NAME = CFG.registered_model


# ---------------------------------------------------------------- which IR ships
def test_int8_ships_only_when_it_passed_and_is_faster() -> None:
    fast = {"openvino_fp16": {"throughput": 1000.0}, "openvino_int8": {"throughput": 2000.0}}
    slow = {"openvino_fp16": {"throughput": 1000.0}, "openvino_int8": {"throughput": 1100.0}}
    chosen = gates.choose_deployable({"int8_method": "mixed"}, fast, CFG)
    assert chosen.runtime == "openvino_int8"
    assert chosen.xml == paths.IR_INT8
    assert "mixed" in chosen.reason and "2.00x" in chosen.reason
    chosen = gates.choose_deployable({"int8_method": "plain"}, slow, CFG)
    assert chosen.runtime == "openvino_fp16"
    assert "1.10x" in chosen.reason and "promote.min_speedup" in chosen.reason
    fp16_only = {"openvino_fp16": {"throughput": 1000.0}}
    chosen = gates.choose_deployable({"int8_method": "none"}, fp16_only, CFG)
    assert (chosen.runtime, chosen.xml) == ("openvino_fp16", paths.IR_FP16)


# ---------------------------------------------------------------- paired statistics
def predictions(right_new: int, right_old: int, both: int, n: int = 360):
    """Labels and two prediction vectors: `both` images right in both, then images only the
    new one gets right, then only the old one; the rest wrong in both."""
    labels = np.arange(n) % 10
    new, old = (labels + 1) % 10, (labels + 2) % 10
    new[:both], old[:both] = labels[:both], labels[:both]
    new[both : both + right_new] = labels[both : both + right_new]
    start = both + right_new
    old[start : start + right_old] = labels[start : start + right_old]
    return labels, new, old


def test_macro_f1_matches_scikit_learn() -> None:
    labels, new, _ = predictions(30, 0, 200)
    new[:7] = 3  # some classes over-predicted
    expected = f1_score(labels, new, average="macro", labels=range(10), zero_division=0)
    assert bootstrap.score("macro_f1", labels, new, 10) == pytest.approx(expected)


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_paired_interval_tells_evidence_from_chance(metric: str) -> None:
    clear = bootstrap.paired_difference(metric, *predictions(30, 2, 300), 10, 0.95, "greater", 1)
    assert clear[0] > 0 and clear[1] > 0  # 30 against 2 disagreements: more than chance
    coin = bootstrap.paired_difference(metric, *predictions(6, 4, 300), 10, 0.95, "greater", 1)
    assert coin[0] > 0 and coin[1] < 0  # 6 against 4: could be chance
    labels, new, _ = predictions(0, 0, 300)
    same = bootstrap.paired_difference(metric, labels, new, new.copy(), 10, 0.95, "greater", 1)
    assert same == (0.0, 0.0, 0.0)  # the same predictions: no evidence either way
    again = bootstrap.paired_difference(metric, *predictions(6, 4, 300), 10, 0.95, "greater", 1)
    assert again == coin  # seeded


def test_decision_on_gates_champion_data_and_evidence() -> None:
    better = bootstrap.compare(*predictions(30, 2, 300), 10, CFG, seed=1)
    alias, [reason] = gates.decide([], "", True, {}, CFG)
    assert (alias, reason.startswith("no champion yet")) == ("champion", True)
    alias, [reason] = gates.decide(["export stage wrote no metrics"], "3", True, better, CFG)
    assert (alias, reason) == ("challenger", "gate failed: export stage wrote no metrics")
    alias, [reason] = gates.decide([], "3", False, {}, CFG)
    assert alias == "challenger" and reason.startswith("other data: champion version 3")
    alias, [reason] = gates.decide([], "3", True, better, CFG)
    assert alias == "champion" and "better by more than chance" in reason
    assert "30 + 2 images" in reason
    strict = CFG.model_copy(update={"min_improvement": 0.5})
    alias, [reason] = gates.decide([], "3", True, better, strict)
    assert alias == "challenger" and "promote.min_improvement 0.5" in reason
    worse = bootstrap.compare(*predictions(2, 30, 300), 10, CFG, seed=1)
    alias, [reason] = gates.decide([], "3", True, worse, CFG)
    assert alias == "challenger" and reason.startswith("not better by more than chance")


# ---------------------------------------------------------------- with MLflow off
def test_promote_without_mlflow_writes_the_card_and_the_deployable(trained: Path) -> None:
    decided = json.loads((trained / paths.PROMOTE_METRICS).read_text())
    assert decided["decision"] == "not registered"
    assert decided["reasons"][-1] == "not registered: mlflow.enabled is false"
    assert (trained / paths.DEPLOYABLE / "MLmodel").exists()
    card = (trained / paths.MODEL_CARD).read_text()
    for heading in ("## Data", "## Training", "### Curves", "## Test scores", "### Confusion",
                    "## ONNX and OpenVINO", "### Runtimes", "## Release"):  # fmt: skip
        assert heading in card, heading
    evaluated = json.loads((trained / paths.EVALUATE_METRICS).read_text())
    assert f"test accuracy {evaluated['accuracy']:.4f}" in card.splitlines()[0]


# ---------------------------------------------------------------- the registry
def promote_into(repo: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """promote.main in `repo` against the SQLite store `store`; metrics/promote.json."""
    monkeypatch.chdir(repo)
    write_params(repo, mlflow={"enabled": True, "tracking_uri": f"sqlite:///{store}"})
    promote.main(load_params())
    return json.loads(paths.PROMOTE_METRICS.read_text())


def another_run(repo: Path) -> None:
    """Give the model in `repo` a run of its own (a run belongs to one trained model)."""
    paths_file = repo / paths.RUN_ID
    paths_file.write_text(json.dumps({"run_key": mlflow_store.new_run_key()}))


@pytest.mark.slow
def test_champion_moves_only_on_evidence_and_rolls_back(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "registry" / "mlflow.db"
    strong = tmp_path / "strong"
    shutil.copytree(trained, strong, symlinks=True)
    # A deliberately weak champion: one epoch at a tiny learning rate, through every stage
    # (no INT8: its FP16 IR is what ships).
    weak = tmp_path / "weak"
    shutil.copytree(trained, weak, symlinks=True)
    monkeypatch.chdir(weak)
    write_params(
        weak, train={"epochs": 1, "warmup_epochs": 0, "lr": 1e-5}, openvino={"int8_methods": []}
    )
    for stage in (train, evaluate, export, convert, benchmark):
        stage.main(load_params())
    first = promote_into(weak, store, monkeypatch)
    assert (first["decision"], first["version"], first["deployable"]) == (
        "champion",
        1,
        "openvino_fp16",
    )
    assert first["reasons"][-1].startswith("no champion yet")

    better = promote_into(strong, store, monkeypatch)
    assert (better["decision"], better["version"]) == ("champion", 2)
    assert better["improvement_low"] > 0
    assert better["reasons"][-1].startswith("better by more than chance")

    worse = promote_into(weak, store, monkeypatch)  # `dvc repro -f -s promote` of the weak run
    assert (worse["decision"], worse["version"]) == ("challenger", 1)  # no new version
    assert worse["improvement"] < 0
    again = promote_into(strong, store, monkeypatch)  # deciding again for the champion
    assert (again["decision"], again["version"]) == ("champion", 2)
    assert again["reasons"][-1] == "already the champion"  # the version keeps why it won

    # Another test split (a new prepared-data digest): not compared at all.
    other = tmp_path / "other"
    shutil.copytree(strong, other, symlinks=True)
    another_run(other)
    monkeypatch.chdir(other)
    write_params(other, data={"test_fraction": 0.25})
    prepare.main(load_params())
    elsewhere = promote_into(other, store, monkeypatch)
    assert (elsewhere["decision"], elsewhere["version"]) == ("challenger", 3)
    assert elsewhere["reasons"][-1].startswith("other data")
    assert "improvement" not in elsewhere

    client = client_for(store.parent)
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == "2"
    assert champion.tags[registry.PREVIOUS_TAG] == "1"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "3"
    [run] = [r for r in runs_of(store.parent) if r.info.run_id == champion.run_id]
    card = (strong / paths.MODEL_CARD).read_text()
    assert run.data.tags["mlflow.note.content"] == card  # the run's description in the UI
    assert run.data.tags["promote.decision"] == "champion"
    assert "better by more than chance" in client.get_model_version(NAME, "2").description

    monkeypatch.chdir(strong)
    assert rollback.rollback(load_params(), None) == ("2", "1")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
