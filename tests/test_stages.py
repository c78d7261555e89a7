"""Each stage's main() on shrunk params in a tmp copy of the repository."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT
from stages import benchmark, convert, evaluate, export, paths, prepare, train
from stages.params import Params, load_params


class Recorder:
    """Params that remember which top-level sections a stage reads."""

    def __init__(self, params: Params):
        self._params = params
        self.read: set[str] = set()

    def __getattr__(self, name: str):
        if name in ("flat", "digest"):
            method = getattr(self._params, name)

            def recorded(*sections: str):
                self.read.update(sections)
                return method(*sections)

            return recorded
        if name in Params.model_fields:
            self.read.add(name)
        return getattr(self._params, name)


def declared_params() -> dict[str, set[str]]:
    """dvc.yaml's `params:` of each stage."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: set(stage.get("params", [])) for name, stage in stages.items()}


def test_prepare_writes_uint8_splits_and_meta(repo: Path) -> None:
    prepare.main(load_params())
    meta = json.loads(paths.META.read_text())
    counts = meta["counts"]
    assert sum(counts.values()) == 1797  # every bundled digit lands in exactly one split
    for split in paths.SPLITS:
        blob = torch.load(paths.split_file(split), weights_only=True)
        assert blob["images"].dtype == torch.uint8
        assert blob["images"].shape[1:] == (1, 28, 28)
        assert len(blob["labels"]) == counts[split]
    assert meta["classes"] == [str(d) for d in range(10)]
    assert 0.1 < meta["mean"][0] < 0.5 and 0.1 < meta["std"][0] < 0.5
    assert len(meta["digest"]) == 64


def test_every_stage_main_in_order(repo: Path) -> None:
    declared = declared_params()
    read: dict[str, set[str]] = {}

    def run(name: str, module) -> None:
        recorder = Recorder(load_params())
        module.main(recorder)
        read[name] = recorder.read

    run("prepare", prepare)
    run("train", train)
    metrics = json.loads(paths.TRAIN_METRICS.read_text())
    assert metrics["images_per_second"] > 0
    assert metrics["world_size"] == 1
    assert metrics["epochs"] == 1
    blob = torch.load(paths.MODEL, weights_only=True)
    assert blob["config"]["name"] == "cnn"
    assert blob["config"]["classes"] == [str(d) for d in range(10)]
    assert paths.CHECKPOINT.exists()
    assert paths.TRAIN_HISTORY.read_text().startswith("epoch,")

    run("evaluate", evaluate)
    scores = json.loads(paths.EVALUATE_METRICS.read_text())
    assert set(scores["per_class"]) == {str(d) for d in range(10)}
    # one epoch on digits is already far above chance
    assert scores["accuracy"] > 0.5
    assert len(paths.CONFUSION.read_text().splitlines()) == scores["count"] + 1

    run("export", export)
    parity = json.loads(paths.EXPORT_METRICS.read_text())
    limits = load_params().export
    assert parity["max_abs_diff"] <= limits.atol
    assert parity["argmax_agreement"] >= limits.min_agreement

    run("convert", convert)
    converted = json.loads(paths.CONVERT_METRICS.read_text())
    assert paths.IR_FP16.exists() and paths.IR_INT8.exists()
    assert converted["accuracy_fp16"] == pytest.approx(scores["accuracy"], abs=0.01)

    run("benchmark", benchmark)
    speeds = json.loads(paths.BENCHMARK_METRICS.read_text())
    for runtime in ("pytorch", "onnxruntime", "openvino_fp16", "openvino_int8"):
        assert speeds[runtime]["latency_ms"] > 0
        assert speeds[runtime]["throughput"] > 0

    # Each stage reads exactly the params sections dvc.yaml lists for it: DVC reruns a stage
    # when they change, and only then.
    assert read == declared
