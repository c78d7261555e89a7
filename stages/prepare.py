"""Stage prepare: read the source, split it, write uint8 tensors and meta.json."""

from __future__ import annotations

import logging
import math

import numpy as np
from sklearn.model_selection import train_test_split

from stages.core import logs, paths
from stages.core.errors import StageError
from stages.core.outputs import atomic_dir, write_json
from stages.core.params import Data, Params
from stages.data import datasets, sources
from stages.data.datasets import Source, Split

log = logging.getLogger(__name__)


def stratified_split(
    split: Split, fraction: float, seed: int, key: str = "fraction"
) -> tuple[Split, Split]:
    """Split off `fraction` of the images, the same share of every class, seeded."""
    labels = split.labels.numpy()
    if fraction <= 0:
        return split, split.subset(np.array([], dtype=np.int64))
    if len(labels) < 2:
        raise StageError(f"{key}: {len(labels)} image(s) are too few to hold out {fraction}")
    held = math.ceil(fraction * len(labels))
    counts = np.unique(labels, return_counts=True)[1]
    # A stratified split needs every class on both sides, which a tiny image folder
    # cannot give: split those at random instead.
    stratify = labels
    if counts.min() < 2 or min(held, len(labels) - held) < len(counts):
        log.warning("%s: too few images per class to stratify, splitting at random", key)
        stratify = None
    keep, out = train_test_split(
        np.arange(len(labels)), test_size=held, random_state=seed, stratify=stratify
    )
    return split.subset(np.sort(keep)), split.subset(np.sort(out))


def make_splits(source: Source, cfg: Data, seed: int) -> dict[str, Split]:
    """train/val/test: the source's own test split when it has one, else stratified."""
    train = source.splits["train"]
    test = source.splits.get("test")
    if test is None:
        train, test = stratified_split(train, cfg.test_fraction, seed, "data.test_fraction")
    train, val = stratified_split(train, cfg.val_fraction, seed, "data.val_fraction")
    return {"train": train, "val": val, "test": test}


def main(params: Params) -> None:
    """Read `data.source`, make train/val/test, write them to data/prepared/."""
    logs.setup("prepare")
    cfg = params.data
    source = sources.read(cfg)
    splits = make_splits(source, cfg, params.seed)
    # The splits hold their own copies: drop the unsplit ones (47 MB for MNIST's train).
    source.splits.clear()
    # One split at a time, so only one split exists in both sizes at once.
    for name, split in splits.items():
        images = datasets.resize(split.images, cfg.image_size, cfg.channels)
        splits[name] = datasets.Split(images, split.labels)
    mean, std = datasets.channel_stats(splits["train"].images)
    meta = {
        "source": cfg.source,
        "classes": source.classes,
        "channels": cfg.channels,
        "image_size": cfg.image_size,
        "mean": mean,
        "std": std,
        "counts": {name: len(split) for name, split in splits.items()},
        "digest": source.digest,
        "params": cfg.model_dump(),
        **source.details,
    }
    # Written whole into a temporary folder and swapped in: a kill mid-write leaves the
    # previous prepared data, never a mix a later stage would read.
    with atomic_dir(paths.PREPARED) as tmp:
        for name, split in splits.items():
            datasets.save_split(split, tmp / paths.split_file(name).name)
        write_json(tmp / paths.META.name, meta)
    log.info(
        "%s: %s train / %s val / %s test images of %d classes, %dx%dx%d",
        cfg.source,
        *(meta["counts"][s] for s in paths.SPLITS),
        len(source.classes),
        cfg.channels,
        cfg.image_size,
        cfg.image_size,
    )
