"""The pipeline's files: atomic writes (a killed stage leaves the previous file or none,
never half of one) and a guarded torch.load."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.core import paths
from stages.core.errors import StageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual modes.
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_file(target: Path | str) -> Iterator[Path]:
    """A temporary path beside `target`, moved over it only when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """A temporary folder beside `target` that replaces it whole when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(file: Path | str, data: dict[str, Any]) -> None:
    """JSON in the order given (DVC shows metrics in file order) and a final newline, atomically."""
    with atomic_file(file) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_text(file: Path | str, text: str) -> None:
    """A text file, atomically."""
    with atomic_file(file) as tmp:
        tmp.write_text(text)


def write_csv(file: Path | str, rows: list[dict[str, Any]]) -> None:
    """Rows of dicts (same keys) as CSV with a header, atomically."""
    with atomic_file(file) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def save_torch(obj: Any, file: Path | str) -> None:
    """torch.save, atomically."""
    import torch

    with atomic_file(file) as tmp:
        torch.save(obj, tmp)


def load_torch(file: Path | str, what: str, made_by: str = "train") -> Any:
    """torch.load of tensors and plain values only (no code runs); errors are one line."""
    import torch

    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StageError(f"{file}: not found (run the {made_by} stage first)") from None
    except Exception as exc:  # a truncated, foreign or code-carrying file
        raise StageError(f"{file}: not {what} ({exc.__class__.__name__})") from None


def save_figure(fig, file: Path | str) -> None:
    """A matplotlib figure as PNG, atomically, then closed."""
    import matplotlib.pyplot as plt

    with atomic_file(file) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def prefixed(stage: str, metrics: dict[str, Any], sep: str = "/") -> dict[str, float]:
    """Flatten nested metrics under the stage name: evaluate/accuracy, benchmark/onnxruntime/..."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{stage}{sep}{key}"
        if isinstance(value, dict):
            out.update(prefixed(name, value, sep))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def read_json(file: Path) -> dict[str, Any]:
    """A metrics file as a dict; empty when the stage has not written it."""
    try:
        return json.loads(Path(file).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def read_history() -> list[dict[str, float]]:
    """Per-epoch rows of plots/train/history.csv as numbers."""
    if not paths.TRAIN_HISTORY.exists():
        return []
    with paths.TRAIN_HISTORY.open() as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def read_csv(file) -> list[dict[str, str]]:
    """Rows of a CSV output; none when the stage did not write it."""
    try:
        with open(file, newline="") as fh:
            return list(csv.DictReader(fh))
    except FileNotFoundError:
        return []
