"""Test accuracy of the whole pipeline on real MNIST, through DVC, over several seeds.

Run from the repository root (it needs the MNIST t10k IDX files, which it looks for in
../shared/data/mnist-t10k and data/raw/MNIST/raw, or give --mnist):

    python benchmarks/mnist_accuracy.py [--seeds 42,1,2,3] [--epochs 3] [-S train.amp=bf16]

It clones the committed repository into a temporary folder, hands it the 10,000 t10k
images as the training files (so prepare splits them 8,000 / 2,000, of which 800 are
held out for validation), sets `train.epochs` and the seed (which also reshuffles the
split), and runs `dvc exp run evaluate convert` once per seed. It prints the test accuracy
of PyTorch, the FP16 IR and the INT8 IR for each seed, their mean, and whether the mean
meets the 98 % target in 3 epochs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = (ROOT.parent / "shared/data/mnist-t10k", ROOT / "data/raw/MNIST/raw")
# The t10k files, handed to prepare as the training files (it then makes its own test split).
FILES = {
    "t10k-images-idx3-ubyte.gz": "train-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz": "train-labels-idx1-ubyte.gz",
}
TARGET = 0.98


def find_mnist(given: str | None) -> Path:
    """The folder holding the t10k files."""
    for folder in [Path(given)] if given else FOLDERS:
        if all((folder / name).is_file() for name in FILES):
            return folder
    sys.exit(f"error: no {', '.join(FILES)} in {given or ' or '.join(map(str, FOLDERS))}")


def run(repo: Path, sets: list[str]) -> dict[str, float]:
    """`dvc exp run evaluate convert -S ...` in the clone; the test accuracy of each model."""
    started = time.monotonic()
    command = [str(Path(sys.executable).parent / "dvc"), "exp", "run", "evaluate", "convert"]
    done = subprocess.run(
        command + [f"-S{assignment}" for assignment in sets],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"error: dvc exp run failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    convert = json.loads((repo / "metrics/convert.json").read_text())
    return {
        "pytorch": json.loads((repo / "metrics/evaluate.json").read_text())["accuracy"],
        "fp16": convert["accuracy_fp16"],
        "int8": convert["accuracy_int8"],
        "seconds": time.monotonic() - started,
    }


def main() -> None:
    """Clone, run each seed, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="42,1,2,3", help="comma-separated seeds")
    parser.add_argument("--epochs", type=int, default=3, help="train.epochs")
    parser.add_argument(
        "-S", dest="sets", action="append", default=[], help="section.key=value, as dvc exp run"
    )
    parser.add_argument("--mnist", help="folder with the t10k IDX .gz files")
    args = parser.parse_args()
    mnist = find_mnist(args.mnist)
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(repo)], check=True)
        raw = repo / "data/raw/MNIST/raw"
        raw.mkdir(parents=True)
        for name, as_name in FILES.items():
            shutil.copyfile(mnist / name, raw / as_name)
        common = ["data.source=mnist", f"train.epochs={args.epochs}", *args.sets]
        results = {}
        for seed in seeds:
            results[seed] = run(repo, [*common, f"seed={seed}"])
            scores = results[seed]
            print(
                f"seed {seed:>4}: pytorch {scores['pytorch']:.4f}  fp16 {scores['fp16']:.4f}  "
                f"int8 {scores['int8']:.4f}  ({scores['seconds']:.0f} s)",
                flush=True,
            )
    mean = statistics.mean(r["pytorch"] for r in results.values())
    worst = min(r["pytorch"] for r in results.values())
    verdict = "met" if mean >= TARGET else "MISSED"
    print(
        f"\nMNIST t10k 8,000/2,000, {args.epochs} epochs, {' '.join(args.sets) or 'default params'}"
        f"\nPyTorch test accuracy: mean {mean:.4f}, worst {worst:.4f} over {len(seeds)} seeds"
        f"; target mean >= {TARGET}: {verdict}"
    )


if __name__ == "__main__":
    main()
