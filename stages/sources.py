"""Readers for `data.source`: each returns a datasets.Source of uint8 tensors."""

from __future__ import annotations

import logging

import numpy as np
import torch

from stages.datasets import Source, Split, content_digest
from stages.errors import StageError
from stages.params import Data

log = logging.getLogger(__name__)


def read_digits(cfg: Data) -> Source:
    """scikit-learn's 1,797 real 8x8 handwritten digits (bundled, no download)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16; stretch to the 0..255 of every other source.
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images = torch.from_numpy(pixels).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    classes = [str(c) for c in bunch.target_names]
    digest = content_digest(pixels, bunch.target.astype(np.int64))
    return Source({"train": Split(images, labels)}, classes, digest)


SOURCES = {"digits": read_digits}


def read(cfg: Data) -> Source:
    """Read the configured source into memory as uint8 tensors."""
    try:
        reader = SOURCES[cfg.source]
    except KeyError:
        raise StageError(f"data.source: '{cfg.source}' is not available yet") from None
    return reader(cfg)
