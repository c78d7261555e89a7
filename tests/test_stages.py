"""Each stage's main() on shrunk params (the `trained` run): its outputs, and the params
sections it reads against what dvc.yaml lists for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers.repos import ROOT, Trained
from stages.core import paths
from stages.core.params import SETTINGS, load_params


def declared_params() -> dict[str, set[str]]:
    """dvc.yaml's `params:` of each stage."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: set(stage.get("params", [])) for name, stage in stages.items()}


def test_each_stage_reads_what_dvc_yaml_lists_plus_settings(trained_run: Trained) -> None:
    # DVC reruns a stage when the params it lists change, and only then: a stage must read
    # no experiment param it does not list. The settings sections (where and how runs are
    # recorded, threads, resume) are read without being listed, so editing them reruns
    # nothing; dvc.yaml must list none of them.
    declared = declared_params()
    assert set(SETTINGS) == {"mlflow", "runtime", "sweep"}
    for stage, read in trained_run.reads.items():
        assert read - set(SETTINGS) == declared[stage], stage
        assert not declared[stage] & set(SETTINGS), stage
    assert "runtime" in trained_run.reads["train"]  # threads and resume
    assert "mlflow" in trained_run.reads["evaluate"]  # the recorder's settings


def test_prepare_writes_uint8_splits_and_meta(trained: Path) -> None:
    meta = json.loads((trained / paths.META).read_text())
    counts = meta["counts"]
    assert sum(counts.values()) == 1797  # every bundled digit lands in exactly one split
    for split in paths.SPLITS:
        blob = torch.load(trained / paths.split_file(split), weights_only=True)
        assert blob["images"].dtype == torch.uint8
        assert blob["images"].shape[1:] == (1, 28, 28)
        assert len(blob["labels"]) == counts[split]
    assert meta["classes"] == [str(d) for d in range(10)]
    assert 0.1 < meta["mean"][0] < 0.5 and 0.1 < meta["std"][0] < 0.5
    assert len(meta["digest"]) == 64


def test_train_writes_model_checkpoint_history_and_run_key(trained: Path) -> None:
    metrics = json.loads((trained / paths.TRAIN_METRICS).read_text())
    assert next(iter(metrics)) == "val_accuracy"  # the number people look at first
    assert metrics["images_per_second"] > 0
    blob = torch.load(trained / paths.MODEL, weights_only=True)
    assert blob["config"]["name"] == "cnn"
    assert blob["config"]["classes"] == [str(d) for d in range(10)]
    ckpt = torch.load(trained / paths.CHECKPOINT, weights_only=True)  # no pickled code
    assert ckpt["epoch"] == 3
    assert (trained / paths.TRAIN_HISTORY).read_text().startswith("epoch,")
    key = json.loads((trained / paths.RUN_ID).read_text())["run_key"]
    assert key == ckpt["run_key"] and len(key) == 32


def test_evaluate_writes_scores_per_class_and_confusion(trained: Path) -> None:
    scores = json.loads((trained / paths.EVALUATE_METRICS).read_text())
    assert list(scores) == ["accuracy", "macro_f1", "loss"]
    assert scores["accuracy"] > 0.5  # three short epochs on digits are far above chance
    rows = (trained / paths.PER_CLASS).read_text().splitlines()
    assert rows[0] == "class,precision,recall,f1,support"
    assert [r.split(",")[0] for r in rows[1:]] == [str(d) for d in range(10)]
    meta = json.loads((trained / paths.META).read_text())
    assert sum(int(r.split(",")[-1]) for r in rows[1:]) == meta["counts"]["test"]
    assert len((trained / paths.CONFUSION).read_text().splitlines()) == meta["counts"]["test"] + 1


# Words a metrics file may hold besides numbers: `dvc metrics show` prints the strings as
# columns and leaves lists out; MLflow gets them as tags.
WORDS = {"convert": {"int8_method"}, "promote": {"decision", "deployable", "reasons"}}


@pytest.mark.parametrize(
    "stage", ["train", "evaluate", "export", "convert", "benchmark", "promote"]
)
def test_metrics_files_hold_numbers_and_named_words(trained: Path, stage: str) -> None:
    def leaves(value):
        if isinstance(value, dict):
            for item in value.values():
                yield from leaves(item)
        else:
            yield value

    metrics = json.loads((trained / paths.METRICS / f"{stage}.json").read_text())
    words = WORDS.get(stage, set())
    assert words <= set(metrics), metrics
    numbers = {k: v for k, v in metrics.items() if k not in words}
    assert all(isinstance(v, float | int) and not isinstance(v, bool) for v in leaves(numbers))


def test_export_and_convert_pass_their_gates(trained: Path) -> None:
    limits = load_params(trained / paths.PARAMS)
    parity = json.loads((trained / paths.EXPORT_METRICS).read_text())
    assert parity["max_abs_diff"] <= limits.export.atol
    assert parity["argmax_agreement"] >= limits.export.min_agreement
    converted = json.loads((trained / paths.CONVERT_METRICS).read_text())
    assert (trained / paths.IR_FP16).exists() and (trained / paths.IR_INT8).exists()
    evaluated = json.loads((trained / paths.EVALUATE_METRICS).read_text())
    assert converted["accuracy_fp16"] == pytest.approx(evaluated["accuracy"], abs=0.01)
