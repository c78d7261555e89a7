"""Readers for `data.source`: each returns a datasets.Source of uint8 tensors.

Every reader checks its inputs completely and raises StageError (one line naming the file
or key) before the prepare stage writes anything. Large inputs stream into preallocated
uint8 tensors, chunk by chunk, with a progress bar on stderr.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import math
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from stages.core.errors import StageError
from stages.core.params import Data
from stages.data.datasets import Source, Split, content_digest, resize

log = logging.getLogger(__name__)


def _progress(total: int, desc: str) -> tqdm:
    """A progress bar on stderr (log records go around it through logging_redirect_tqdm)."""
    return tqdm(
        total=total, desc=desc, unit="img", file=sys.stderr, mininterval=0.5, dynamic_ncols=True
    )


# --------------------------------------------------------------------------- digits


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


# --------------------------------------------------------------------------- IDX files

# IDX magic numbers: two zero bytes, data type 0x08 (unsigned byte), number of dimensions.
IDX_IMAGES = 0x00000803
IDX_LABELS = 0x00000801
# Bytes decompressed per read: large enough to be fast, small enough to show progress.
READ_CHUNK = 1 << 20
# Deflate cannot compress better than about 1032:1, so a gzip file this much smaller than
# its header's claim is cut short: say so before allocating memory for the claim.
DEFLATE_MAX_RATIO = 1032


@dataclass(frozen=True)
class IdxDataset:
    """An IDX source as torchvision defines it: folder <root>/<name>/raw, class names."""

    name: str
    classes: tuple[str, ...]


# torchvision.datasets' MNIST, FashionMNIST and KMNIST, copied rather than imported: the
# import costs the stage ~160 MB of memory and seconds, and torchvision is only needed to
# download. tests/test_sources.py checks every value here against torchvision itself.
IDX_DATASETS = {
    "mnist": IdxDataset(
        "MNIST",
        (
            "0 - zero",
            "1 - one",
            "2 - two",
            "3 - three",
            "4 - four",
            "5 - five",
            "6 - six",
            "7 - seven",
            "8 - eight",
            "9 - nine",
        ),
    ),
    "fashion_mnist": IdxDataset(
        "FashionMNIST",
        (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
    "kmnist": IdxDataset("KMNIST", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
}
# torchvision's file names (its `resources` without .gz), the same for all three.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(raw: Path, name: str) -> Path | None:
    """The plain file when present (torchvision extracts next to the .gz), else the .gz."""
    for candidate in (raw / name, raw / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn the ways a file can fail to read into one line naming it."""
    try:
        yield
    except gzip.BadGzipFile as exc:
        if str(exc).startswith("Not a gzipped file"):
            raise StageError(
                f"{path}: not a gzip file (rename it without .gz if plain IDX)"
            ) from None
        raise StageError(f"{path}: corrupt gzip file ({exc})") from None
    except EOFError:
        raise StageError(f"{path}: truncated gzip file (the compressed data ends early)") from None
    except zlib.error as exc:
        raise StageError(f"{path}: corrupt gzip file ({exc})") from None
    except OSError as exc:
        raise StageError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _read_exact(fh: BinaryIO, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = fh.read(n - len(data))
        if not more:
            break
        data += more
    return data


@dataclass
class IdxFile:
    """One open IDX file whose header was read and checked; `read_into` streams its body."""

    path: Path
    fh: BinaryIO
    dims: tuple[int, ...]
    hasher: Any

    @property
    def count(self) -> int:
        return self.dims[0]

    @property
    def body_size(self) -> int:
        return math.prod(self.dims)

    def describe(self) -> str:
        shape = "x".join(str(d) for d in self.dims[1:])
        what = f"{self.count:,} images of {shape}" if shape else f"{self.count:,} labels"
        return f"{what} ({self.body_size:,} bytes after the header)"

    def read_into(self, out: np.ndarray, bar: tqdm | None = None) -> None:
        """Fill `out` (uint8, body_size values) from the file, then check nothing follows."""
        view = memoryview(out.reshape(-1)).cast("B")
        per_item = max(self.body_size // max(self.count, 1), 1)
        done = 0
        with _reading(self.path):
            while done < len(view):
                got = self.fh.readinto(view[done : done + READ_CHUNK])
                if not got:
                    raise StageError(
                        f"{self.path}: wrong length: the header says {self.describe()}, "
                        f"the data ends after {done:,} bytes"
                    )
                self.hasher.update(view[done : done + got])
                if bar is not None:
                    bar.update((done + got) // per_item - done // per_item)
                done += got
            # Reading past the end also makes gzip check its CRC and length trailer.
            if self.fh.read(1):
                raise StageError(
                    f"{self.path}: wrong length: the file is longer than its header says "
                    f"({self.describe()})"
                )


@contextmanager
def open_idx(path: Path, magic: int, hasher: Any) -> Iterator[IdxFile]:
    """Open an IDX file (.gz or plain) and check its magic number and dimensions."""
    ndim = magic & 0xFF
    expected = "images" if magic == IDX_IMAGES else "labels"
    with _reading(path):
        raw = path.open("rb")
    fh: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw
    try:
        with _reading(path):
            header = _read_exact(fh, 4 + 4 * ndim)
        if len(header) < 4:
            raise StageError(f"{path}: too short for an IDX file ({len(header)} bytes)")
        found = int.from_bytes(header[:4], "big")
        if found != magic:
            hint = {IDX_IMAGES: " (an image file?)", IDX_LABELS: " (a label file?)"}.get(found, "")
            raise StageError(
                f"{path}: wrong magic number 0x{found:08x}{hint}, expected 0x{magic:08x} "
                f"for IDX {expected}"
            )
        if len(header) < 4 + 4 * ndim:
            raise StageError(f"{path}: wrong length: the file ends inside its IDX header")
        dims = tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        if min(dims) == 0:
            raise StageError(f"{path}: the IDX header has an empty dimension {dims}")
        idx = IdxFile(path, fh, dims, hasher)
        size = path.stat().st_size
        if path.suffix != ".gz" and size != len(header) + idx.body_size:
            raise StageError(
                f"{path}: wrong length: the header says {idx.describe()}, "
                f"the file holds {size - len(header):,}"
            )
        if path.suffix == ".gz" and idx.body_size > size * DEFLATE_MAX_RATIO:
            raise StageError(
                f"{path}: wrong length: the header says {idx.describe()}, far more than "
                f"{size:,} compressed bytes can hold"
            )
        hasher.update(header)
        yield idx
    finally:
        fh.close()
        raw.close()


def read_idx_split(images: Path, labels: Path, n_classes: int, hasher, desc: str) -> Split:
    """One split from an IDX image file and its label file, streamed and checked."""
    with (
        open_idx(images, IDX_IMAGES, hasher) as x_file,
        open_idx(labels, IDX_LABELS, hasher) as y_file,
    ):
        if x_file.count != y_file.count:
            raise StageError(
                f"{images}: {x_file.count:,} images but {labels} holds {y_file.count:,} labels"
            )
        x = torch.zeros((x_file.count, 1, *x_file.dims[1:]), dtype=torch.uint8)
        y = torch.zeros(y_file.count, dtype=torch.uint8)
        with _progress(x_file.count, desc) as bar:
            x_file.read_into(x.numpy(), bar)
        y_file.read_into(y.numpy())  # one byte per image: no bar needed
    top = int(y.max())
    if top >= n_classes:
        where = int((y >= n_classes).nonzero()[0])
        raise StageError(f"{labels}: label {top} (at index {where}) is outside 0..{n_classes - 1}")
    return Split(x, y.long())


def _download(spec: IdxDataset, cfg: Data, raw: Path) -> None:
    """Let torchvision fetch and extract the files (network; only with data.download)."""
    import torchvision.datasets

    log.info("downloading %s into %s", spec.name, raw)
    try:
        getattr(torchvision.datasets, spec.name)(root=cfg.root, train=True, download=True)
    except (RuntimeError, OSError) as exc:
        # torchvision reports every mirror it tried on its own line: keep one line.
        reason = " ".join(str(exc).split())[:500] or type(exc).__name__
        raise StageError(
            f"data.download: fetching {spec.name} into {raw} failed: {reason}"
        ) from None


def read_idx(cfg: Data) -> Source:
    """mnist / fashion_mnist / kmnist from IDX files in torchvision's folder layout."""
    spec = IDX_DATASETS[cfg.source]
    raw = Path(cfg.root) / spec.name / "raw"
    if cfg.download and not all(_find_idx(raw, n) for n in IDX_FILES["train"]):
        _download(spec, cfg, raw)
    found = {key: [_find_idx(raw, n) for n in pair] for key, pair in IDX_FILES.items()}
    for name, path in zip(IDX_FILES["train"], found["train"], strict=True):
        if path is None:
            raise StageError(
                f"{raw / name}.gz: not found: put the {spec.name} training "
                f"{'labels' if 'labels' in name else 'images'} there (or unpacked as "
                f"{raw / name}), or set data.download: true"
            )
    test_present = [p is not None for p in found["test"]]
    if any(test_present) and not all(test_present):
        missing = IDX_FILES["test"][test_present.index(False)]
        raise StageError(
            f"{raw / missing}.gz: not found, but its partner test file is there: add it "
            f"(or unpacked as {raw / missing}), or remove both t10k files to split the test "
            f"set off the training files"
        )
    # The digest covers the decompressed IDX bytes: gzipping the files changes nothing.
    hasher = hashlib.sha256()
    splits = {}
    for key, paths in found.items():
        if None in paths:
            continue
        hasher.update(key.encode())
        splits[key] = read_idx_split(*paths, len(spec.classes), hasher, f"{spec.name} {key}")
    files = [str(p) for paths in found.values() for p in paths if p is not None]
    details = {
        "files": files,
        "test_split": "source" if "test" in splits else f"stratified {cfg.test_fraction}",
    }
    return Source(splits, list(spec.classes), hasher.hexdigest(), details)


# --------------------------------------------------------------------------- folders

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
PDF_SUFFIXES = (".pdf",)
# Files operating systems leave in folders without a leading dot; never the user's data.
OS_FILES = {"thumbs.db", "desktop.ini"}
# Background for transparent pixels: transparency in scans and drawings means paper.
PAPER = (255, 255, 255)


def visible(name: str) -> bool:
    """False for hidden files and folders and the OS's own (Thumbs.db, desktop.ini)."""
    return not name.startswith(".") and name.lower() not in OS_FILES


def _class_folders(root: Path, kind: str) -> list[Path]:
    """The sorted, non-hidden sub-folders of root; at least two, or a one-line error."""
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "not found"
        raise StageError(
            f"{root}: {problem} (data.root: a folder with one sub-folder of {kind} per class)"
        )
    folders = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not visible(entry.name):
            continue
        if entry.is_dir():
            folders.append(entry)
        else:
            log.warning("%s: ignored (not inside a class folder)", entry)
    if len(folders) < 2:
        names = ", ".join(f.name for f in folders) or "none"
        raise StageError(
            f"{root}: {len(folders)} class folder(s) ({names}): a classifier needs at least "
            f"two, one sub-folder of {kind} per class"
        )
    return folders


def _class_files(folder: Path) -> list[Path]:
    """Every visible file under a class folder (nested folders too), sorted by path."""
    files = []
    for top, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if visible(d)]
        files += [Path(top, n) for n in names if visible(n)]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


@dataclass
class Listing:
    """The files of a folder source: one label per file, and the class names."""

    root: Path
    files: list[Path]
    labels: list[int]
    classes: list[str]


def _list_folder(root: Path, kind: str) -> Listing:
    files, labels = [], []
    classes = []
    for label, folder in enumerate(_class_folders(root, kind)):
        found = _class_files(folder)
        if not found:
            raise StageError(f"{folder}: class '{folder.name}' holds no {kind}")
        classes.append(folder.name)
        files += found
        labels += [label] * len(found)
    return Listing(root, files, labels, classes)


class BadFile(Exception):
    """A file a folder source cannot use; skipped or reported by `_bad`."""


def _bad(cfg: Data, path: Path, reason: str) -> None:
    """Skip with a warning (data.skip_bad_files) or stop with a one-line error."""
    if cfg.skip_bad_files:
        log.warning("%s: skipped: %s", path, reason)
        return
    raise StageError(f"{path}: {reason} (set data.skip_bad_files: true to skip such files)")


def _hash_file(hasher, listing: Listing, path: Path, data: bytes) -> None:
    # Relative path and length first, so renaming or moving a file changes the digest too.
    name = path.relative_to(listing.root).as_posix().encode()
    hasher.update(len(name).to_bytes(8, "big") + name + len(data).to_bytes(8, "big"))
    hasher.update(data)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadFile(f"cannot be read ({exc.strerror or exc})") from None


def _to_tensor(image, cfg: Data) -> torch.Tensor:
    """A PIL image as uint8 C x size x size in the configured channels."""
    from PIL import Image

    if image.mode.startswith("I;16"):
        # 16-bit scans: keep the top 8 bits instead of PIL's clipping at 255 (all white).
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, PAPER)
        image.paste(rgba, mask=rgba.getchannel("A"))
    image = image.convert("L" if cfg.channels == 1 else "RGB")
    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).reshape(image.height, image.width, cfg.channels)
    tensor = tensor.permute(2, 0, 1).unsqueeze(0)
    return resize(tensor, cfg.image_size, cfg.channels)[0]


def decode_image(data: bytes, cfg: Data) -> torch.Tensor:
    """Image file bytes as uint8 C x H x W in cfg's channels and size (training and predict)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            # Camera and phone pictures store their rotation in EXIF: apply it.
            upright = ImageOps.exif_transpose(image)
            upright.load()
            return _to_tensor(upright, cfg)
    except Exception as exc:  # decoders raise many kinds on a broken or foreign file
        # PIL names the in-memory buffer (<_io.BytesIO object at 0x...>): noise to a user.
        reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
        raise BadFile(f"not a readable image ({type(exc).__name__}: {reason})") from None


def _fill(
    listing: Listing, cfg: Data, count: int, items: Iterator[tuple[int, torch.Tensor | None]]
) -> Split:
    """Preallocated uint8 images filled from (label, image or None when skipped)."""
    images = torch.zeros((count, cfg.channels, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    labels = torch.zeros(count, dtype=torch.int64)
    kept = torch.zeros(count, dtype=torch.bool)
    for i, (label, image) in enumerate(items):
        if image is not None:
            images[i] = image
            labels[i] = label
            kept[i] = True
    for label, name in enumerate(listing.classes):
        if not bool((labels[kept] == label).any()):
            raise StageError(f"{listing.root / name}: class '{name}' has no readable file left")
    if bool(kept.all()):
        return Split(images, labels)
    # A copy, not a view: torch.save writes a view's whole storage.
    return Split(images[kept].clone(), labels[kept].clone())


def read_image_folder(cfg: Data) -> Source:
    """root/<class>/<image>: PNG, JPEG, BMP or TIFF of any size, one class per folder."""
    listing = _list_folder(Path(cfg.root), "images")
    hasher = hashlib.sha256()
    skipped: list[str] = []

    def images() -> Iterator[tuple[int, torch.Tensor | None]]:
        with _progress(len(listing.files), "images") as bar:
            for path, label in zip(listing.files, listing.labels, strict=True):
                try:
                    if path.suffix.lower() not in IMAGE_SUFFIXES:
                        raise BadFile(f"not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
                    data = _read_bytes(path)
                    image = decode_image(data, cfg)
                    _hash_file(hasher, listing, path, data)
                except BadFile as exc:
                    _bad(cfg, path, str(exc))
                    skipped.append(path.relative_to(listing.root).as_posix())
                    image = None
                bar.update()
                yield label, image

    split = _fill(listing, cfg, len(listing.files), images())
    details = {"files": len(split), "skipped": skipped}
    return Source({"train": split}, listing.classes, hasher.hexdigest(), details)


def _looks_empty(data: bytes) -> bool:
    return re.search(rb"/Count\s+0\b", data) is not None and not re.search(
        rb"/Type\s*/Page\b", data
    )


def _open_pdf(data: bytes):
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        # PDFium refuses a document without pages, and without setting an error code of its
        # own (it reports 0, or whatever the previous failure left): look for an empty
        # page tree in the file itself.
        if getattr(exc, "err_code", None) == 0 or _looks_empty(data):
            raise BadFile("empty PDF (no pages)") from None
        raise BadFile(f"not a readable PDF ({exc})") from None
    if len(pdf) == 0:
        pdf.close()
        raise BadFile("empty PDF (no pages)")
    return pdf


def _render_pages(data: bytes, cfg: Data) -> Iterator[torch.Tensor]:
    import pypdfium2 as pdfium

    pdf = _open_pdf(data)
    try:
        for number in range(len(pdf)):
            page = pdf[number]
            try:
                # PDF units are 1/72 inch.
                bitmap = page.render(scale=cfg.pdf_dpi / 72, grayscale=cfg.channels == 1)
                yield _to_tensor(bitmap.to_pil(), cfg)
            except pdfium.PdfiumError as exc:
                raise BadFile(f"page {number + 1} cannot be rendered ({exc})") from None
            finally:
                page.close()
    finally:
        pdf.close()


def read_pdf_folder(cfg: Data) -> Source:
    """root/<class>/<file>.pdf: every page rendered at data.pdf_dpi is one image."""
    listing = _list_folder(Path(cfg.root), "PDF files")
    hasher = hashlib.sha256()
    skipped: list[str] = []
    # First pass: open every file (a bad one stops here, before any rendering) and count
    # its pages, so the images can be preallocated.
    pages: list[int] = []
    for path in listing.files:
        try:
            if path.suffix.lower() not in PDF_SUFFIXES:
                raise BadFile("not a PDF file (expected .pdf)")
            pdf = _open_pdf(_read_bytes(path))
            pages.append(len(pdf))
            pdf.close()
        except BadFile as exc:
            _bad(cfg, path, str(exc))
            skipped.append(path.relative_to(listing.root).as_posix())
            pages.append(0)

    def images() -> Iterator[tuple[int, torch.Tensor | None]]:
        with _progress(sum(pages), "PDF pages") as bar:
            for path, label, count in zip(listing.files, listing.labels, pages, strict=True):
                if not count:
                    continue
                # A file's pages are used all or none, so `skipped` and the digest agree.
                rendered: list[torch.Tensor | None] = []
                try:
                    data = _read_bytes(path)
                    for image in _render_pages(data, cfg):
                        rendered.append(image)
                        bar.update()
                    _hash_file(hasher, listing, path, data)
                except BadFile as exc:
                    _bad(cfg, path, str(exc))
                    skipped.append(path.relative_to(listing.root).as_posix())
                    bar.update(count - len(rendered))
                    rendered = [None] * count
                for image in rendered:
                    yield label, image

    split = _fill(listing, cfg, sum(pages), images())
    details = {
        "files": len(listing.files) - len(skipped),
        "pages": len(split),
        "skipped": sorted(skipped),
    }
    return Source({"train": split}, listing.classes, hasher.hexdigest(), details)


SOURCES: dict[str, Callable[[Data], Source]] = {
    "digits": read_digits,
    "mnist": read_idx,
    "fashion_mnist": read_idx,
    "kmnist": read_idx,
    "image_folder": read_image_folder,
    "pdf_folder": read_pdf_folder,
}


def read(cfg: Data) -> Source:
    """Read the configured source into memory as uint8 tensors."""
    try:
        reader = SOURCES[cfg.source]
    except KeyError:
        raise StageError(f"data.source: '{cfg.source}' is not available yet") from None
    # Log records (warnings about skipped files) print above the bar instead of through it.
    with logging_redirect_tqdm():
        return reader(cfg)
