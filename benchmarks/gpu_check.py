"""The CUDA training path proven on a lent GPU machine: one command, one JSON report.

Run from the repository root (docs/gpu.md has the whole procedure):

    python benchmarks/gpu_check.py --download           # here: wheels the device lacks
    python3 benchmarks/gpu_check.py                     # there: the check, into $OUT
    python benchmarks/gpu_check.py --device cpu --out tmp   # the dry run on any CPU

Every step runs the pipeline's real code in a temporary copy of the repository, MLflow
off (the device machine has no mlflow, dvc, openvino or nncf; stage commands run directly,
as dvc.yaml writes them):

1. environment: Python, torch, CUDA, NCCL, the GPU and CPU;
2. install: pydantic (which stages.core.params needs) from the wheels carried in `.whl/`;
3. imports: every stage module imports with mlflow, dvc, openvino, nncf, optuna hidden (stub
   packages that fail to import), as they are absent on the GPU machine; every later step
   runs with them hidden too, so the dry run proves the same there;
4. prepare: MNIST-shaped IDX files generated from scikit-learn's bundled digits (random
   affine warps: nothing to download, nothing that fails to travel), then the prepare
   stage on them;
5. train: the train stage through `python -m stages.launch ... -m stages train` with bf16
   autocast, at several batch sizes, with compile and channels-last on and off;
6. textbook: the loop a tutorial reader writes (PIL images, per-sample ToTensor and
   Normalize, DataLoader with 4 workers and pinned memory, the same net) on the same GPU,
   images and number of epochs, at the same batch sizes;
7. nccl: the train stage's own setup and epochs under DDP in a one-rank NCCL group (one
   GPU cannot hold two NCCL ranks, and the stage joins no group for one process);
8. export: the export stage on the fastest CUDA-trained model (ONNX Runtime on the CPU
   against PyTorch on the CPU, gated by export.atol; and against the model on the GPU);
9. pytest: the `gpu`-marked tests;
10. summary: images/s of the stage over the textbook loop, at batch 64 and each at its
    fastest batch (target >= 10x on a GPU), and the test accuracies after the same images.

`--device cpu` is the dry run of every step a CPU can do, at tiny sizes: amp off (bf16
without AVX512_BF16 crawls), gloo for NCCL, compile and channels-last-off runs skipped
(with the reason), the gpu tests skipping themselves. tests/test_gpu_check.py runs it.

A failed step is recorded and the next one runs; the exit code is 1 if any step failed.
The report (`gpu_check.json`) is rewritten after every step, so a run cut short still
reports what it did; `gpu_check.log` holds every command's output.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import gzip
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import shlex
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from textbook import PilImages
from workspace import cpu_name

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("gpu_check")

REPORT = "gpu_check.json"
LOG = "gpu_check.log"
WHEELS = ROOT / ".whl"
# What the stages import that the device image lacks; pip resolves their dependencies.
NEEDED = ("pydantic",)
# CPython 3.12 on x86-64 Linux, as the device's python3 is; pip matches each tag exactly.
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# Absent on the device machine: with mlflow.enabled false no stage may need them.
OPTIONAL = ("mlflow", "dvc", "openvino", "nncf", "optuna")
# What a stage copy needs (the device's tree may come without .git: no `git ls-files`).
REPO_FILES = ("stages", "dvc.yaml", "params.yaml", "pyproject.toml")
# Variables of an enclosing torchrun or DVC run that must not leak into the stages.
RUN_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "DVC_ROOT",
    "DVC_EXP_NAME",
    "MLFLOW_TRACKING_URI",
)
IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801
TARGET_RATIO = 10.0


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each step is on a device: the GPU check, or the dry run on a CPU."""

    train_images: int  # generated; prepare holds data.val_fraction of them out
    test_images: int
    epochs: int
    stage_batches: tuple[int, ...]  # batch 64 first
    textbook_batches: tuple[int, ...]  # batch 64 first
    amp: str  # bf16 on a GPU; off on a CPU, where bf16 without AVX512_BF16 crawls
    variants: bool  # the runs with compile on and channels-last off (GPU settings)
    workers: int  # the textbook DataLoader's num_workers
    threads: int  # runtime.threads of the stages, torch threads here; 0 = all cores
    budget_s: float  # optional runs start only before this many seconds have passed
    stage_timeout_s: float
    pytest_timeout_s: float


BATCHES = (64, 256, 1024, 4096)
SIZES = {
    "cuda": Sizes(50_000, 10_000, 3, BATCHES, BATCHES, "bf16", True, 4, 0, 150.0, 240.0, 150.0),
    # The dry run: every step that can run on a CPU, small enough for a 2-core machine.
    "cpu": Sizes(400, 200, 2, (64,), (64,), "off", False, 4, 1, 1e9, 240.0, 120.0),
}


class Skip(Exception):
    """A step that cannot run here, with the reason."""


class Failed(Exception):
    """A step that ran and failed, with the reason."""


# -- the report ---------------------------------------------------------------------------


class Report:
    """gpu_check.json: per-step status, reason, seconds and numbers, rewritten each step."""

    def __init__(self, out: Path, device: str):
        self.file = out / REPORT
        self.started = time.monotonic()
        self.data: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            # Filled as the steps go: what ran, how it went, the numbers.
            **dict.fromkeys(("python", "torch", "cuda", "gpu", "cpu", "total_seconds")),
            **dict.fromkeys(("failed", "headline", "params")),
            "steps": {},
        }

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def status(self, name: str) -> str | None:
        return self.data["steps"].get(name, {}).get("status")

    def ok(self, name: str) -> bool:
        return self.status(name) == "ok"

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        """Run a step: its dict to fill with numbers; Skip, Failed or any error recorded."""
        entry: dict[str, Any] = {"status": "ok"}
        self.data["steps"][name] = entry
        started = time.monotonic()
        log.info("-- %s", name)
        try:
            yield entry
        except Skip as exc:
            entry.update(status="skipped", reason=str(exc))
        except Failed as exc:
            entry.update(status="failed", reason=str(exc)[-4000:])
        except Exception as exc:  # a bug here or there: its traceback goes to the log
            entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:4000])
            log.warning("%s: unexpected error", name, exc_info=True)
        entry["seconds"] = round(time.monotonic() - started, 2)
        if entry["status"] == "skipped":
            log.info("   skipped: %s", entry["reason"])
        elif entry["status"] == "failed":
            log.warning("   FAILED: %s", entry["reason"])
        self.write()

    def write(self) -> None:
        self.data["total_seconds"] = round(self.elapsed, 1)
        steps = self.data["steps"].values()
        self.data["failed"] = sum(step["status"] == "failed" for step in steps)
        self.file.write_text(json.dumps(self.data, indent=2) + "\n")


# -- running commands ---------------------------------------------------------------------


class Runner:
    """Commands in a folder with the carried packages on PYTHONPATH, output into the log."""

    def __init__(self, log_file: Path, cpu_only: bool):
        self.log_file = log_file
        self.paths: list[Path] = []  # ahead of PYTHONPATH: the hidden modules, the wheels
        self.cpu_only = cpu_only

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in RUN_VARS}
        env["PYTHONUNBUFFERED"] = "1"
        front = [str(p) for p in self.paths]
        env["PYTHONPATH"] = os.pathsep.join(p for p in (*front, env.get("PYTHONPATH")) if p)
        if self.cpu_only:  # the dry run is a CPU machine's, also where a GPU is
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def run(self, argv: list[str], cwd: Path, timeout: float) -> str:
        """Run argv; its output (also appended to the log), or Failed with its last lines."""
        started = time.monotonic()
        with self.log_file.open("a") as fh:
            fh.write(f"\n$ (cd {cwd} && {shlex.join(argv)})\n")
        try:
            done = subprocess.run(
                argv,
                cwd=cwd,
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            output, code = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as exc:
            output = _text(exc.stdout) + _text(exc.stderr)
            code = f"timeout after {timeout:.0f} s"
        with self.log_file.open("a") as fh:
            fh.write(output)
            fh.write(f"[exit {code}, {time.monotonic() - started:.1f} s]\n")
        if code != 0:
            tail = "\n".join(output.strip().splitlines()[-15:])
            raise Failed(f"{shlex.join(argv[:6])}... exit {code}:\n{tail}")
        return output


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def stage_argv(stage: str, params: dict[str, Any]) -> list[str]:
    """The stage's cmd from dvc.yaml, ${...} filled from params, run by this interpreter."""
    cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["cmd"]

    def value(match: re.Match) -> str:
        found: Any = params
        for key in match.group(1).split("."):
            found = found[key]
        return str(found)

    argv = shlex.split(re.sub(r"\$\{([\w.]+)\}", value, cmd))
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


# -- steps 1-3: environment, install, imports ---------------------------------------------


def environment(entry: dict[str, Any], device: str) -> None:
    """What this machine is: the numbers in the report are about it."""
    entry.update(
        python=platform.python_version(),
        executable=sys.executable,
        platform=platform.platform(),
        cpu=cpu_name(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
    )
    for name in ("torchvision", "onnx", "onnxruntime", "onnxscript", "pytest", *OPTIONAL):
        try:
            entry[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            entry[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        nccl_version = torch.cuda.nccl.version()
        entry.update(
            gpu=torch.cuda.get_device_name(0),
            gpus=torch.cuda.device_count(),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, nccl_version))
            if isinstance(nccl_version, tuple)
            else nccl_version,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            entry["driver"] = subprocess.run(
                query, capture_output=True, text=True, timeout=20, check=True
            ).stdout.strip()
    if device == "cuda" and not torch.cuda.is_available():
        raise Failed("--device cuda, but torch sees no CUDA device")


def install(entry: dict[str, Any], runner: Runner, workdir: Path) -> None:
    """pydantic and its dependencies from the carried wheels, unless importable already."""
    wheels = sorted(WHEELS.glob("*.whl"))
    entry["wheels"] = [w.name for w in wheels]
    entry["wheels_mib"] = round(sum(w.stat().st_size for w in wheels) / 2**20, 2)
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if not missing:
        versions = ", ".join(f"{n} {importlib.metadata.version(n)}" for n in NEEDED)
        raise Skip(f"already importable here: {versions}")
    if not wheels:
        raise Failed(
            f"{', '.join(missing)} missing and no wheels in {WHEELS}: run "
            "`python benchmarks/gpu_check.py --download` where pip reaches a registry, "
            "and carry .whl"
        )
    site = workdir / "site"
    # --target, no index: nothing to reach, nothing of the image's own packages touched.
    runner.run(
        [
            sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
            "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
            *map(str, wheels),
        ],
        ROOT,
        timeout=120,
    )  # fmt: skip
    runner.paths.append(site)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    for name in NEEDED:
        importlib.import_module(name)
        entry[name] = importlib.metadata.version(name)


STAGE_MODULES = (
    "stages.__main__",
    "stages.launch",
    "stages.prepare",
    "stages.train",
    "stages.evaluate",
    "stages.export",
    "stages.tracking.helper",
    "stages.tracking.mlflow_store",
)


def hide_optional(folder: Path) -> Path:
    """Packages named mlflow, dvc, openvino, nncf and optuna that fail to import, as on the device,
    where none is installed: first on the path, they prove the stages run without them."""
    for name in OPTIONAL:
        package = folder / name
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text(
            f"raise ImportError('{name} is hidden by benchmarks/gpu_check.py (absent on the "
            "GPU machine); no stage may need it with mlflow.enabled false')\n"
        )
    return folder


def imports(entry: dict[str, Any], runner: Runner, workdir: Path) -> None:
    """The stage modules import with mlflow/dvc/openvino/nncf/optuna hidden, and import none."""
    entry["absent_here"] = [n for n in OPTIONAL if importlib.util.find_spec(n) is None]
    hidden = hide_optional(workdir / "hidden")
    # Every later step runs with them hidden: this process and the commands it starts.
    runner.paths.insert(0, hidden)
    sys.path.insert(0, str(hidden))
    entry["hidden"] = list(OPTIONAL)
    before = {n for n in OPTIONAL if n in sys.modules}
    for module in STAGE_MODULES:
        importlib.import_module(module)
    eager = [n for n in OPTIONAL if n in sys.modules and n not in before]
    entry["eagerly_imported"] = eager
    if eager:
        raise Failed(f"importing the stages imports {', '.join(eager)} (absent on the device)")


# -- step 4: data and the workspace -------------------------------------------------------


def warped_digits(
    base: np.ndarray, labels: np.ndarray, count: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """`count` 28x28 uint8 digits: scikit-learn's 8x8 ones, each randomly warped."""
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(base), (count,), generator=gen)
    images = np.empty((count, 28, 28), dtype=np.uint8)
    source = torch.from_numpy(base).float().unsqueeze(1) / 16.0
    for start in range(0, count, 8192):
        idx = pick[start : start + 8192]
        n = len(idx)
        # Output -> input coordinates: a digit about 20 of 28 pixels tall (as MNIST's),
        # scaled, rotated and shifted a little, as handwriting varies.
        scale = 1.4 * (1 + 0.12 * (torch.rand(n, generator=gen) * 2 - 1))
        angle = 0.2 * (torch.rand(n, generator=gen) * 2 - 1)
        shift = 0.15 * (torch.rand(n, 2, generator=gen) * 2 - 1)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = scale * torch.cos(angle), -scale * torch.sin(angle)
        theta[:, 1, 0], theta[:, 1, 1] = scale * torch.sin(angle), scale * torch.cos(angle)
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, [n, 1, 28, 28], align_corners=False)
        warped = F.grid_sample(source[idx], grid, mode="bilinear", align_corners=False)
        noisy = warped + 0.04 * torch.randn(warped.shape, generator=gen)
        images[start : start + n] = (noisy.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0]
    return images, labels[pick.numpy()].astype(np.uint8)


def write_idx(file: Path, array: np.ndarray, magic: int) -> None:
    """An IDX file as MNIST ships it: big-endian magic and dimensions, then the bytes."""
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    with gzip.open(file, "wb", compresslevel=1) as fh:
        fh.write(header + np.ascontiguousarray(array).tobytes())


def generate_mnist(raw: Path, sizes: Sizes) -> dict[str, Any]:
    """MNIST-layout IDX files of warped digits; test images come from other digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # The last 20 % of the 1,797 digits only ever appear in the test split.
    cut = int(len(digits.target) * 0.8)
    train = warped_digits(digits.images[:cut], digits.target[:cut], sizes.train_images, 1)
    test = warped_digits(digits.images[cut:], digits.target[cut:], sizes.test_images, 2)
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images, IDX_IMAGES)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels, IDX_LABELS)
    return {"generated_train": sizes.train_images, "generated_test": sizes.test_images}


def make_workspace(dest: Path) -> Path:
    """A copy of the pipeline's files, without outputs, caches or the user's MLflow store."""
    for name in REPO_FILES:
        source, target = ROOT / name, dest / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    return dest


def base_params(sizes: Sizes, device: str) -> dict[str, Any]:
    """params.yaml with the generated MNIST, the check's training settings, MLflow off."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="mnist", root="data/raw", download=False)
    params["data"].update(image_size=28, channels=1)
    params["model"]["name"] = "cnn"
    params["train"].update(
        epochs=sizes.epochs,
        warmup_epochs=1,
        amp=sizes.amp,
        compile=False,
        channels_last=True,
        # cuDNN's autotuner on, as anyone timing a GPU sets it.
        deterministic=False,
        device=device,
        nproc_per_node="auto",
    )
    params["mlflow"]["enabled"] = False
    params["runtime"].update(threads=sizes.threads, resume=False)
    return params


def write_params(repo: Path, params: dict[str, Any]) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def load_split(repo: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A prepared split's uint8 images and labels."""
    blob = torch.load(repo / f"data/prepared/{name}.pt", weights_only=True)
    return blob["images"], blob["labels"]


# -- step 5: the train stage --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """One training configuration."""

    batch: int
    compile: bool = False
    channels_last: bool = True

    @property
    def name(self) -> str:
        tags = ("+compile" if self.compile else "") + ("" if self.channels_last else "-cl")
        return f"b{self.batch}{tags}"


def saved_on(file: Path) -> list[str]:
    """The devices the tensors of a torch file were saved from (cuda:0: trained there)."""
    where: set[str] = set()

    def note(storage, location: str):
        where.add(location)
        return storage

    torch.load(file, map_location=note, weights_only=True)
    return sorted(where)


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of the test split the model gets right (fp32, on the model's device)."""
    from stages.data import datasets

    device = next(model.parameters()).device
    model.eval()
    right = 0
    for x, y in zip(images.split(2048), labels.split(2048), strict=True):
        logits = model(datasets.to_model_input(x.to(device)))
        right += int((logits.argmax(1).cpu() == y).sum())
    return right / len(labels)


def train_stage(
    entry: dict[str, Any], run: Run, repo: Path, params: dict, runner: Runner, sizes: Sizes
) -> None:
    """The train stage as dvc.yaml runs it; its metrics, per-epoch rates and test accuracy."""
    from stages.models import zoo

    params = json.loads(json.dumps(params))
    params["train"].update(
        batch_size=run.batch, compile=run.compile, channels_last=run.channels_last
    )
    write_params(repo, params)
    for name in ("models", "metrics", "plots/train"):
        shutil.rmtree(repo / name, ignore_errors=True)
    argv = stage_argv("train", params)
    # As dvc.yaml writes it (this interpreter runs it).
    entry.update(command=shlex.join(["python", *argv[1:]]), **_run_settings(params))
    started = time.monotonic()
    output = runner.run(argv, repo, sizes.stage_timeout_s)
    entry["wall_seconds"] = round(time.monotonic() - started, 2)
    metrics = json.loads((repo / "metrics/train.json").read_text())
    with (repo / "plots/train/history.csv").open() as fh:
        rates = [float(row["images_per_second"]) for row in csv.DictReader(fh)]
    found = re.search(r"trained (\d+) epochs on (\d+) process", output)
    entry.update(
        processes=int(found.group(2)) if found else None,
        epochs=len(rates),
        images_per_second=round(metrics["images_per_second"], 1),
        # Epoch 1 holds cuDNN's autotuning and compilation: the later ones are the pace.
        steady_images_per_second=round(statistics.median(rates[1:] or rates), 1),
        epoch_images_per_second=[round(r, 1) for r in rates],
        train_seconds=round(metrics["train_seconds"], 3),
        val_accuracy=round(metrics["val_accuracy"], 4),
        weights_saved_from=saved_on(repo / "models/model.pt"),
    )
    model, _ = zoo.load(repo / "models/model.pt")
    device = "cuda" if torch.cuda.is_available() and params["train"]["device"] == "cuda" else "cpu"
    entry["test_accuracy"] = round(accuracy(model.to(device), *load_split(repo, "test")), 4)
    kept = repo / "runs" / run.name
    kept.mkdir(parents=True, exist_ok=True)
    shutil.copy2(repo / "models/model.pt", kept / "model.pt")
    if entry["epochs"] != sizes.epochs or entry["images_per_second"] <= 0:
        raise Failed(f"expected {sizes.epochs} epochs at > 0 img/s, got {rates}")


def _run_settings(params: dict[str, Any]) -> dict[str, Any]:
    keys = ("batch_size", "amp", "compile", "channels_last", "device", "deterministic")
    return {key: params["train"][key] for key in keys}


# -- step 6: the textbook loop ------------------------------------------------------------


def textbook(entry: dict[str, Any], batch: int, repo: Path, params: dict, sizes: Sizes) -> None:
    """PyTorch's MNIST example on the same GPU, net, optimizer, images and epochs."""
    from torchvision import transforms

    from stages.models import zoo

    device = torch.device(params["train"]["device"])
    meta = json.loads((repo / "data/prepared/meta.json").read_text())
    mean, std = meta["mean"], meta["std"]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    dataset = PilImages(*load_split(repo, "train"), transform)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=sizes.workers,
        pin_memory=device.type == "cuda",
    )
    torch.manual_seed(params["seed"])
    builder = zoo.ZOO[params["model"]["name"]][0]
    model = builder(meta["channels"], meta["image_size"], len(meta["classes"])).to(device)
    cfg = params["train"]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"]
    )
    seen = 0
    started = time.perf_counter()
    for _epoch in range(sizes.epochs):
        model.train()
        for batch_idx, (data, target) in enumerate(loader):
            data, target = data.to(device), target.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data), target)
            loss.backward()
            optimizer.step()
            if batch_idx % 10 == 0:  # the example's log_interval
                loss.item()
            seen += len(target)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    images, labels = load_split(repo, "test")
    normalized = torch.nn.Sequential(zoo.Normalize(mean, std), model).to(device)
    entry.update(
        batch_size=batch,
        num_workers=sizes.workers,
        pin_memory=device.type == "cuda",
        epochs=sizes.epochs,
        images=seen,
        seconds_training=round(seconds, 3),
        images_per_second=round(seen / seconds, 1),
        test_accuracy=round(accuracy(normalized, images, labels), 4),
    )
    del model, optimizer, loader
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- step 7: NCCL -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nccl_worker(repo: Path, out: Path) -> None:
    """In a fresh process in the workspace: the train stage's setup and epochs under DDP in
    a one-rank process group (NCCL on CUDA, gloo on the CPU)."""
    import torch.distributed as tdist

    os.chdir(repo)
    sys.path.insert(0, str(repo))
    from stages import train
    from stages.core.params import load_params
    from stages.data import datasets
    from stages.training import dist, engine

    class Distributed(dist.Context):
        """A world of one that still wraps the model in DDP, as a world of several does."""

        @property
        def distributed(self) -> bool:
            return True

    params = load_params()
    cuda = params.train.device == "cuda"
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
        LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
    )  # fmt: skip
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    tdist.init_process_group(backend, device_id=device if cuda else None)
    ctx = dist.setup(params.train.device, params.runtime.threads)  # joins no second group
    ctx = Distributed(ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size, ctx.device)
    engine.seed_everything(params.seed, params.train.deterministic, params.train.compile)
    job = train.setup(params, datasets.load_meta(), ctx)
    rows = [train.run_epoch(job, epoch, ctx) for epoch in range(1, params.train.epochs + 1)]
    summed = dist.all_reduce_sum(torch.ones(3, device=device)).tolist()
    gathered = dist.gather({"rank": ctx.rank})
    result = {
        "backend": tdist.get_backend(),
        "world_size": tdist.get_world_size(),
        "ddp": type(job.model).__name__,
        "data_device": str(job.train_data.images.device),
        "data_mib_on_device": round(
            sum(t.numel() * t.element_size() for t in (job.train_data.images, job.val_data.images))
            / 2**20,
            1,
        ),
        "all_reduce": summed,
        "gathered": gathered,
        "batch_size": params.train.batch_size,
        "amp": params.train.amp,
        "channels_last": params.train.channels_last,
        "epoch_images_per_second": [round(row["images_per_second"], 1) for row in rows],
        "val_accuracy": round(rows[-1]["val_accuracy"], 4),
    }
    if cuda:
        result["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    dist.teardown()
    out.write_text(json.dumps(result))


def nccl(entry: dict[str, Any], repo: Path, params: dict, runner: Runner, sizes: Sizes) -> None:
    """Run nccl_worker in a fresh process; check DDP wrapped and the data sat on the device."""
    params = json.loads(json.dumps(params))
    # A batch that keeps a GPU busy, so the epochs time NCCL's DDP, not Python.
    params["train"].update(batch_size=max(sizes.stage_batches[:3]))
    write_params(repo, params)
    out = repo / "nccl.json"
    runner.run(
        [sys.executable, __file__, "--worker", "nccl", "--repo", str(repo), "--out", str(out)],
        ROOT,
        sizes.stage_timeout_s,
    )
    result = json.loads(out.read_text())
    entry.update(result)
    wanted = "nccl" if params["train"]["device"] == "cuda" else "gloo"
    if result["backend"] != wanted or result["ddp"] != "DistributedDataParallel":
        raise Failed(f"expected DDP over {wanted}, got {result['ddp']} over {result['backend']}")
    if not result["data_device"].startswith(params["train"]["device"]):
        raise Failed(f"the training data sat on {result['data_device']}")


# -- step 8: export -----------------------------------------------------------------------


def export(entry: dict[str, Any], run: str, repo: Path, params: dict, runner: Runner) -> None:
    """The export stage on a kept CUDA-trained model; parity of ONNX Runtime on the CPU."""
    import onnxruntime as ort

    from stages.data import datasets
    from stages.models import zoo

    write_params(repo, params)
    (repo / "models").mkdir(exist_ok=True)
    shutil.copy2(repo / "runs" / run / "model.pt", repo / "models/model.pt")
    (repo / "models/model.onnx").unlink(missing_ok=True)
    entry.update(model_of=run, weights_saved_from=saved_on(repo / "models/model.pt"))
    runner.run(stage_argv("export", params), repo, 300)
    result = json.loads((repo / "metrics/export.json").read_text())
    entry.update(
        atol=params["export"]["atol"],
        max_abs_diff=result["max_abs_diff"],
        argmax_agreement=result["argmax_agreement"],
        onnx_mib=round((repo / "models/model.onnx").stat().st_size / 2**20, 2),
    )
    # Beside the stage's CPU-to-CPU gate: the same weights on the GPU in fp32 (cuDNN may
    # use TF32) against ONNX Runtime, for information.
    if torch.cuda.is_available() and params["train"]["device"] == "cuda":
        images, _ = load_split(repo, "test")
        model, _ = zoo.load(repo / "models/model.pt")
        model = model.cuda()
        session = ort.InferenceSession(
            str(repo / "models/model.onnx"), providers=["CPUExecutionProvider"]
        )
        diff = 0.0
        with torch.no_grad():
            for x in images.split(2048):
                x = datasets.to_model_input(x)
                onnx_logits = session.run(None, {"images": x.numpy()})[0]
                cuda_logits = model(x.cuda()).float().cpu().numpy()
                diff = max(diff, float(np.abs(onnx_logits - cuda_logits).max()))
        entry["cuda_fp32_vs_onnx_max_abs_diff"] = diff
    if result["max_abs_diff"] > params["export"]["atol"]:
        raise Failed(f"ONNX differs by {result['max_abs_diff']:.3g} > {params['export']['atol']}")


# -- step 9: the gpu-marked tests ---------------------------------------------------------


def gpu_tests(entry: dict[str, Any], runner: Runner, workdir: Path, sizes: Sizes) -> None:
    """`pytest -m gpu` over the test files that hold gpu tests (the others import mlflow)."""
    if importlib.util.find_spec("pytest") is None:
        raise Skip("pytest is not installed here")
    marked = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\s*=.*\bgpu\b)", re.MULTILINE)
    files = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").glob("test_*.py")
        if marked.search(p.read_text())
    )
    entry["files"] = files
    if not files:
        raise Skip("no test is marked gpu")
    junit = workdir / "junit.xml"
    argv = [
        sys.executable, "-m", "pytest", "-m", "gpu", "-o", "addopts=", "--strict-markers",
        "-p", "no:cacheprovider", "-q", "-rs", f"--junitxml={junit}",
        f"--basetemp={workdir / 'pytest'}", *files,
    ]  # fmt: skip
    entry["command"] = shlex.join(["python", *argv[1:]])
    try:
        runner.run(argv, ROOT, sizes.pytest_timeout_s)
    finally:
        if junit.exists():
            suite = ET.parse(junit).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            entry.update(counts)
            reasons = {s.get("message", "") for s in suite.iter("skipped")}
            entry["skip_reasons"] = sorted(reasons)
    if entry.get("tests") and entry["skipped"] == entry["tests"]:
        raise Skip(f"every gpu test skipped itself: {'; '.join(entry['skip_reasons'])}")


# -- step 10: the summary -----------------------------------------------------------------


def summary(entry: dict[str, Any], report: Report, device: str) -> None:
    """Stage over textbook images/s, at batch 64 and each at its fastest batch size."""
    steps = report.data["steps"]
    stage = {k: v for k, v in steps.items() if k.startswith("train ") and v["status"] == "ok"}
    book = {k: v for k, v in steps.items() if k.startswith("textbook ") and v["status"] == "ok"}
    if not stage or not book:
        raise Skip("needs at least one train and one textbook run that succeeded")

    def fastest(runs: dict[str, dict], batch: int | None = None) -> tuple[str, dict] | None:
        chosen = {k: v for k, v in runs.items() if batch is None or v["batch_size"] == batch}
        if not chosen:
            return None
        return max(chosen.items(), key=lambda item: item[1]["images_per_second"])

    pairs = {
        "batch_64": (fastest(stage, 64), fastest(book, 64)),
        "fastest": (fastest(stage), fastest(book)),
    }
    for name, (ours, theirs) in pairs.items():
        if ours is None or theirs is None:
            continue
        (ours_name, ours_run), (their_name, their_run) = ours, theirs
        entry[name] = {
            "stage_run": ours_name,
            "stage_images_per_second": ours_run["images_per_second"],
            "stage_steady_images_per_second": ours_run["steady_images_per_second"],
            "textbook_run": their_name,
            "textbook_images_per_second": their_run["images_per_second"],
            "ratio": round(ours_run["images_per_second"] / their_run["images_per_second"], 2),
            "steady_ratio": round(
                ours_run["steady_images_per_second"] / their_run["images_per_second"], 2
            ),
            "stage_test_accuracy": ours_run["test_accuracy"],
            "textbook_test_accuracy": their_run["test_accuracy"],
            "images_each": their_run["images"],
        }
    entry["target_ratio"] = TARGET_RATIO
    if "fastest" in entry:
        # Held to on a GPU only: on a CPU the net's own arithmetic bounds both loops.
        entry["target_met"] = (
            entry["fastest"]["ratio"] >= TARGET_RATIO if device == "cuda" else None
        )
    report.data["headline"] = {k: entry[k]["ratio"] for k in pairs if k in entry}


# -- the whole check ----------------------------------------------------------------------


def check(device: str, sizes: Sizes, out: Path) -> int:
    """Every step in order; the number of failed steps."""
    report = Report(out, device)
    runner = Runner(out / LOG, cpu_only=device == "cpu")
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    if sizes.threads:
        torch.set_num_threads(sizes.threads)
    try:
        with report.step("environment") as entry:
            environment(entry, device)
        for key in ("python", "torch", "cuda", "gpu", "cpu"):
            report.data[key] = report.data["steps"]["environment"].get(key)
        with report.step("install") as entry:
            install(entry, runner, workdir)
        with report.step("imports") as entry:
            imports(entry, runner, workdir)
        repo = make_workspace(workdir / "repo")
        params = base_params(sizes, device)
        report.data["params"] = {"data": params["data"], "train": params["train"]}
        with report.step("prepare") as entry:
            entry.update(generate_mnist(repo / "data/raw/MNIST/raw", sizes))
            write_params(repo, params)
            runner.run(stage_argv("prepare", params), repo, 300)
            entry["counts"] = json.loads((repo / "data/prepared/meta.json").read_text())["counts"]
        training(report, repo, params, runner, sizes)
        with report.step("nccl") as entry:
            if not report.ok("prepare"):
                raise Skip("prepare failed")
            nccl(entry, repo, params, runner, sizes)
        trained = {
            k.removeprefix("train "): v
            for k, v in report.data["steps"].items()
            if k.startswith("train ") and v["status"] == "ok"
        }
        with report.step("export") as entry:
            if not trained:
                raise Skip("no training run succeeded")
            best = max(trained, key=lambda name: trained[name]["images_per_second"])
            export(entry, best, repo, params, runner)
        with report.step("pytest -m gpu") as entry:
            gpu_tests(entry, runner, workdir, sizes)
        with report.step("summary") as entry:
            summary(entry, report, device)
    finally:
        report.write()
        shutil.rmtree(workdir, ignore_errors=True)
    failed = report.data["failed"]
    log.info(
        "%d steps, %d failed, %.0f s; headline %s; report %s",
        len(report.data["steps"]),
        failed,
        report.elapsed,
        report.data.get("headline"),
        report.file,
    )
    return failed


def training(report: Report, repo: Path, params: dict, runner: Runner, sizes: Sizes) -> None:
    """The train stage and the textbook loop: at batch 64 and at the largest batch first
    (the summary's two comparisons), then the other batches, then compile and
    channels-last off at batch 64 and at the stage's fastest batch."""
    stage_first, *stage_rest = sizes.stage_batches
    book_first, *book_rest = sizes.textbook_batches

    def stage_run(run: Run, optional: bool) -> None:
        with report.step(f"train {run.name}") as entry:
            _guard(report, optional, sizes)
            train_stage(entry, run, repo, params, runner, sizes)

    def textbook_run(batch: int, optional: bool) -> None:
        with report.step(f"textbook b{batch}") as entry:
            _guard(report, optional, sizes)
            textbook(entry, batch, repo, params, sizes)

    stage_run(Run(stage_first), optional=False)
    textbook_run(book_first, optional=False)
    if stage_rest:
        stage_run(Run(stage_rest[-1]), optional=False)
    if book_rest:
        textbook_run(book_rest[-1], optional=False)
    for batch in stage_rest[:-1]:
        stage_run(Run(batch), optional=True)
    for batch in book_rest[:-1]:
        textbook_run(batch, optional=True)
    done = {
        v["batch_size"]: v["images_per_second"]
        for k, v in report.data["steps"].items()
        if k.startswith("train ") and v["status"] == "ok"
    }
    best = max(done, key=done.get) if done else stage_first
    for batch in dict.fromkeys((stage_first, best)):
        for run in (Run(batch, compile=True), Run(batch, channels_last=False)):
            if sizes.variants:
                stage_run(run, optional=True)
                continue
            with report.step(f"train {run.name}"):
                # Inductor's build alone takes minutes on 2 cores; both are GPU settings.
                raise Skip("left out of the CPU dry run: compile and channels-last are for GPUs")


def _guard(report: Report, optional: bool, sizes: Sizes) -> None:
    if not report.ok("prepare"):
        raise Skip("prepare failed")
    if optional and report.elapsed > sizes.budget_s:
        late = f"{report.elapsed:.0f} s past the start"
        raise Skip(f"time budget: optional runs start before {sizes.budget_s:.0f} s, {late}")


# -- --download ---------------------------------------------------------------------------


def download() -> None:
    """The wheels for the device's CPython 3.12 on x86-64 Linux, into .whl/ (one each)."""
    specs = []
    for name in NEEDED:
        try:  # the version this environment runs, so the device validates alike
            specs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            specs.append(name)
    WHEELS.mkdir(exist_ok=True)
    for old in WHEELS.glob("*.whl"):  # two versions of one package stop the install there
        old.unlink()
    argv = [
        sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
        "--python-version", "3.12", "--implementation", "cp",
        *(f"--platform={p}" for p in PLATFORMS), "-d", str(WHEELS), *specs,
    ]  # fmt: skip
    log.info("$ %s", shlex.join(argv))
    subprocess.run(argv, check=True)
    wheels = sorted(WHEELS.glob("*.whl"))
    for wheel in wheels:
        log.info("%8.1f KiB  %s", wheel.stat().st_size / 1024, wheel.name)
    total = sum(w.stat().st_size for w in wheels) / 2**20
    log.info("%d wheels, %.2f MiB in %s (carry .whl)", len(wheels), total, WHEELS)


def main() -> int:
    """Parse the command line; run the check, a worker, or the download."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(SIZES), default="cuda")
    parser.add_argument("--out", help="folder for gpu_check.json and the log (default: $OUT)")
    parser.add_argument("--download", action="store_true", help="fetch the wheels into .whl/")
    parser.add_argument(
        "--budget-s", type=float, help="start optional runs only this long (s) after the start"
    )
    parser.add_argument("--worker", choices=["nccl"], help=argparse.SUPPRESS)
    parser.add_argument("--repo", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.worker:
        nccl_worker(Path(args.repo), Path(args.out))
        return 0
    if args.download:
        download()
        return 0
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / LOG).write_text("")
    handler = logging.FileHandler(out / LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(handler)
    sizes = SIZES[args.device]
    if args.budget_s is not None:
        sizes = dataclasses.replace(sizes, budget_s=args.budget_s)
    return 1 if check(args.device, sizes, out) else 0


if __name__ == "__main__":
    sys.exit(main())
