"""`vision-predict`: image files through every produced model agree with the
evaluate stage, with the preprocessing of training."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.repos import run_script
from stages import prepare
from stages.core import paths
from stages.core.errors import StageError
from stages.core.params import load_params
from stages.data import sources
from stages.tools import predict

MODELS = {
    "pt": paths.MODEL,
    "onnx": paths.ONNX,
    "fp16": paths.IR_FP16,
    "int8": paths.IR_INT8,
}


def save_png(image: torch.Tensor, file: Path) -> None:
    """A uint8 1 x H x W tensor as a grey PNG (lossless)."""
    Image.fromarray(image[0].numpy(), mode="L").save(file)


@pytest.fixture(scope="module")
def test_pngs(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test split as PNG files at their prepared size, named in split order."""
    folder = tmp_path_factory.mktemp("test_pngs")
    blob = torch.load(trained / paths.split_file("test"), weights_only=True)
    for i, image in enumerate(blob["images"]):
        save_png(image, folder / f"{i:04d}.png")
    return folder


def evaluate_predictions(trained: Path) -> list[str]:
    """The class evaluate predicted for each test image, in split order."""
    with (trained / paths.CONFUSION).open() as fh:
        return [row["predicted"] for row in csv.DictReader(fh)]


def run_predict(capsys: pytest.CaptureFixture, *argv: str) -> list[list[str]]:
    """predict.main's table as rows of cells (header included)."""
    capsys.readouterr()
    predict.main(list(argv))
    return [line.split("\t") for line in capsys.readouterr().out.splitlines()]


def test_every_runtime_agrees_with_evaluate(
    trained: Path, test_pngs: Path, capsys: pytest.CaptureFixture
) -> None:
    expected = evaluate_predictions(trained)
    with (trained / paths.CONFUSION).open() as fh:
        truth = [row["actual"] for row in csv.DictReader(fh)]
    converted = json.loads((trained / paths.CONVERT_METRICS).read_text())
    exported = json.loads((trained / paths.EXPORT_METRICS).read_text())
    for name, model in MODELS.items():
        rows = run_predict(capsys, str(test_pngs), "--model", str(trained / model))
        assert rows[0] == ["path", "label", "confidence"]
        assert [Path(r[0]).name for r in rows[1:]] == [f"{i:04d}.png" for i in range(len(expected))]
        labels = [r[1] for r in rows[1:]]
        assert all(0.0 < float(r[2]) <= 1.0 for r in rows[1:])
        agreement = float(np.mean([a == b for a, b in zip(labels, expected, strict=True)]))
        if name == "pt":
            assert labels == expected  # the same model on the same pixels
        elif name == "onnx":
            # export's gate held ONNX to PyTorch's class on every test image.
            assert exported["argmax_agreement"] == 1.0
            assert labels == expected
        else:
            # convert scored the same IR on the same pixels in the same batches: predict
            # must reproduce its test accuracy exactly, and stay close to PyTorch.
            accuracy = float(np.mean([a == b for a, b in zip(labels, truth, strict=True)]))
            assert accuracy == pytest.approx(converted[f"accuracy_{name}"]), name
            assert agreement >= (0.99 if name == "fp16" else 0.98), name


def test_original_digit_images_are_prepared_like_training(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The raw 8x8 digits, read by predict, become the very pixels the prepare stage made."""
    params = load_params(trained / paths.PARAMS)
    raw = prepare.make_splits(sources.read(params.data), params.data, params.seed)["test"]
    prepared = torch.load(trained / paths.split_file("test"), weights_only=True)["images"]
    assert raw.images.shape[-1] == 8 and prepared.shape[-1] == 28
    folder = tmp_path / "raw"
    folder.mkdir()
    for i, image in enumerate(raw.images):
        save_png(image, folder / f"{i:04d}.png")
    config = predict.read_config(trained / paths.MODEL)
    files = predict.find_images([str(folder)])
    loaded = torch.stack([predict.load_image(file, config) for file in files])
    assert torch.equal(loaded, prepared)
    rows = run_predict(capsys, str(folder), "--model", str(trained / paths.MODEL))
    assert [r[1] for r in rows[1:]] == evaluate_predictions(trained)


def test_formats_colour_sizes_and_top_k(
    trained: Path, test_pngs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "mixed"
    (folder / "nested").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    grey = Image.open(test_pngs / "0000.png")
    grey.save(folder / "a.png")
    grey.save(folder / "b.bmp")
    grey.convert("RGB").save(folder / "nested" / "c.png")  # grey in RGB: same luma
    grey.save(folder / "d.jpg", quality=95)
    grey.resize((56, 56)).save(folder / "e.tif")
    grey.save(folder / ".hidden" / "skipped.png")
    (folder / "notes.txt").write_text("not an image")  # a folder's other files are skipped
    rows = run_predict(capsys, str(folder), "--model", str(trained / paths.IR_FP16), "--top", "3")
    assert rows[0] == [
        "path",
        "label",
        "confidence",
        "label_2",
        "confidence_2",
        "label_3",
        "confidence_3",
    ]
    names = [Path(r[0]).relative_to(folder).as_posix() for r in rows[1:]]
    assert names == ["a.png", "b.bmp", "d.jpg", "e.tif", "nested/c.png"]
    by_name = dict(zip(names, rows[1:], strict=True))
    for name in ("b.bmp", "nested/c.png"):  # lossless: the very same input
        assert by_name[name][1:] == by_name["a.png"][1:]
    for row in rows[1:]:
        confidences = [float(c) for c in row[2::2]]
        assert confidences == sorted(confidences, reverse=True)
        assert len(set(row[1::2])) == 3 and sum(confidences) <= 1.0 + 1e-3


def test_model_config_lookup(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = tmp_path / "one.png"
    save_png(torch.load(trained / paths.split_file("test"), weights_only=True)["images"][0], image)
    # An IR one folder below models/model.pt finds it without --config.
    assert predict.config_file(trained / paths.IR_INT8, None) == trained / paths.MODEL
    lone = tmp_path / "lone.onnx"
    shutil.copy(trained / paths.ONNX, lone)
    with pytest.raises(StageError, match=r"no model\.pt beside it .* --config"):
        predict.main([str(image), "--model", str(lone)])
    rows = run_predict(
        capsys, str(image), "--model", str(lone), "--config", str(trained / paths.MODEL)
    )
    assert len(rows) == 2
    with pytest.raises(StageError, match="not a saved model"):
        predict.main([str(image), "--model", str(lone), "--config", str(trained / paths.PARAMS)])


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.png", "no such file or folder"),
        ("empty", "no image files"),
        ("fake.png", "not a readable image"),
    ],
)
def test_bad_inputs_are_one_line_errors(
    trained: Path, tmp_path: Path, name: str, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake.png").write_text("a text file with an image's name")
    with pytest.raises(StageError, match=message) as failure:
        predict.main([str(tmp_path / name), "--model", str(trained / paths.MODEL)])
    assert "\n" not in str(failure.value)


@pytest.mark.slow  # several seconds on its own: out of the `not slow` loop
def test_command_line(
    trained: Path, test_pngs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A table on stdout; or, through the real entry point, one error line on stderr."""
    rows = run_predict(capsys, str(test_pngs / "0000.png"), "--top", "2", "--model",
                       str(trained / paths.MODEL))  # fmt: skip
    assert rows[0] == ["path", "label", "confidence", "label_2", "confidence_2"]
    assert rows[1][1] == evaluate_predictions(trained)[0]
    bad = run_script(trained, "vision-predict", str(tmp_path / "nope.png"))
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope.png'}: no such file or folder"
    ]


def test_console_script_entry_point(trained: Path, test_pngs: Path) -> None:
    # The installed `vision-predict` (pyproject's console script), as a user runs it; the
    # default --model is models/model.pt of the working directory.
    done = run_script(trained, "vision-predict", str(test_pngs / "0001.png"))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[1].split("\t")[1] == evaluate_predictions(trained)[1]
