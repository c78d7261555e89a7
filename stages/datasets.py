"""Prepared data: splits as uint8 tensors, their files and meta.json, shared by every stage."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from stages import paths
from stages.errors import StageError
from stages.params import Data

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Images as uint8 N x C x H x W and labels as int64 N."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Split:
        index_t = torch.as_tensor(index, dtype=torch.long)
        return Split(self.images[index_t].contiguous(), self.labels[index_t].contiguous())


@dataclass
class Source:
    """What a source reader returns: its splits (with or without a test split) and classes."""

    splits: dict[str, Split]
    classes: list[str]
    digest: str
    details: dict[str, Any] = field(default_factory=dict)


def resize(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """uint8 N x C x H x W to `size` x `size` with `channels`, antialiased, still uint8."""
    if images.shape[1] != channels:
        if channels == 3:
            images = images.expand(-1, 3, -1, -1)
        else:
            # ITU-R 601 luma, the weights PIL's convert("L") uses.
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * weights).sum(1, keepdim=True).round().to(torch.uint8)
    if images.shape[-2:] != (size, size):
        out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
        images = out.round().clamp_(0, 255).to(torch.uint8)
    return images.contiguous()


def content_digest(*arrays: np.ndarray | bytes) -> str:
    """sha256 of raw input contents, to tell whether the data changed."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(a if isinstance(a, bytes) else np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def stratified_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split off `fraction` of the images, the same share of every class, seeded."""
    labels = split.labels.numpy()
    if fraction <= 0:
        return split, split.subset(np.array([], dtype=np.int64))
    index = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    keep, held = train_test_split(index, test_size=fraction, random_state=seed, stratify=stratify)
    return split.subset(np.sort(keep)), split.subset(np.sort(held))


def make_splits(source: Source, cfg: Data, seed: int) -> dict[str, Split]:
    """train/val/test: the source's own test split when it has one, else stratified."""
    train = source.splits["train"]
    test = source.splits.get("test")
    if test is None:
        train, test = stratified_split(train, cfg.test_fraction, seed)
    train, val = stratified_split(train, cfg.val_fraction, seed)
    return {"train": train, "val": val, "test": test}


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images on the 0..1 scale the model sees."""
    x = images.double().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def save_split(split: Split, file) -> None:
    """Write one split (uint8 images, int64 labels) as a torch file."""
    torch.save({"images": split.images, "labels": split.labels}, file)


def load_split(name: str) -> Split:
    """Read one prepared split; a missing or broken file is a one-line error."""
    file = paths.split_file(name)
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
        return Split(blob["images"], blob["labels"])
    except FileNotFoundError:
        raise StageError(f"{file}: not found (run the prepare stage: dvc repro prepare)") from None
    except Exception as exc:  # a truncated or foreign file
        raise StageError(f"{file}: not a prepared split ({exc.__class__.__name__})") from None


def load_meta() -> dict[str, Any]:
    """meta.json of the prepared data: classes, shape, mean/std, digest."""
    try:
        return json.loads(paths.META.read_text())
    except FileNotFoundError:
        raise StageError(f"{paths.META}: not found (run the prepare stage)") from None
    except json.JSONDecodeError as exc:
        raise StageError(f"{paths.META}: not valid JSON ({exc.msg})") from None


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to the float 0..1 the models take (they normalize inside)."""
    return images.float().div_(255.0)
