"""Classify image files with any model the pipeline made: .pt, .onnx or OpenVINO .xml.

    vision-predict photo.png scans/ --model models/openvino/model_int8.xml --top 3

Images are decoded, converted to grey or RGB and resized by the very code the prepare
stage runs on image folders, with the channels, size and classes saved in models/model.pt;
the models normalize inside, so pixels / 255 is all that is left to do.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.core import logs, paths
from stages.core.entry import install_excepthook
from stages.core.errors import StageError
from stages.core.outputs import load_torch
from stages.core.params import Data
from stages.data import sources
from stages.models import runtimes

# Images decoded and scored at a time: a folder of any size runs in bounded memory.
CHUNK = 256
CONFIG_KEYS = ("channels", "image_size", "classes")


def folder_images(folder: Path) -> list[Path]:
    """Image files under a folder and its visible sub-folders, sorted by path."""
    found = []
    for top, dirs, names in os.walk(folder):
        # Hidden folders (.git, .ipynb_checkpoints) hold none of the user's images.
        dirs[:] = [d for d in dirs if sources.visible(d)]
        found += [
            Path(top, name)
            for name in names
            if sources.visible(name) and Path(name).suffix.lower() in sources.IMAGE_SUFFIXES
        ]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def find_images(inputs: list[str]) -> list[Path]:
    """The files named, plus every image file under the folders named."""
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = folder_images(path)
            if not found:
                kinds = ", ".join(sources.IMAGE_SUFFIXES)
                raise StageError(f"{path}: no image files ({kinds}) in this folder")
            files += found
        elif path.is_file():
            # A file named explicitly is tried whatever its suffix; decoding decides.
            files.append(path)
        else:
            raise StageError(f"{path}: no such file or folder")
    return files


def config_file(model: Path, config: Path | None) -> Path:
    """Where the preprocessing config lives: the .pt itself, --config, or a model.pt nearby."""
    if model.suffix.lower() == ".pt":
        return model
    if config is not None:
        return config
    # models/model.onnx sits beside models/model.pt; the IRs one folder below it.
    for folder in (model.parent, model.parent.parent):
        if (folder / paths.MODEL.name).is_file():
            return folder / paths.MODEL.name
    raise StageError(
        f"{model}: no {paths.MODEL.name} beside it to read channels, image size and classes "
        f"from (pass --config {paths.MODEL})"
    )


def read_config(file: Path) -> dict[str, Any]:
    """channels, image_size and classes from a saved model.pt (its `config` entry)."""
    blob = load_torch(file, "a saved model")
    config = blob.get("config") if isinstance(blob, dict) else None
    if not isinstance(config, dict) or not all(key in config for key in CONFIG_KEYS):
        raise StageError(f"{file}: holds no model config ({', '.join(CONFIG_KEYS)})")
    return config


def load_image(file: Path, config: dict[str, Any]) -> torch.Tensor:
    """One image file as uint8 C x H x W, prepared exactly as the prepare stage does."""
    # sources' own decoder: EXIF rotation, transparency on white paper, 16-bit scans,
    # grey/RGB conversion and datasets.resize, the same code path as training data.
    shape = Data.model_construct(channels=config["channels"], image_size=config["image_size"])
    try:
        return sources.decode_image(file.read_bytes(), shape)
    except OSError as exc:
        raise StageError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    except sources.BadFile as exc:
        raise StageError(f"{file}: {exc}") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from logits, computed stably in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def classify(
    files: list[Path], run: runtimes.Runtime, config: dict[str, Any], top: int
) -> Iterator[tuple[Path, list[tuple[str, float]]]]:
    """(file, [(label, probability)] best first) per image, a chunk of files at a time."""
    classes = config["classes"]
    for start in range(0, len(files), CHUNK):
        chunk = files[start : start + CHUNK]
        images = torch.stack([load_image(file, config) for file in chunk])
        try:
            logits = runtimes.logits(run, images)
        except Exception as exc:  # a model and a config that do not belong together
            side = config["image_size"]
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise StageError(
                f"the model cannot run on {config['channels']}x{side}x{side} images "
                f"({type(exc).__name__}: {first}); is --config the model's own model.pt?"
            ) from None
        if logits.shape[1] != len(classes):
            raise StageError(
                f"the model gives {logits.shape[1]} scores per image but its config lists "
                f"{len(classes)} classes; is --config the model's own model.pt?"
            )
        probabilities = softmax(logits)
        best = np.argsort(-probabilities, axis=1, kind="stable")[:, :top]
        for file, row, order in zip(chunk, probabilities, best, strict=True):
            yield file, [(classes[i], float(row[i])) for i in order]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vision-predict",
        description="Classify images with a model the pipeline produced; prints one "
        "tab-separated line per image: path, label, confidence (softmax).",
    )
    parser.add_argument("inputs", nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument(
        "--model",
        type=Path,
        default=paths.MODEL,
        help="models/model.pt (default), models/model.onnx, models/openvino/model.xml "
        "or models/openvino/model_int8.xml",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="the model.pt whose config (channels, image size, classes) applies; default: "
        "the model.pt beside an .onnx or .xml model",
    )
    parser.add_argument("--top", type=int, default=1, metavar="K", help="best K classes")
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads (0 = every core this process may use)"
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    """Print path, label and confidence for every image (top K pairs with --top K)."""
    args = parse_args(argv)
    logs.setup("predict")
    if args.top < 1:
        raise StageError(f"--top: expected a number >= 1, got {args.top}")
    if args.threads < 0:
        raise StageError(f"--threads: expected a number >= 0, got {args.threads}")
    files = find_images(args.inputs)
    config = read_config(config_file(args.model, args.config))
    run = runtimes.load(args.model, args.threads)
    top = min(args.top, len(config["classes"]))
    header = ["path", "label", "confidence"]
    for rank in range(2, top + 1):
        header += [f"label_{rank}", f"confidence_{rank}"]
    # stdout is the product here: one table, tab-separated so paths with spaces survive.
    # The header waits for the first scored chunk, so a bad first file prints no table.
    for number, (file, best) in enumerate(classify(files, run, config, top)):
        if number == 0:
            print("\t".join(header))
        cells = [str(file)]
        for label, probability in best:
            cells += [label, f"{probability:.4f}"]
        print("\t".join(cells))


def cli() -> None:
    """Entry point of the `vision-predict` console script."""
    install_excepthook()
    try:
        main(sys.argv[1:])
    except BrokenPipeError:
        # `vision-predict folder | head`: the reader left; stop quietly like other tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    cli()
