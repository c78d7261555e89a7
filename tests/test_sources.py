"""The source readers in-process: IDX (plain and gz), image folders, PDF folders, splits.

The builders here make tiny real inputs; tests/test_prepare_errors.py reuses them to run
the prepare stage on bad inputs in a subprocess.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stages import prepare
from stages.core.errors import StageError
from stages.core.params import Data
from stages.data import datasets, sources
from stages.data.datasets import Split

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
TRAIN = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def data_cfg(**overrides) -> Data:
    """The data section of params.yaml's defaults, with overrides."""
    values = {
        "source": "digits",
        "root": "data/raw",
        "download": False,
        "image_size": 28,
        "channels": 1,
        "val_fraction": 0.1,
        "test_fraction": 0.2,
        "skip_bad_files": False,
        "pdf_dpi": 72,
    }
    return Data(**{**values, **overrides})


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file's bytes: magic number, big-endian dimensions, uint8 values."""
    if magic is None:
        magic = IMAGES_MAGIC if array.ndim == 3 else LABELS_MAGIC
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def write_file(path: Path, data: bytes) -> Path:
    """Write bytes, gzipped when the name ends in .gz (mtime 0: identical bytes each time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def idx_arrays(count: int, seed: int = 0, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Random images and balanced labels 0..9."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, size, size), dtype=np.uint8)
    labels = np.arange(count, dtype=np.uint8) % 10
    return images, labels


def write_idx_set(
    root: Path,
    folder: str = "MNIST",
    train: int = 100,
    test: int | None = 20,
    gz: bool = True,
) -> Path:
    """IDX files under root/<folder>/raw in torchvision's layout; returns the raw folder."""
    raw = root / folder / "raw"
    suffix = ".gz" if gz else ""
    splits = {TRAIN: train, TEST: test}
    for (images_name, labels_name), count in splits.items():
        if count is None:
            continue
        images, labels = idx_arrays(count, seed=count)
        write_file(raw / f"{images_name}{suffix}", idx_bytes(images))
        write_file(raw / f"{labels_name}{suffix}", idx_bytes(labels))
    return raw


def save_image(path: Path, size: tuple[int, int], mode: str = "L", seed: int = 0, **kw) -> Path:
    """A random image of `size` (width, height) in `mode`, format from the suffix."""
    rng = np.random.default_rng(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    shape = (size[1], size[0], bands) if bands > 1 else (size[1], size[0])
    image = Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)
    return path


def make_image_folder(root: Path, per_class: int = 5, classes: tuple[str, ...] = ("a", "b")):
    """One folder per class, mixed formats, sizes and modes (what a person's scans look like)."""
    kinds = [("png", "L"), ("JPG", "RGB"), ("jpeg", "RGB"), ("bmp", "RGB"), ("tiff", "L")]
    for c, name in enumerate(classes):
        for i in range(per_class):
            suffix, mode = kinds[i % len(kinds)]
            save_image(root / name / f"{i:03d}.{suffix}", (20 + 7 * i, 30 + c), mode, seed=i + c)
    return root


def pdf_bytes(pages: int, seed: int = 0) -> bytes:
    """A PDF of `pages` image pages, made with PIL."""
    rng = np.random.default_rng(seed)
    images = [
        Image.fromarray(rng.integers(0, 256, size=(50, 40), dtype=np.uint8), "L")
        for _ in range(pages)
    ]
    out = io.BytesIO()
    images[0].save(out, "PDF", resolution=72.0, save_all=True, append_images=images[1:])
    return out.getvalue()


def empty_pdf_bytes() -> bytes:
    """A well-formed PDF with a page tree of zero pages."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def make_pdf_folder(root: Path) -> Path:
    """Two classes: a 2-page and a 1-page PDF, and two 1-page PDFs."""
    write_file(root / "invoice" / "x.pdf", pdf_bytes(2, seed=1))
    write_file(root / "invoice" / "y.PDF", pdf_bytes(1, seed=2))
    write_file(root / "letter" / "a.pdf", pdf_bytes(1, seed=3))
    write_file(root / "letter" / "b.pdf", pdf_bytes(1, seed=4))
    return root


# --------------------------------------------------------------------------- IDX


def test_idx_gz_and_plain_read_the_same(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "gz", gz=True)
    write_idx_set(tmp_path / "plain", gz=False)
    a = sources.read(data_cfg(source="mnist", root=str(tmp_path / "gz")))
    b = sources.read(data_cfg(source="mnist", root=str(tmp_path / "plain")))
    images, labels = idx_arrays(100, seed=100)
    assert a.splits["train"].images.shape == (100, 1, 28, 28)
    assert a.splits["train"].images.dtype == torch.uint8
    assert torch.equal(a.splits["train"].images[:, 0], torch.from_numpy(images))
    assert torch.equal(a.splits["train"].labels, torch.from_numpy(labels.astype(np.int64)))
    assert len(a.splits["test"]) == 20
    for key in ("train", "test"):
        assert torch.equal(a.splits[key].images, b.splits[key].images)
    # The digest covers the IDX contents, so gzipping the files changes nothing downstream.
    assert a.digest == b.digest
    assert a.classes[0] == "0 - zero"
    assert a.details["test_split"] == "source"


@pytest.mark.parametrize(
    ("source", "folder", "first_class"),
    [("fashion_mnist", "FashionMNIST", "T-shirt/top"), ("kmnist", "KMNIST", "o")],
)
def test_idx_folders_and_classes_follow_torchvision(
    tmp_path: Path, source: str, folder: str, first_class: str
) -> None:
    write_idx_set(tmp_path, folder=folder, test=None)
    got = sources.read(data_cfg(source=source, root=str(tmp_path)))
    assert got.classes[0] == first_class
    assert set(got.splits) == {"train"}
    assert got.details["test_split"].startswith("stratified")


def test_idx_digest_changes_with_the_data(tmp_path: Path) -> None:
    raw = write_idx_set(tmp_path, gz=False)
    cfg = data_cfg(source="mnist", root=str(tmp_path))
    before = sources.read(cfg).digest
    labels = bytearray((raw / TRAIN[1]).read_bytes())
    labels[-1] = (labels[-1] + 1) % 10
    (raw / TRAIN[1]).write_bytes(bytes(labels))
    assert sources.read(cfg).digest != before


def test_idx_missing_file_names_the_exact_path(tmp_path: Path) -> None:
    raw = write_idx_set(tmp_path)
    (raw / f"{TRAIN[1]}.gz").unlink()
    with pytest.raises(StageError) as info:
        sources.read(data_cfg(source="mnist", root=str(tmp_path)))
    assert str(raw / f"{TRAIN[1]}.gz") in str(info.value)
    assert "data.download" in str(info.value)
    assert "\n" not in str(info.value)


def test_idx_one_test_file_without_its_partner_is_an_error(tmp_path: Path) -> None:
    raw = write_idx_set(tmp_path)
    (raw / f"{TEST[0]}.gz").unlink()
    with pytest.raises(StageError, match=TEST[0]):
        sources.read(data_cfg(source="mnist", root=str(tmp_path)))


def test_idx_label_out_of_range(tmp_path: Path) -> None:
    raw = write_idx_set(tmp_path, test=None, gz=False)
    write_file(raw / TRAIN[1], idx_bytes(np.full(100, 12, dtype=np.uint8)))
    with pytest.raises(StageError, match=r"label 12 .* outside 0\.\.9"):
        sources.read(data_cfg(source="mnist", root=str(tmp_path)))


def test_idx_absurd_header_fails_before_allocating(tmp_path: Path) -> None:
    raw = write_idx_set(tmp_path, test=None)
    header = IMAGES_MAGIC.to_bytes(4, "big") + b"".join(
        d.to_bytes(4, "big") for d in (4_000_000_000, 4096, 4096)
    )
    write_file(raw / f"{TRAIN[0]}.gz", header + bytes(1000))
    with pytest.raises(StageError, match="wrong length"):
        sources.read(data_cfg(source="mnist", root=str(tmp_path)))


class FakeMNIST:
    """Stands in for torchvision.datasets.MNIST: 'downloads' by writing IDX files."""

    calls: ClassVar[list[dict]] = []

    def __init__(self, root: str, train: bool, download: bool):
        self.calls.append({"root": root, "train": train, "download": download})
        write_idx_set(Path(root), folder="MNIST")


def test_download_only_when_asked_and_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    FakeMNIST.calls = []
    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    with pytest.raises(StageError, match="not found"):
        sources.read(data_cfg(source="mnist", root=str(tmp_path)))
    assert FakeMNIST.calls == []
    got = sources.read(data_cfg(source="mnist", root=str(tmp_path), download=True))
    assert FakeMNIST.calls == [{"root": str(tmp_path), "train": True, "download": True}]
    assert len(got.splits["train"]) == 100
    sources.read(data_cfg(source="mnist", root=str(tmp_path), download=True))
    assert len(FakeMNIST.calls) == 1  # files present: no second download


def test_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def offline(root: str, train: bool, download: bool) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried x, got:\nno")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(StageError) as info:
        sources.read(data_cfg(source="mnist", root=str(tmp_path), download=True))
    assert str(info.value).startswith("data.download: fetching MNIST into")
    assert str(info.value).endswith("Tried x, got: no")


@pytest.mark.parametrize("source", sorted(sources.IDX_DATASETS))
def test_idx_sources_match_torchvision(source: str) -> None:
    """The copied folder names, class names and file names are torchvision's own."""
    import torchvision.datasets

    spec = sources.IDX_DATASETS[source]
    dataset = getattr(torchvision.datasets, spec.name)
    assert dataset.__name__ == spec.name
    assert list(dataset.classes) == list(spec.classes)
    files = sorted(Path(url).name.removesuffix(".gz") for url, _ in dataset.resources)
    assert files == sorted((*sources.IDX_FILES["train"], *sources.IDX_FILES["test"]))


# --------------------------------------------------------------------------- folders


def test_image_folder_reads_mixed_files(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "scans", per_class=5, classes=("b_cls", "a_cls"))
    (root / ".hidden").mkdir()
    save_image(root / ".hidden" / "x.png", (8, 8))
    save_image(root / "a_cls" / ".ignored.png", (8, 8))
    (root / "a_cls" / "Thumbs.db").write_bytes(b"junk")
    save_image(root / "a_cls" / "nested" / "deep.PNG", (9, 9))
    (root / "notes.txt").write_text("not a class")
    cfg = data_cfg(source="image_folder", root=str(root), image_size=16)
    got = sources.read(cfg)
    split = got.splits["train"]
    assert got.classes == ["a_cls", "b_cls"]
    assert split.images.shape == (11, 1, 16, 16)
    assert split.labels.tolist() == [0] * 6 + [1] * 5
    assert got.details == {"files": 11, "skipped": []}
    again = sources.read(cfg)
    assert torch.equal(again.splits["train"].images, split.images)
    assert again.digest == got.digest


def test_image_folder_three_channels_and_transparency(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "x").mkdir(parents=True)
    # Fully transparent black: paper white once composited, not black.
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(root / "x" / "t.png")
    save_image(root / "y" / "c.png", (10, 10), "RGB")
    got = sources.read(data_cfg(source="image_folder", root=str(root), channels=3, image_size=8))
    assert got.splits["train"].images.shape == (2, 3, 8, 8)
    assert int(got.splits["train"].images[0].min()) == 255


def test_image_folder_digest_covers_paths_and_bytes(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "root", per_class=2)
    cfg = data_cfg(source="image_folder", root=str(root))
    first = sources.read(cfg).digest
    assert sources.read(cfg).digest == first
    (root / "a" / "000.png").rename(root / "a" / "renamed.png")
    renamed = sources.read(cfg).digest
    assert renamed != first
    save_image(root / "a" / "renamed.png", (20, 30), seed=99)
    assert sources.read(cfg).digest not in (first, renamed)


def test_image_folder_skip_bad_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_image_folder(tmp_path / "root", per_class=3)
    (root / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "b" / "readme.txt").write_text("hello")
    cfg = data_cfg(source="image_folder", root=str(root), skip_bad_files=True)
    got = sources.read(cfg)
    assert len(got.splits["train"]) == 6
    assert got.details["skipped"] == ["a/broken.png", "b/readme.txt"]
    assert "broken.png: skipped" in caplog.text
    # The stored tensor must not keep the skipped slots (torch.save writes whole storages).
    images = got.splits["train"].images
    assert images.untyped_storage().nbytes() == images.numel()
    with pytest.raises(StageError, match=r"broken\.png: not a readable image"):
        sources.read(data_cfg(source="image_folder", root=str(root)))


def test_image_folder_class_with_only_bad_files(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "root", per_class=2)
    for f in (root / "b").iterdir():
        f.write_bytes(b"garbage")
    cfg = data_cfg(source="image_folder", root=str(root), skip_bad_files=True)
    with pytest.raises(StageError, match="class 'b' has no readable file"):
        sources.read(cfg)


def test_image_folder_root_missing_or_a_file(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="not found"):
        sources.read(data_cfg(source="image_folder", root=str(tmp_path / "nope")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(StageError, match="is not a folder"):
        sources.read(data_cfg(source="image_folder", root=str(tmp_path / "file")))


def test_pdf_folder_renders_every_page(tmp_path: Path) -> None:
    root = make_pdf_folder(tmp_path / "pdfs")
    got = sources.read(data_cfg(source="pdf_folder", root=str(root), pdf_dpi=72))
    assert got.classes == ["invoice", "letter"]
    assert got.splits["train"].images.shape == (5, 1, 28, 28)
    assert got.splits["train"].labels.tolist() == [0, 0, 0, 1, 1]
    assert got.details == {"files": 4, "pages": 5, "skipped": []}


def test_pdf_folder_skips_empty_and_broken(tmp_path: Path) -> None:
    root = make_pdf_folder(tmp_path / "pdfs")
    write_file(root / "letter" / "empty.pdf", empty_pdf_bytes())
    write_file(root / "letter" / "broken.pdf", b"%PDF-1.4 nothing else")
    got = sources.read(data_cfg(source="pdf_folder", root=str(root), skip_bad_files=True))
    assert got.details["skipped"] == ["letter/broken.pdf", "letter/empty.pdf"]
    assert len(got.splits["train"]) == 5
    with pytest.raises(StageError, match=r"broken\.pdf: not a readable PDF"):
        sources.read(data_cfg(source="pdf_folder", root=str(root)))
    (root / "letter" / "broken.pdf").unlink()
    with pytest.raises(StageError, match=r"empty\.pdf: empty PDF \(no pages\)"):
        sources.read(data_cfg(source="pdf_folder", root=str(root)))


def test_prepare_pdf_folder_in_rgb(repo: Path) -> None:
    """The whole stage on PDFs: pages become images, classes and counts land in meta.json."""
    from helpers.repos import write_params
    from stages import prepare
    from stages.core import paths
    from stages.core.params import load_params

    make_pdf_folder(repo / "data" / "raw" / "pdfs")
    data = {"source": "pdf_folder", "root": "data/raw/pdfs", "channels": 3, "pdf_dpi": 50}
    write_params(repo, data={**data, "image_size": 32})
    prepare.main(load_params())
    meta = json.loads(paths.META.read_text())
    assert meta["classes"] == ["invoice", "letter"]
    assert sum(meta["counts"].values()) == meta["pages"] == 5
    assert meta["skipped"] == []
    train = torch.load(paths.split_file("train"), weights_only=True)
    assert train["images"].shape[1:] == (3, 32, 32)
    assert train["images"].dtype == torch.uint8


# --------------------------------------------------------------------------- splits


def test_tiny_folder_splits_at_random_instead_of_failing() -> None:
    split = Split(torch.zeros((6, 1, 4, 4), dtype=torch.uint8), torch.tensor([0, 0, 0, 1, 1, 1]))
    train, held = prepare.stratified_split(split, 0.2, seed=0)
    assert len(train) + len(held) == 6 and len(held) == 2


def test_single_image_cannot_be_split() -> None:
    split = Split(torch.zeros((1, 1, 4, 4), dtype=torch.uint8), torch.tensor([0]))
    with pytest.raises(StageError, match=r"data\.test_fraction"):
        prepare.stratified_split(split, 0.2, seed=0, key="data.test_fraction")


def test_stratified_split_holds_out_each_class_alike_and_is_seeded() -> None:
    labels = torch.arange(1000) % 7  # 7 classes of 142 or 143 images
    split = Split(torch.arange(1000).view(1000, 1, 1, 1).to(torch.int64), labels)
    keep, held = prepare.stratified_split(split, 0.2, seed=3)
    assert len(held) == 200 and len(keep) == 800
    assert sorted(keep.images.view(-1).tolist() + held.images.view(-1).tolist()) == list(
        range(1000)
    )
    per_class = torch.bincount(held.labels, minlength=7)
    assert per_class.min() >= 28 and per_class.max() <= 29  # 20 % of each class
    again, _ = prepare.stratified_split(split, 0.2, seed=3)
    other, _ = prepare.stratified_split(split, 0.2, seed=4)
    assert torch.equal(again.images, keep.images)
    assert not torch.equal(other.images, keep.images)


def test_channel_stats_match_torch_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "CHUNK_VALUES", 1000)
    images = torch.randint(0, 256, (300, 3, 12, 10), dtype=torch.uint8)
    x = images.double() / 255
    mean, std = datasets.channel_stats(images)
    assert mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)
    assert std == pytest.approx(x.std(dim=(0, 2, 3)).tolist(), abs=1e-6)


def test_resize_in_chunks_equals_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "CHUNK_VALUES", 1000)
    images = torch.randint(0, 256, (50, 1, 20, 20), dtype=torch.uint8)
    whole = F.interpolate(images.float(), size=(9, 9), mode="bilinear", antialias=True)
    expected = whole.round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(datasets.resize(images, 9, 1), expected)


def test_shared_t10k_files_present_or_skipped(tmp_path: Path) -> None:
    """A smoke test of the real MNIST t10k files in-process (the subprocess one is slower)."""
    shared = Path(__file__).resolve().parents[2] / "shared/data/mnist-t10k"
    if not (shared / f"{TEST[0]}.gz").is_file():
        pytest.skip(f"{shared}: not present")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for src, dst in zip(TEST, TRAIN, strict=True):
        shutil.copyfile(shared / f"{src}.gz", raw / f"{dst}.gz")
    got = sources.read(data_cfg(source="mnist", root=str(tmp_path)))
    assert got.splits["train"].images.shape == (10_000, 1, 28, 28)
    assert torch.bincount(got.splits["train"].labels).tolist()[:2] == [980, 1135]
