"""Peak memory and time of the prepare stage on an MNIST-sized IDX source.

Writes a synthetic MNIST-like set (60,000 training and 10,000 test images of 28x28, gzipped
IDX in torchvision's layout) into a temp folder, then runs `python -m stages prepare` on it
in a subprocess inside a tmp copy of the repository (benchmarks/workspace.py's copy_tree). The
stage's progress bar shows on this terminal; at the end the peak resident memory of the
child (resource.getrusage(RUSAGE_CHILDREN).ru_maxrss) and the wall time are logged, next
to the peak of a child that only imports torch: the floor every stage starts from (about
700 MB for a CUDA build of torch, plus ~180 MB its libraries touch while the process
exits, which ru_maxrss counts too), so the share of the data shows.

    python benchmarks/prepare_memory.py [--train 60000] [--test 10000]
                                        [--image-size 28] [--channels 1]

The project holds the stage to well under 1 GB for 60,000 images at 28x28x1.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from workspace import copy_tree

ROOT = Path(__file__).resolve().parent.parent

LIMIT_MB = 1024
# Images generated and written per step, so the generator itself stays small too.
BATCH = 5000

log = logging.getLogger("prepare_memory")


def digit_like(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """Dark images with a bright class-dependent bar and strokes: compresses like MNIST."""
    images = np.zeros((len(labels), size, size), dtype=np.uint8)
    rows = 4 + labels * (size - 8) // 10
    images[np.arange(len(labels)), rows, 4:-4] = 255
    strokes = rng.random((len(labels), size, size)) < 0.08
    images[strokes] = rng.integers(128, 256, size=int(strokes.sum()), dtype=np.uint8)
    return images


def write_idx(path: Path, count: int, size: int, seed: int) -> None:
    """A gzipped IDX image file and its label file, `count` images streamed in batches."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=count, dtype=np.uint8)
    images_name = path.name.replace("labels-idx1", "images-idx3")
    with gzip.open(path.with_name(images_name), "wb", compresslevel=6) as out:
        out.write((0x00000803).to_bytes(4, "big"))
        out.write(b"".join(d.to_bytes(4, "big") for d in (count, size, size)))
        for start in range(0, count, BATCH):
            out.write(digit_like(rng, labels[start : start + BATCH], size).tobytes())
    with gzip.open(path, "wb") as out:
        out.write((0x00000801).to_bytes(4, "big") + count.to_bytes(4, "big") + labels.tobytes())


def torch_floor(repo: Path) -> float:
    """Peak RSS in MB of a child that imports torch and exits, the stage's fixed cost."""
    child = subprocess.Popen([sys.executable, "-c", "import torch"], cwd=repo)
    _, _, usage = os.wait4(child.pid, 0)
    return usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    """Generate the set, run the stage, log its peak memory and wall time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=60_000)
    parser.add_argument("--test", type=int, default=10_000, help="0: no t10k files")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with tempfile.TemporaryDirectory(prefix="prepare-memory-") as tmp:
        raw = Path(tmp, "data", "MNIST", "raw")
        raw.mkdir(parents=True)
        started = time.perf_counter()
        write_idx(raw / "train-labels-idx1-ubyte.gz", args.train, 28, seed=0)
        if args.test:
            write_idx(raw / "t10k-labels-idx1-ubyte.gz", args.test, 28, seed=1)
        log.info(
            "wrote %d + %d synthetic images in %.1f s",
            args.train,
            args.test,
            time.perf_counter() - started,
        )
        repo = copy_tree(Path(tmp, "repo"))
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["data"] |= {"source": "mnist", "root": str(raw.parent.parent)}
        params["data"] |= {"image_size": args.image_size, "channels": args.channels}
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        started = time.perf_counter()
        # stderr is inherited: the stage's log and progress bar show here.
        done = subprocess.run([sys.executable, "-m", "stages", "prepare"], cwd=repo, check=False)
        wall = time.perf_counter() - started
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
        if done.returncode:
            sys.exit(f"prepare failed with exit code {done.returncode}")
        floor_mb = torch_floor(repo)
    # The only earlier children are git's (copy_tree), far smaller than the stage.
    log.info("git children peaked at %.0f MB before the stage", before / 1024)
    log.info(
        "prepare: %d images of %dx%dx%d, peak RSS %.0f MB (limit %d MB), wall %.1f s",
        args.train + args.test,
        args.channels,
        args.image_size,
        args.image_size,
        peak_mb,
        LIMIT_MB,
        wall,
    )
    log.info(
        "a child that only imports torch peaks at %.0f MB; the stage peaks %.0f MB above it",
        floor_mb,
        peak_mb - floor_mb,
    )
    if peak_mb >= LIMIT_MB:
        sys.exit(f"peak RSS {peak_mb:.0f} MB is over the {LIMIT_MB} MB budget")


if __name__ == "__main__":
    main()
