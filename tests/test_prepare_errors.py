"""The prepare stage on real and broken inputs.

Every bad input must end the stage with one `error: ...` line naming the file or key and
the previous data/prepared left byte for byte as it was. The stage runs in this process
through the runner, and its error is printed by the excepthook the process installs (the
exit code through a real process is tested in test_params).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from test_sources import (
    TEST,
    TRAIN,
    empty_pdf_bytes,
    idx_arrays,
    idx_bytes,
    make_image_folder,
    make_pdf_folder,
    write_file,
    write_idx_set,
)

from helpers.processes import inside
from helpers.repos import write_params
from stages import __main__ as runner
from stages.core.entry import report_exception

RAW = Path("data/raw")
MNIST_RAW = RAW / "MNIST" / "raw"
PREPARED = Path("data/prepared")
SHARED_T10K = Path(__file__).resolve().parents[2] / "shared/data/mnist-t10k"


@dataclass
class Outcome:
    """What a run of the stage left: 0 or 1, and what it wrote to stderr."""

    returncode: int
    stderr: str


def prepare(repo: Path) -> Outcome:
    """`python -m stages prepare` in this process: the runner, then on an error what the
    process's excepthook prints before it exits 1 (one line, or a traceback for a bug)."""
    err = io.StringIO()
    with inside(repo), contextlib.redirect_stderr(err):
        try:
            runner.main(["prepare"])
        except Exception:
            report_exception(*sys.exc_info())
            return Outcome(1, err.getvalue())
    return Outcome(0, err.getvalue())


def snapshot(repo: Path) -> dict[str, bytes]:
    """Every file under data/prepared with its bytes."""
    root = repo / PREPARED
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def plant_previous(repo: Path) -> dict[str, bytes]:
    """Stand-in outputs of an earlier run, which a failed run must leave alone."""
    root = repo / PREPARED
    root.mkdir(parents=True, exist_ok=True)
    for name in ("train.pt", "val.pt", "test.pt"):
        (root / name).write_bytes(f"previous {name}".encode())
    (root / "meta.json").write_text('{"previous": true}\n')
    return snapshot(repo)


def assert_one_line_error(repo: Path, done: Outcome, before: dict[str, bytes], *names: str) -> str:
    """The failure contract; returns the error line."""
    assert done.returncode != 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), done.stderr[-2000:]
    for name in names:
        assert name in last, last
    assert snapshot(repo) == before
    assert not any(p.name.startswith(".prepared") for p in (repo / "data").iterdir())
    return last


def use(repo: Path, source: str, root: Path = RAW, **data) -> None:
    write_params(repo, data={"source": source, "root": str(root), **data})


# --------------------------------------------------------------------------- IDX


def test_idx_run_is_reproducible_and_survives_a_truncated_gz(repo: Path) -> None:
    write_idx_set(repo / RAW, train=300, test=60)
    use(repo, "mnist")
    first = prepare(repo)
    assert first.returncode == 0, first.stderr[-3000:]
    meta = json.loads((repo / PREPARED / "meta.json").read_text())
    assert meta["counts"] == {"train": 270, "val": 30, "test": 60}
    assert meta["classes"][9] == "9 - nine"
    assert len(meta["digest"]) == 64
    assert "MNIST train" in first.stderr and "%|" in first.stderr  # the progress bar
    before = snapshot(repo)

    again = prepare(repo)
    assert again.returncode == 0, again.stderr[-3000:]
    assert snapshot(repo) == before  # same params and inputs: the same bytes

    images = repo / MNIST_RAW / f"{TRAIN[0]}.gz"
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    last = assert_one_line_error(repo, prepare(repo), before, str(MNIST_RAW / f"{TRAIN[0]}.gz"))
    assert "truncated" in last


def _missing(raw: Path) -> Path:
    (raw / f"{TRAIN[1]}.gz").unlink()
    return raw / f"{TRAIN[1]}.gz"


def _corrupt(raw: Path) -> Path:
    # Random pixels are stored uncompressed (zeroed bytes fail the CRC); labels 0..9 are
    # deflated (zeroed bytes break the stream): both are corrupt gzip files.
    path = raw / f"{TRAIN[0]}.gz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    return path


def _corrupt_deflate(raw: Path) -> Path:
    path = raw / f"{TRAIN[1]}.gz"
    data = bytearray(path.read_bytes())
    data[12:20] = b"\xff" * 8
    path.write_bytes(bytes(data))
    return path


def _not_gzip(raw: Path) -> Path:
    path = raw / f"{TRAIN[0]}.gz"
    path.write_bytes(gzip.decompress(path.read_bytes()))
    return path


def _wrong_magic(raw: Path) -> Path:
    images, _ = idx_arrays(100, seed=100)
    return write_file(raw / f"{TRAIN[0]}.gz", idx_bytes(images, magic=0x00000802))


def _swapped(raw: Path) -> Path:
    # A labels file where the images belong: its magic number tells them apart.
    path = raw / f"{TRAIN[0]}.gz"
    shutil.copyfile(raw / f"{TRAIN[1]}.gz", path)
    return path


def _too_long(raw: Path) -> Path:
    images, _ = idx_arrays(100, seed=100)
    (raw / f"{TRAIN[0]}.gz").unlink()
    return write_file(raw / TRAIN[0], idx_bytes(images) + bytes(28))


def _too_short_gz(raw: Path) -> Path:
    images, _ = idx_arrays(100, seed=100)
    return write_file(raw / f"{TRAIN[0]}.gz", idx_bytes(images)[:-100])


def _count_mismatch(raw: Path) -> Path:
    _, labels = idx_arrays(99)
    write_file(raw / f"{TRAIN[1]}.gz", idx_bytes(labels))
    return raw / f"{TRAIN[0]}.gz"


@pytest.mark.parametrize(
    ("breaks", "says"),
    [
        (_missing, "not found: put the MNIST training labels there"),
        (_corrupt, "corrupt gzip file (CRC check failed"),
        (_corrupt_deflate, "corrupt gzip file"),
        (_not_gzip, "not a gzip file"),
        (_wrong_magic, "wrong magic number 0x00000802"),
        (_swapped, "(a label file?)"),
        (_too_long, "wrong length"),
        (_too_short_gz, "wrong length"),
        (_count_mismatch, "100 images but"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_bad_idx_input(repo: Path, breaks: Callable[[Path], Path], says: str) -> None:
    write_idx_set(repo / RAW, train=100, test=None)
    use(repo, "mnist")
    before = plant_previous(repo)
    path = breaks(repo / MNIST_RAW).relative_to(repo)
    last = assert_one_line_error(repo, prepare(repo), before, str(path))
    assert says in last


# --------------------------------------------------------------------------- folders


def _one_class(root: Path) -> tuple[str, Path]:
    shutil.rmtree(root / "b")
    return "image_folder", root


def _empty_class(root: Path) -> tuple[str, Path]:
    (root / "c").mkdir()
    (root / "c" / ".DS_Store").write_bytes(b"hidden: not an image")
    return "image_folder", root / "c"


def _text_file(root: Path) -> tuple[str, Path]:
    (root / "b" / "notes.txt").write_text("not an image")
    return "image_folder", root / "b" / "notes.txt"


def _broken_image(root: Path) -> tuple[str, Path]:
    (root / "a" / "scan.JPG").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    return "image_folder", root / "a" / "scan.JPG"


def _root_missing(root: Path) -> tuple[str, Path]:
    shutil.rmtree(root)
    return "image_folder", root


def _empty_pdf(root: Path) -> tuple[str, Path]:
    make_pdf_folder(root / "pdfs")
    write_file(root / "pdfs" / "letter" / "blank.pdf", empty_pdf_bytes())
    return "pdf_folder", root / "pdfs" / "letter" / "blank.pdf"


def _broken_pdf(root: Path) -> tuple[str, Path]:
    make_pdf_folder(root / "pdfs")
    write_file(root / "pdfs" / "invoice" / "cut.pdf", b"%PDF-1.7\n1 0 obj\n<< /Type")
    return "pdf_folder", root / "pdfs" / "invoice" / "cut.pdf"


@pytest.mark.parametrize(
    ("breaks", "says"),
    [
        (_one_class, "1 class folder(s) (a)"),
        (_empty_class, "class 'c' holds no images"),
        (_text_file, "not an image file"),
        (_broken_image, "not a readable image"),
        (_root_missing, "not found"),
        (_empty_pdf, "empty PDF (no pages)"),
        (_broken_pdf, "not a readable PDF"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_bad_folder_input(repo: Path, breaks: Callable, says: str) -> None:
    root = make_image_folder(repo / RAW / "scans", per_class=3)
    source, path = breaks(root)
    data_root = (root / "pdfs" if source == "pdf_folder" else root).relative_to(repo)
    use(repo, source, data_root)
    before = plant_previous(repo)
    last = assert_one_line_error(repo, prepare(repo), before, str(path.relative_to(repo)))
    assert says in last


def test_bad_files_skipped_with_a_warning(repo: Path) -> None:
    root = make_image_folder(repo / RAW / "scans", per_class=6, classes=("cat", "dog", "eel"))
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "eel" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    use(repo, "image_folder", root.relative_to(repo), skip_bad_files=True, channels=3)
    done = prepare(repo)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("dog/notes.txt", "eel/broken.png"):
        assert f"{name}: skipped" in done.stderr
    meta = json.loads((repo / PREPARED / "meta.json").read_text())
    assert meta["classes"] == ["cat", "dog", "eel"]
    assert meta["skipped"] == ["dog/notes.txt", "eel/broken.png"]
    assert sum(meta["counts"].values()) == 18
    assert meta["channels"] == 3 and len(meta["mean"]) == 3


# --------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"val_fraction": 0.9}, "data.val_fraction: expected less than or equal to 0.5"),
        ({"test_fraction": "a fifth"}, "data.test_fraction: expected a valid number"),
        ({"channels": "rgb"}, "data.channels"),
        ({"colour": True}, "data.colour: unknown key"),
    ],
    ids=["fraction_out_of_range", "fraction_not_a_number", "channels_wrong_type", "unknown_key"],
)
def test_bad_data_params(repo: Path, data: dict, says: str) -> None:
    write_params(repo, data=data)
    before = plant_previous(repo)
    last = assert_one_line_error(repo, prepare(repo), before, "params.yaml")
    assert says in last


# --------------------------------------------------------------------------- real MNIST


def test_real_mnist_t10k_as_training_files(repo: Path) -> None:
    """The 10,000 real t10k images presented as train files: split 8,000 / 2,000."""
    if not all((SHARED_T10K / f"{name}.gz").is_file() for name in TEST):
        pytest.skip(f"{SHARED_T10K}: the MNIST t10k files are not there")
    raw = repo / MNIST_RAW
    raw.mkdir(parents=True)
    for t10k, train in zip(TEST, TRAIN, strict=True):
        (raw / f"{train}.gz").symlink_to(SHARED_T10K / f"{t10k}.gz")
    use(repo, "mnist")
    done = prepare(repo)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((repo / PREPARED / "meta.json").read_text())
    counts = meta["counts"]
    assert counts["train"] + counts["val"] == 8000 and counts["test"] == 2000
    assert counts["val"] == 800
    # Stratified: every digit keeps its share of the test split (980 zeros of 10,000).
    import torch

    test = torch.load(repo / PREPARED / "test.pt", weights_only=True)
    assert np.bincount(test["labels"].numpy())[0] == 196
    assert 0.12 < meta["mean"][0] < 0.14  # MNIST's well-known mean, 0.1307
