"""Prepared data: splits as uint8 tensors, their files and meta.json, shared by every stage."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stages.core import paths
from stages.core.errors import StageError
from stages.core.outputs import load_torch


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


# Pixel values converted per step by resize/channel_stats: float or int64 copies of a chunk
# (~8 MB), never of the whole split, so 60,000 MNIST images stay far below a gigabyte.
CHUNK_VALUES = 1 << 20


def _chunk(images: torch.Tensor, *shapes: tuple[int, ...]) -> int:
    per_image = max(math.prod(shape) for shape in (tuple(images.shape[1:]), *shapes))
    return max(1, CHUNK_VALUES // max(per_image, 1))


def _resize_chunk(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    if images.shape[1] == 3 and channels == 1:
        # ITU-R 601 luma, the weights PIL's convert("L") uses.
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        images = (images.float() * weights).sum(1, keepdim=True).round().to(torch.uint8)
    if images.shape[-2:] != (size, size):
        out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
        images = out.round().clamp_(0, 255).to(torch.uint8)
    # Grey to RGB after resizing: three equal channels, a third of the interpolation work.
    return images.expand(-1, channels, -1, -1)


def resize(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """uint8 N x C x H x W to `size` x `size` with `channels`, antialiased, still uint8."""
    if images.shape[1] == channels and images.shape[-2:] == (size, size):
        return images.contiguous()
    # Each image is interpolated on its own, so chunking gives the same bytes as one call.
    out = torch.empty((len(images), channels, size, size), dtype=torch.uint8)
    step = _chunk(images, (3, *images.shape[2:]), (3, size, size))
    for start in range(0, len(images), step):
        out[start : start + step] = _resize_chunk(images[start : start + step], size, channels)
    return out


def content_digest(*arrays: np.ndarray | bytes) -> str:
    """sha256 of raw input contents, to tell whether the data changed."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(a if isinstance(a, bytes) else np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images on the 0..1 scale the model sees."""
    # Exact integer sums over chunks: no float copy of the whole split, and no rounding
    # that depends on the chunk size.
    total = torch.zeros(images.shape[1], dtype=torch.int64)
    squares = torch.zeros(images.shape[1], dtype=torch.int64)
    step = _chunk(images)
    for start in range(0, len(images), step):
        chunk = images[start : start + step].to(torch.int64)
        total += chunk.sum(dim=(0, 2, 3))
        squares += (chunk * chunk).sum(dim=(0, 2, 3))
    n = images.numel() // max(images.shape[1], 1)
    mean = [t / n / 255.0 for t in total.tolist()]
    # Unbiased, as torch.std: (sum x^2 - (sum x)^2 / n) / (n - 1), in exact integers.
    var = [
        (q * n - t * t) / (n * max(n - 1, 1)) / 255.0**2
        for t, q in zip(total.tolist(), squares.tolist(), strict=True)
    ]
    std = [max(math.sqrt(max(v, 0.0)), 1e-6) for v in var]
    return [round(m, 6) for m in mean], [round(s, 6) for s in std]


def save_split(split: Split, file) -> None:
    """Write one split (uint8 images, int64 labels) as a torch file."""
    torch.save({"images": split.images, "labels": split.labels}, file)


def split_digest(split: Split) -> str:
    """sha256 of a split's images and labels: the same digest, the very same images."""
    return content_digest(split.images.numpy(), split.labels.numpy())


def load_split(name: str) -> Split:
    """Read one prepared split; a missing or broken file is a one-line error."""
    file = paths.split_file(name)
    blob = load_torch(file, "a prepared split", made_by="prepare")
    try:
        return Split(blob["images"], blob["labels"])
    except (KeyError, TypeError):
        raise StageError(f"{file}: not a prepared split (no images and labels)") from None


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
