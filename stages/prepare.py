"""Stage prepare: read the source, split it, write uint8 tensors and meta.json."""

from __future__ import annotations

from stages import datasets, logs, paths, sources
from stages.outputs import atomic_dir, write_json
from stages.params import Params, load_params


def main(params: Params) -> None:
    """Read `data.source`, make train/val/test, write them to data/prepared/."""
    log = logs.setup("prepare")
    cfg = params.data
    source = sources.read(cfg)
    splits = datasets.make_splits(source, cfg, params.seed)
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


if __name__ == "__main__":
    main(load_params())
