"""Training throughput of the train stage's loop against the textbook loop, a ceiling and DDP.

Run from the repository root:

    python benchmarks/train_throughput.py [--images 4096] [--repeats 3] [--threads 2]

On MNIST-shaped data (28x28 grey: the MNIST t10k IDX files when found, else synthetic) and
the same `cnn`, optimizer, batch size and thread count, it measures in one process,
interleaved so that a busy machine slows every variant alike:

- textbook: a torchvision-style Dataset returning PIL images, per-sample ToTensor() and
  Normalize(), a DataLoader, the loop of PyTorch's MNIST example;
- stage: the train stage's own code (`stages.train`: uint8 tensors, batched indexing,
  normalization inside the model, the LR schedule, the tqdm bar);
- ceiling: the bare net's forward + backward + step on pre-normalized float tensors, what
  any loop can reach at best;

plus the stage with each train option named in `--also` (compile, channels_last, bf16
autocast), each against the textbook loop too. With the real MNIST files, every loop's
model is then scored on 2,000 t10k images none of them trained on (they all trained on
the same number of images), so a faster loop is seen to learn as well.

And then, in fresh processes through `stages.launch` (torchrun), one process with N
threads against N gloo processes with one thread each, alternately.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from textbook import PilImages
from workspace import copy_tree, cpu_name, run

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages.core.params import Train, load_params  # noqa: E402
from stages.data import datasets, sources  # noqa: E402
from stages.models import zoo  # noqa: E402
from stages.training import dist, engine, optim  # noqa: E402

log = logging.getLogger("benchmark")

MNIST_DIRS = (ROOT.parent / "shared/data/mnist-t10k", ROOT / "data/raw/MNIST/raw")
# Train options the stage can also be measured with (--also): faster, not the default.
OPTIONS = {
    "compile": {"compile": True},
    "channels_last": {"channels_last": True},
    "bf16": {"amp": "bf16"},
}
TARGETS = {
    "stage / ceiling": 0.95,
    "whole stage / cold ceiling": 0.95,
    "ddp / one process": 0.9,
}
# The t10k IDX files: (what, IDX dimensions) as in their names.
FILES = (("images", 3), ("labels", 1))
# The t10k images from here on are held out of training to compare the loops' accuracy.
HELD_OUT_FROM = 8000


# -- data ---------------------------------------------------------------------------------


@functools.cache
def real_mnist() -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """The first MNIST IDX pair found (t10k first), read by the prepare stage's reader."""
    for folder in MNIST_DIRS:
        for prefix in ("t10k", "train"):
            images = folder / f"{prefix}-images-idx3-ubyte.gz"
            labels = folder / f"{prefix}-labels-idx1-ubyte.gz"
            if images.exists() and labels.exists():
                split = sources.read_idx_split(images, labels, 10, hashlib.sha256(), prefix)
                return split.images, split.labels, str(images)
    return None


def mnist_like(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """`count` uint8 N x 1 x 28 x 28 images and labels: real MNIST when found, else noise."""
    real = real_mnist()
    if real is not None:
        x, y, source = real
        reps = -(-count // len(y))  # more images than the file holds: repeat it
        return x.repeat(reps, 1, 1, 1)[:count], y.repeat(reps)[:count], source
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (count, 1, 28, 28), dtype=torch.uint8, generator=gen)
    return x, torch.randint(0, 10, (count,), generator=gen), "synthetic"


def held_out(train_images: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """2,000 real MNIST images the loops never train on (t10k's last 2,000), for accuracy."""
    real = real_mnist()
    if real is None or train_images > HELD_OUT_FROM:
        return None
    x, y, _ = real
    return x[HELD_OUT_FROM : HELD_OUT_FROM + 2000], y[HELD_OUT_FROM : HELD_OUT_FROM + 2000]


def config_for(images: torch.Tensor) -> dict:
    """The model config the train stage would build for these images."""
    mean, std = datasets.channel_stats(images)
    meta = {"channels": 1, "image_size": 28, "classes": [str(i) for i in range(10)]}
    return zoo.model_config("cnn", {**meta, "mean": mean, "std": std})


# -- the three loops ------------------------------------------------------------------------


class Stage:
    """The train stage's loop, built from its own functions, resumable mid-epoch."""

    def __init__(self, images, labels, config, cfg: Train, ctx: dist.Context | None = None):
        from tqdm import tqdm

        self.cfg = cfg
        self.ctx = ctx or dist.Context(0, 1, 0, 1, torch.device("cpu"))
        self.data = engine.Batches(images, labels)
        self.raw = zoo.build(config)
        if cfg.channels_last:
            self.raw = self.raw.to(memory_format=torch.channels_last)
        self.model = model = engine.wrap(self.raw, self.ctx, cfg.compile)
        optimizer = optim.make_optimizer(self.raw, cfg)
        self.sampler = torch.utils.data.DistributedSampler(
            range(len(labels)), self.ctx.world_size, self.ctx.rank, shuffle=True, seed=0
        )
        steps = -(-self.sampler.num_samples // cfg.batch_size)
        scheduler = optim.make_scheduler(optimizer, cfg, steps)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        autocast = engine.autocast_for(self.ctx.device, engine.amp_dtype(cfg, self.ctx.device))
        self.step = engine.make_step(model, self.raw, optimizer, scheduler, scaler, cfg, autocast)
        self.epoch, self.order = 0, []
        # A real bar, updated as rank 0 of the stage updates it, only drawn nowhere.
        self.sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the loop
        self.bar = tqdm(file=self.sink, mininterval=1.0, disable=not self.ctx.is_main)

    def run(self, limit: int | None = None) -> int:
        """The next `limit` images (default: the rest of the epoch); images of all ranks."""
        if not self.order:
            self.epoch += 1
            self.sampler.set_epoch(self.epoch)
            self.order = list(self.sampler)
        take = self.order if limit is None else self.order[:limit]
        self.order = self.order[len(take) :]
        totals = engine.train_epoch(self.model, self.data, take, self.step, self.cfg, self.bar)
        return int(dist.all_reduce_sum(totals)[2])

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The trained model's outputs for uint8 images (normalization is in the model)."""
        return self.raw(datasets.to_model_input(images))


class Textbook:
    """PyTorch's MNIST example: PIL images, per-sample transforms, a DataLoader."""

    def __init__(self, images, labels, config, cfg: Train):
        from torchvision import transforms

        transform = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(config["mean"], config["std"])]
        )
        dataset = PilImages(images, labels, transform)
        self.mean, self.std = config["mean"][0], config["std"][0]
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True)
        self.batches = enumerate(self.loader)
        self.model = zoo.ZOO["cnn"][0](1, 28, 10)
        self.optimizer = optim.make_optimizer(self.model, cfg)

    def run(self, limit: int | None = None) -> int:
        """The next `limit` images (default: the rest of the epoch); images trained on."""
        self.model.train()
        seen = 0
        while limit is None or seen < limit:
            try:
                batch_idx, (data, target) = next(self.batches)
            except StopIteration:  # end of an epoch: the example's next `for` loop
                self.batches = enumerate(self.loader)
                if limit is None:
                    break
                continue
            self.optimizer.zero_grad()
            loss = F.cross_entropy(self.model(data), target)
            loss.backward()
            self.optimizer.step()
            if batch_idx % 10 == 0:  # the example's log_interval
                loss.item()
            seen += len(target)
        return seen

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The trained net's outputs for uint8 images, normalized as ToTensor+Normalize do."""
        return self.model((images.float() / 255 - self.mean) / self.std)


class Ceiling:
    """Only the net's own work: forward, backward, step on ready float batches."""

    def __init__(self, images, labels, config, cfg: Train):
        self.mean, self.std = mean, std = config["mean"][0], config["std"][0]
        gen = torch.Generator().manual_seed(0)
        order = torch.randperm(len(labels), generator=gen)
        self.x = ((images[order].float() / 255 - mean) / std).contiguous()
        self.y = labels[order].contiguous()
        self.batch_size = cfg.batch_size
        self.position = 0
        self.model = zoo.ZOO["cnn"][0](1, 28, 10)
        self.optimizer = optim.make_optimizer(self.model, cfg)

    def run(self, limit: int | None = None) -> int:
        """The next `limit` images, batch after batch, round and round; images trained on."""
        n = len(self.y) if limit is None else limit
        self.model.train()
        seen = 0
        while seen < n:
            if self.position >= len(self.y):
                self.position = 0
            end = self.position + self.batch_size
            x, y = self.x[self.position : end], self.y[self.position : end]
            self.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(x), y).backward()
            self.optimizer.step()
            seen += len(y)
            self.position = end
        return seen

    logits = Textbook.logits


def measure(loops: dict, images: int, chunk: int, repeats: int) -> dict[str, list[float]]:
    """img/s of each loop per repeat, the loops taking turns every `chunk` images.

    Fine-grained turns make a burst of load from other programs hit every loop alike, so
    the ratios stay meaningful on a shared machine even when the absolute numbers do not.
    """
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(repeats):
        seconds = dict.fromkeys(loops, 0.0)
        seen = dict.fromkeys(loops, 0)
        for _ in range(max(images // chunk, 1)):
            for name, loop in loops.items():
                started = time.perf_counter()
                seen[name] += loop.run(chunk)
                seconds[name] += time.perf_counter() - started
        for name in loops:
            rates[name].append(seen[name] / seconds[name])
        log.info(
            "repeat %d/%d: %s",
            r + 1,
            repeats,
            ", ".join(f"{name} {values[-1]:.1f}" for name, values in rates.items()),
        )
    return rates


@torch.no_grad()
def accuracy(loop, images: torch.Tensor, labels: torch.Tensor) -> float:
    """A loop's model, as trained during the measurement, on images it never saw."""
    model = loop.raw if isinstance(loop, Stage) else loop.model
    model.eval()
    right = sum(
        int((loop.logits(x).argmax(1) == y).sum())
        for x, y in zip(images.split(500), labels.split(500), strict=True)
    )
    return right / len(labels)


def timed(loop, limit: int | None = None) -> float:
    """Images per second of one run of a loop."""
    started = time.perf_counter()
    seen = loop.run(limit)
    return seen / (time.perf_counter() - started)


def train_cfg(batch_size: int) -> Train:
    """params.yaml's train section with this benchmark's batch size and AMP off."""
    return load_params(ROOT / "params.yaml").train.model_copy(
        update={"batch_size": batch_size, "amp": "off", "augment_shift": 0}
    )


# -- DDP ----------------------------------------------------------------------------------


def ddp_worker(args: argparse.Namespace) -> None:
    """Inside torchrun: the stage's loop for `--epochs` epochs; rank 0 writes img/s."""
    ctx = dist.setup("cpu", args.threads)
    cfg = train_cfg(args.batch_size)
    engine.seed_everything(0, cfg.deterministic, cfg.compile)
    images, labels, _ = mnist_like(args.images, 0)
    loop = Stage(images, labels, config_for(images), cfg, ctx)
    loop.run()  # warm-up (oneDNN primitives, gloo buffers): an untimed first epoch
    rates = [timed(loop) for _ in range(args.epochs)]
    if ctx.is_main:
        Path(args.out).write_text(json.dumps({"world_size": ctx.world_size, "rates": rates}))
    dist.teardown()


def launch(procs: int, threads: int, batch_size: int, args: argparse.Namespace) -> list[float]:
    """Run ddp_worker under stages.launch; the img/s of each of its epochs."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rates.json"
        command = [
            sys.executable, "-m", "stages.launch", "--standalone", f"--nproc-per-node={procs}",
            __file__, "--ddp-worker", f"--out={out}", f"--threads={threads}",
            f"--batch-size={batch_size}", f"--images={args.images}", "--epochs=1",
        ]  # fmt: skip
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())["rates"]


# -- the whole train stage, as `dvc repro` runs it --------------------------------------


def stage_repo(tmp: Path, args: argparse.Namespace) -> tuple[Path, str]:
    """A copy of this repository with MNIST prepared (t10k as 8,000 / 2,000), MLflow on."""
    repo = copy_tree(tmp / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    source = "digits (no MNIST files found)"
    for folder in MNIST_DIRS:
        images, labels = (folder / f"t10k-{kind}-idx{n}-ubyte.gz" for kind, n in FILES)
        if images.exists() and labels.exists():
            raw = repo / "data/raw/MNIST/raw"
            raw.mkdir(parents=True, exist_ok=True)
            for file, (kind, n) in zip((images, labels), FILES, strict=True):
                shutil.copyfile(file, raw / f"train-{kind}-idx{n}-ubyte.gz")
            params["data"]["source"] = "mnist"
            source = f"MNIST t10k from {folder}"
            break
    params["train"].update(epochs=args.stage_epochs, batch_size=args.batch_size)
    params["runtime"]["threads"] = args.threads
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([sys.executable, "-m", "stages", "prepare"], repo)
    return repo, source


def whole_stage(repo: Path) -> float:
    """images_per_second of metrics/train.json after the train stage ran from scratch."""
    (repo / "models/checkpoint.pt").unlink(missing_ok=True)
    launch = ["-m", "stages.launch", "--standalone", "--nproc-per-node=1"]
    run([sys.executable, *launch, "-m", "stages", "train"], repo)  # as dvc.yaml runs it
    return json.loads((repo / "metrics/train.json").read_text())["images_per_second"]


def cold_ceiling(repo: Path, args: argparse.Namespace) -> float:
    """The bare net on the same prepared images and epochs, in a fresh process like the stage."""
    out = repo / "ceiling.json"
    command = [
        sys.executable, __file__, "--ceiling-worker", f"--out={out}", f"--threads={args.threads}",
        f"--batch-size={args.batch_size}", f"--epochs={args.stage_epochs}",
    ]  # fmt: skip
    run(command, repo)
    return json.loads(out.read_text())["rate"]


def ceiling_worker(args: argparse.Namespace) -> None:
    """In a fresh process in the repo: img/s of the bare net from its first step on."""
    torch.set_num_threads(args.threads)
    split = datasets.load_split("train")
    cfg = train_cfg(args.batch_size)
    # the kernels the stage (and main()) runs
    engine.seed_everything(0, cfg.deterministic, cfg.compile)
    loop = Ceiling(split.images, split.labels, config_for(split.images), cfg)
    rate = timed(loop, args.epochs * len(split.labels))
    Path(args.out).write_text(json.dumps({"rate": rate}))


# -- report -------------------------------------------------------------------------------


def pair(a: list[float], b: list[float]) -> list[float]:
    """Ratios of runs made side by side (repeat i of a over repeat i of b)."""
    return [x / y for x, y in zip(a, b, strict=True)]


def spread(values: list[float]) -> str:
    """median (min..max) of a list of numbers."""
    return f"{statistics.median(values):8.1f} ({min(values):.1f}..{max(values):.1f})"


def ratio_line(name: str, ratios: list[float]) -> str:
    """A paired ratio's median, range and target."""
    # The stage with an option (stage+bf16) is held to the stage's own target.
    target = TARGETS.get(name.split(" ", 1)[0].split("+")[0] + " " + name.split(" ", 1)[1])
    verdict = ""
    if target is not None:
        verdict = (
            f"target >= {target}: {'met' if statistics.median(ratios) >= target else 'MISSED'}"
        )
    low, high = min(ratios), max(ratios)
    return f"{name:<22} {statistics.median(ratios):6.3f} ({low:.3f}..{high:.3f})  {verdict}"


def main() -> None:
    """Measure, interleaved, and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096, help="images per timed epoch")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per variant")
    parser.add_argument("--chunk", type=int, default=128, help="images per turn of a loop")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--no-ddp", action="store_true", help="skip the DDP comparison")
    parser.add_argument(
        "--stage-epochs", type=int, default=2, help="epochs of the whole-stage runs (0: none)"
    )
    parser.add_argument(
        "--also",
        default="",
        help="comma-separated train options to measure the stage with as well: "
        + ", ".join(OPTIONS),
    )
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ceiling-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        ddp_worker(args)
        return
    if args.ceiling_worker:
        ceiling_worker(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    torch.set_num_threads(args.threads)
    cfg = train_cfg(args.batch_size)
    engine.seed_everything(0, cfg.deterministic, cfg.compile)
    images, labels, source = mnist_like(args.images, 0)
    config = config_for(images)
    variants = {"textbook": (Textbook, cfg), "stage": (Stage, cfg), "ceiling": (Ceiling, cfg)}
    for option in filter(None, args.also.split(",")):
        if option not in OPTIONS:
            parser.error(f"--also: {option!r} is not one of {', '.join(OPTIONS)}")
        variants[f"stage+{option}"] = (Stage, cfg.model_copy(update=OPTIONS[option]))
    loops = {}
    for name, (kind, variant_cfg) in variants.items():
        torch.manual_seed(0)  # the same initial weights in every loop
        loops[name] = kind(images, labels, config, variant_cfg)
    for loop in loops.values():  # warm-up: oneDNN primitives, allocator, first calls
        loop.run(limit=args.batch_size * 4)
    rates = measure(loops, args.images, args.chunk, args.repeats)
    # Every loop has now trained on the same number of images: compare what they learnt.
    test = held_out(args.images)
    scores = {name: accuracy(loop, *test) for name, loop in loops.items()} if test else {}

    ddp: dict[str, list[float]] = {}
    if not args.no_ddp:
        procs = args.threads
        # Same global batch, so both train the same way: N processes x batch/N.
        single_name = f"1 process x {procs} threads"
        multi_name = f"{procs} gloo processes x 1 thread"
        ddp = {single_name: [], multi_name: []}
        for r in range(args.repeats):
            ddp[single_name] += launch(1, procs, args.batch_size, args)
            ddp[multi_name] += launch(procs, 1, args.batch_size // procs, args)
            log.info(
                "repeat %d/%d: %s %.1f, %s %.1f img/s",
                r + 1, args.repeats, single_name, ddp[single_name][-1],
                multi_name, ddp[multi_name][-1],
            )  # fmt: skip

    whole: dict[str, list[float]] = {}
    if args.stage_epochs:
        with tempfile.TemporaryDirectory() as tmp:
            repo, stage_source = stage_repo(Path(tmp), args)
            whole = {"whole stage": [], "cold ceiling": []}
            for r in range(args.repeats):
                whole["whole stage"].append(whole_stage(repo))
                whole["cold ceiling"].append(cold_ceiling(repo, args))
                log.info(
                    "repeat %d/%d: whole stage %.1f, cold ceiling %.1f img/s",
                    r + 1, args.repeats, whole["whole stage"][-1], whole["cold ceiling"][-1],
                )  # fmt: skip

    ratios = {
        "stage / textbook": pair(rates["stage"], rates["textbook"]),
        **{
            f"{name} / textbook": pair(rates[name], rates["textbook"])
            for name in rates
            if name.startswith("stage+")
        },
        "stage / ceiling": pair(rates["stage"], rates["ceiling"]),
        # The most any loop can gain over the textbook one on this machine and net.
        "ceiling / textbook": pair(rates["ceiling"], rates["textbook"]),
    }
    if ddp:
        single, multi = ddp.values()
        ratios["ddp / one process"] = pair(multi, single)
    if whole:
        ratios["whole stage / cold ceiling"] = pair(*whole.values())

    print(f"\ndata: {source}, {args.images} images/epoch, batch {args.batch_size}, "
          f"{args.threads} threads, {args.repeats} repeats, torch {torch.__version__}")  # fmt: skip
    held = f"held-out accuracy ({len(test[1])} images)" if test else "(no held-out images)"
    print(f"{'loop':<32} {'img/s median (min..max)':>28}  {held}")
    names = {
        "textbook": "textbook (PIL + DataLoader)",
        "stage": "train stage (stages.train)",
        "ceiling": "ceiling (bare net, tensors)",
    }
    for name, values in rates.items():
        score = f"{scores[name]:.4f}" if name in scores else ""
        print(f"{names.get(name, name):<32} {spread(values):>28}  {score}")
    for name, values in ddp.items():
        print(f"{name:<32} {spread(values):>28}")
    if whole:
        print(
            f"\nthe whole train stage (python -m stages.launch ... -m stages train, MLflow on, "
            f"{args.stage_epochs} epochs of {stage_source}) against the bare net on the same "
            "images in a fresh process, each timed from its first step:"
        )
        for name, values in whole.items():
            print(f"{name:<32} {spread(values):>28}")
    print(f"\n{'ratio':<22} median (min..max)")
    for name, values in ratios.items():
        print(ratio_line(name, values))
    print(cpu_name())
    if args.json:
        numbers = {"rates": rates, "ddp": ddp, "whole": whole, "ratios": ratios}
        numbers["accuracy"] = scores
        Path(args.json).write_text(json.dumps(numbers))


if __name__ == "__main__":
    main()
