"""params.yaml: the real file loads; every kind of bad value stops with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers.repos import ROOT, read_params, run_module
from stages.core.params import Params, ParamsError, load_params


def test_repository_params_load() -> None:
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.source == "digits"
    assert params.model.name == "cnn"
    assert params.train.nproc_per_node == "auto"


def test_every_param_has_a_comment() -> None:
    # params.yaml is the one place a default lives, so each one must say why/unit/range.
    lines = (ROOT / "params.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue  # comments and section headers
        above = lines[number - 1].strip()
        assert above.startswith("#") or "#" in line or _shares_comment(lines, number), (
            f"params.yaml line {number + 1} has no comment: {line!r}"
        )


def _shares_comment(lines: list[str], number: int) -> bool:
    # Consecutive keys may share one comment block above them (e.g. step_epochs/gamma).
    while number > 0 and not lines[number - 1].strip().startswith("#"):
        number -= 1
        if not lines[number].strip() or lines[number].strip().endswith(":"):
            return False
    return number > 0


BAD = [
    # (where, value, words the message must contain)
    (("train", "lr"), "fast", ["train.lr", "number", "'fast'"]),
    (("train", "lr"), 0, ["train.lr", "greater than 0"]),
    (("train", "epochs"), 1.5, ["train.epochs", "integer"]),
    (("train", "epochs"), 0, ["train.epochs", "greater than or equal to 1"]),
    (("train", "optimizer"), "rmsprop", ["train.optimizer", "'adamw'", "'rmsprop'"]),
    (("train", "nproc_per_node"), "many", ["train.nproc_per_node"]),
    (("train", "nproc_per_node"), 0, ["train.nproc_per_node"]),
    (("train", "warmup_epochs"), 99, ["train", "warmup_epochs (99) must not exceed epochs"]),
    (("train", "lr_rate"), 0.1, ["train.lr_rate", "unknown key"]),
    (("data", "val_fraction"), 0.9, ["data.val_fraction", "less than or equal to 0.5"]),
    (("data", "source"), "cifar", ["data.source", "'cifar'"]),
    (("data", "channels"), 2, ["data.channels", "1", "3"]),
    (("model", "name"), "vit", ["model.name", "'vit'"]),
    (("export", "opset"), 9, ["export.opset", "greater than or equal to 17"]),
    (("openvino", "max_accuracy_drop"), -0.1, ["openvino.max_accuracy_drop"]),
    (("benchmark", "seconds"), "long", ["benchmark.seconds", "'long'"]),
    (("mlflow", "experiment"), "", ["mlflow.experiment", "at least 1 character"]),
    (("seed",), -1, ["seed", "greater than or equal to 0"]),
    (("runtime", "resume"), "maybe", ["runtime.resume", "boolean"]),
    (("runtime", "threads"), -1, ["runtime.threads", "greater than or equal to 0"]),
    (("mlflow", "enabled"), "yes please", ["mlflow.enabled", "boolean"]),
    # An old experiment's params.yaml says where a moved key went.
    (("train", "resume"), True, ["train.resume: moved to runtime.resume", "reruns no stage"]),
    (("train", "threads"), 2, ["train.threads: moved to runtime.threads"]),
]


def _with(raw: dict, where: tuple[str, ...], value) -> dict:
    target = raw
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    return raw


@pytest.mark.parametrize(("where", "value", "words"), BAD, ids=[".".join(b[0]) for b in BAD])
def test_bad_value_is_one_line_naming_file_and_key(tmp_path: Path, where, value, words) -> None:
    file = tmp_path / "params.yaml"
    file.write_text(yaml.safe_dump(_with(read_params(ROOT), where, value)))
    with pytest.raises(ParamsError) as caught:
        load_params(file)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{file}: ")
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_missing_section_and_missing_key(tmp_path: Path) -> None:
    raw = read_params(ROOT)
    del raw["benchmark"]
    del raw["train"]["lr"]
    file = tmp_path / "params.yaml"
    file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"params.yaml: (benchmark|train.lr): missing"):
        load_params(file)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train: [1, 2\n", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping of sections, got list"),
        ("", "expected a mapping of sections, got NoneType"),
        ("seed: 1\n\tdata: 2\n", "not valid YAML"),
    ],
)
def test_broken_yaml(tmp_path: Path, text: str, expected: str) -> None:
    file = tmp_path / "params.yaml"
    file.write_text(text)
    with pytest.raises(ParamsError, match=expected):
        load_params(file)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")


ENTRY_POINTS = {
    "runner": ("-m", "stages", "prepare"),
    "launcher": ("-m", "stages.launch", "--standalone", "-m", "stages", "train"),
}


@pytest.mark.parametrize(
    "argv",
    [ENTRY_POINTS["runner"], pytest.param(ENTRY_POINTS["launcher"], marks=pytest.mark.slow)],
    ids=list(ENTRY_POINTS),
)
def test_stage_exits_with_one_line_before_any_work(repo: Path, argv: tuple[str, ...]) -> None:
    # Through the real entry point: no traceback, non-zero exit, nothing written.
    raw = read_params(repo)
    raw["train"]["lr"] = "fast"
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    done = run_module(repo, *argv)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: params.yaml: train.lr: expected a valid number, unable to parse "
        "string as a number, got 'fast'"
    ], done.stderr
    assert not (repo / "data" / "prepared").exists()
    assert not (repo / "models").exists()
