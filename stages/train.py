"""Stage train: one code path for one CPU, one GPU or many processes (torchrun + DDP)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from stages import datasets, dist, logs, models, paths, plots, sweep, tracking
from stages.errors import StageError
from stages.outputs import load_torch, save_torch, write_csv, write_json
from stages.params import Params, Train, load_params

# The code that defines the training math: a checkpoint written by other code is stale.
CHECKPOINT_CODE = ("train.py", "models.py", "dist.py", "datasets.py")

StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Batches:
    """A split held as tensors on the training device (uint8 images, int64 labels)."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def on(cls, split: datasets.Split, device: torch.device) -> Batches:
        return cls(split.images.to(device), split.labels.to(device))

    def __len__(self) -> int:
        return len(self.labels)


def seed_everything(seed: int, deterministic: bool, compile: bool) -> None:
    """Seed Python, NumPy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        if compile:  # tells Inductor too, which it imports (torch.compile does anyway)
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            # The same switch for eager kernels, without importing Inductor as
            # use_deterministic_algorithms does in torch 2.14: about 1 s of a training.
            torch.set_deterministic_debug_mode("warn")
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def amp_dtype(cfg: Train, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA by default, nothing on CPU unless asked."""
    if cfg.amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if cfg.amp == "off":
        return None
    if cfg.amp == "fp16" and device.type != "cuda":
        raise StageError("train.amp: fp16 needs a CUDA device; use bf16 or off on the CPU")
    return torch.float16 if cfg.amp == "fp16" else torch.bfloat16


def autocast_for(device: torch.device, dtype: torch.dtype | None) -> Callable[[], Any]:
    """A factory of autocast contexts (a no-op one when AMP is off)."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def make_optimizer(model: nn.Module, cfg: Train) -> torch.optim.Optimizer:
    """The optimizer named in params."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    if cfg.optimizer == "adadelta":
        return torch.optim.Adadelta(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: Train, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr at an optimizer step: linear warm-up, then the schedule."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_epochs)
    total = max(cfg.epochs * steps_per_epoch - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, total) / total))


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Train, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up plus the schedule in params, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch)
    )


def shift(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Random translations of up to max_shift pixels, per image, as one batched gather."""
    n, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n, 1), device=images.device)
    dx = torch.randint(0, 2 * max_shift + 1, (n, 1), device=images.device)
    rows = (torch.arange(h, device=images.device) + dy)[:, None, :, None]
    cols = (torch.arange(w, device=images.device) + dx)[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    chan = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def wrap(raw_model: nn.Module, ctx: dist.Context, compile: bool) -> nn.Module:
    """The module the training steps call: DDP around it when distributed, compiled if asked."""
    model = raw_model
    if ctx.distributed:
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in raw_model.modules())
        model = DistributedDataParallel(
            raw_model,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            # Only batch-norm statistics need rank 0's copy before each forward.
            broadcast_buffers=has_bn,
            # Gradients live in the all-reduce buckets: no copy in and out each step.
            gradient_as_bucket_view=True,
        )
    return torch.compile(model) if compile else model


def make_step(
    model: nn.Module,
    raw_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    cfg: Train,
    autocast: Callable[[], Any],
) -> StepFn:
    """One optimizer step on a float batch; returns the (undetached) loss and the logits."""

    def step(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            # DDP has already averaged the gradients, so every rank clips the same norm.
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        return loss, logits

    return step


def train_epoch(
    model: nn.Module, data: Batches, order: list[int], step_fn: StepFn, cfg: Train, bar: tqdm
) -> torch.Tensor:
    """One pass over this rank's share; returns [loss sum, correct, count] as a tensor."""
    model.train()
    device = data.labels.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    index = torch.as_tensor(order, device=device)
    # Reading the loss forces a device sync: do it only as often as the bar redraws.
    shown = time.monotonic()
    for start in range(0, len(index), cfg.batch_size):
        batch = index[start : start + cfg.batch_size]
        images = data.images[batch]
        if cfg.augment_shift:
            images = shift(images, cfg.augment_shift)
        labels = data.labels[batch]
        loss, logits = step_fn(datasets.to_model_input(images), labels)
        # Summed on the device, no .item() per step: a GPU never waits for the host.
        totals[0] += loss.detach().double() * len(batch)
        totals[1] += (logits.argmax(1) == labels).sum()
        totals[2] += len(batch)
        if not bar.disable and time.monotonic() - shown >= bar.mininterval:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            shown = time.monotonic()
        bar.update(len(batch))
    return totals


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Batches, ctx: dist.Context, batch_size: int, autocast
) -> tuple[float, float, int]:
    """Loss and accuracy over every sample exactly once, split across ranks, no padding."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=data.labels.device)
    mine = torch.as_tensor(list(dist.shard(len(data), ctx)), device=data.labels.device)
    for start in range(0, len(mine), batch_size):
        batch = mine[start : start + batch_size]
        with autocast():
            logits = model(datasets.to_model_input(data.images[batch]))
        labels = data.labels[batch]
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        totals[1] += (logits.argmax(1) == labels).sum()
        totals[2] += len(batch)
    loss_sum, correct, count = dist.all_reduce_sum(totals).tolist()
    return loss_sum / max(count, 1), correct / max(count, 1), int(count)


def rng_state() -> dict[str, Any]:
    """This process's random generators, for a bit-identical resume (tensors and numbers)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        # As a tensor, so the checkpoint loads with torch.load(weights_only=True).
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() saved."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_key(params: Params, meta: dict[str, Any], world_size: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: training params, code, data, world size."""
    code = hashlib.sha256()
    for name in CHECKPOINT_CODE:
        code.update((Path(__file__).parent / name).read_bytes())
    return {
        "params": params.digest("seed", "model", "train"),
        "code": code.hexdigest()[:16],
        "data": meta["digest"],
        "world_size": world_size,
    }


def stale_reason(found: Any, key: dict[str, Any]) -> str | None:
    """Why a checkpoint's key does not match this run (None when it does)."""
    if not isinstance(found, dict) or set(found) != set(key):
        return "an older version of the train stage"
    if found["params"] != key["params"]:
        return "other seed/model/train params"
    if found["code"] != key["code"]:
        return "other training code (stages/ changed)"
    if found["data"] != key["data"]:
        return "other prepared data"
    if found["world_size"] != key["world_size"]:
        return f"{found['world_size']} process(es) (this run has {key['world_size']})"
    return None


def load_checkpoint(key: dict[str, Any], resume: bool, log: logging.Logger) -> dict | None:
    """The checkpoint in models/ if resuming is on and it was written by this same training."""
    if not paths.CHECKPOINT.exists():
        return None
    if not resume:
        log.info("runtime.resume is false: ignoring %s, training from scratch", paths.CHECKPOINT)
        return None
    try:
        ckpt = load_torch(paths.CHECKPOINT, "a training checkpoint")
    except StageError as exc:
        log.warning("%s; training from scratch", exc)
        return None
    reason = stale_reason(ckpt.get("key"), key)
    if reason is not None:
        log.info(
            "%s was written with %s; ignoring it and training from scratch",
            paths.CHECKPOINT,
            reason,
        )
        return None
    return ckpt


@dataclass
class Job:
    """What one training process works with: its data, model and optimizer state."""

    cfg: Train
    config: dict[str, Any]
    train_data: Batches
    val_data: Batches
    raw_model: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    sampler: DistributedSampler
    step: StepFn
    autocast: Callable[[], Any]


def setup(params: Params, meta: dict[str, Any], ctx: dist.Context) -> Job:
    """The data on the training device, the model (DDP when distributed) and its optimizer."""
    cfg = params.train
    config = models.model_config(params.model.name, meta)
    train_data = Batches.on(datasets.load_split("train"), ctx.device)
    val_data = Batches.on(datasets.load_split("val"), ctx.device)
    dtype = amp_dtype(cfg, ctx.device)
    autocast = autocast_for(ctx.device, dtype)
    raw_model = models.build(config).to(ctx.device)
    if cfg.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(raw_model, cfg)
    # Pads this rank's share up to the same length on every rank (at most world_size - 1
    # repeats): DDP needs every rank to take the same number of steps.
    sampler = DistributedSampler(
        range(len(train_data)),
        num_replicas=ctx.world_size,
        rank=ctx.rank,
        shuffle=True,
        seed=params.seed,
    )
    steps_per_epoch = math.ceil(sampler.num_samples / cfg.batch_size)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=dtype == torch.float16)
    model = wrap(raw_model, ctx, cfg.compile)
    step = make_step(model, raw_model, optimizer, scheduler, scaler, cfg, autocast)
    return Job(
        cfg, config, train_data, val_data, raw_model, model, optimizer, scheduler, scaler,
        sampler, step, autocast,
    )  # fmt: skip


def restore(job: Job, ckpt: dict[str, Any], rank: int) -> list[dict[str, float]]:
    """Load a checkpoint's state into the job; the history of the epochs it had done."""
    job.raw_model.load_state_dict(ckpt["model"])
    job.optimizer.load_state_dict(ckpt["optimizer"])
    job.scheduler.load_state_dict(ckpt["scheduler"])
    job.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][rank])
    return ckpt["history"]


def run_epoch(job: Job, epoch: int, ctx: dist.Context) -> dict[str, float]:
    """Train one epoch, then score the validation split; the epoch's history row."""
    cfg = job.cfg
    job.sampler.set_epoch(epoch)
    order = list(job.sampler)
    # Each rank counts its own images; unit_scale shows the global count and rate.
    bar = tqdm(
        total=len(order),
        desc=f"epoch {epoch}/{cfg.epochs}",
        unit="img",
        disable=not ctx.is_main,
        file=sys.stderr,
        leave=False,
        mininterval=1.0,
        unit_scale=ctx.world_size,
    )
    started = time.perf_counter()
    totals = train_epoch(job.model, job.train_data, order, job.step, cfg, bar)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    seconds = time.perf_counter() - started
    bar.close()
    loss_sum, correct, count = dist.all_reduce_sum(totals).tolist()
    # Batch-norm statistics are each rank's own after its last forward: take rank 0's,
    # the ones saved, so that every rank evaluates (and resumes) the same model.
    dist.broadcast_buffers(job.raw_model)
    val_loss, val_acc, val_count = evaluate(
        job.raw_model, job.val_data, ctx, 4 * cfg.batch_size, job.autocast
    )
    return {
        "epoch": epoch,
        "train_loss": loss_sum / count,
        "train_accuracy": correct / count,
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "lr": job.scheduler.get_last_lr()[0],
        # Images of all ranks over rank 0's wall time (DDP keeps ranks in step).
        "images_per_second": count / seconds,
        "seconds": seconds,
        "train_images": int(count),
        "val_images": val_count,
    }


def save_checkpoint(job: Job, history: list, key: dict, run_key: str, rngs: list) -> None:
    """models/checkpoint.pt: everything a killed run needs to go on bit-identically."""
    save_torch(
        {
            "key": key,
            "run_key": run_key,
            "epoch": history[-1]["epoch"],
            "model": job.raw_model.state_dict(),
            "optimizer": job.optimizer.state_dict(),
            "scheduler": job.scheduler.state_dict(),
            "scaler": job.scaler.state_dict(),
            "rng": rngs,
            "history": history,
        },
        paths.CHECKPOINT,
    )


def pruned_here(pruning: sweep.Pruning | None, row: dict[str, float], ctx: dist.Context) -> bool:
    """In a sweep's trial: whether its pruner ends training after this epoch (rank 0
    asks the study, every rank hears the answer); a trial whose sweep died stops."""
    if not sweep.in_trial():
        return False
    stop = pruning.should_stop(row) if pruning is not None else False
    return bool(dist.all_reduce_sum(torch.tensor([float(stop)], device=ctx.device)).item())


def final_metrics(history: list[dict[str, float]], pruned: bool) -> dict[str, float]:
    """metrics/train.json: the last epoch's scores and the whole run's throughput (and, in
    a sweep's trial, whether its pruner stopped it)."""
    last = history[-1]
    seconds = sum(row["seconds"] for row in history)
    images = sum(row["train_images"] for row in history)
    trial = {"pruned": pruned} if sweep.in_trial() else {}
    return {
        **trial,
        "val_accuracy": last["val_accuracy"],
        "val_loss": last["val_loss"],
        "train_accuracy": last["train_accuracy"],
        "train_loss": last["train_loss"],
        "images_per_second": images / seconds,
        "train_seconds": seconds,
    }


def write_outputs(job: Job, history: list, run_key: str, pruned: bool) -> dict[str, float]:
    """The model, metrics, history and curves, and the run key (rank 0 only)."""
    metrics = final_metrics(history, pruned)
    save_torch({"config": job.config, "state_dict": job.raw_model.state_dict()}, paths.MODEL)
    write_json(paths.TRAIN_METRICS, metrics)
    write_csv(paths.TRAIN_HISTORY, history)
    plots.save_history(history, paths.TRAIN_CURVES)
    write_json(paths.RUN_ID, {"run_key": run_key})
    return metrics


def main(params: Params) -> None:
    """Train `model.name` on the prepared data; write the model, metrics and history."""
    ctx = dist.setup(params.train.device, params.runtime.threads)
    log = logs.setup("train", ctx.rank)
    seed_everything(params.seed, params.train.deterministic, params.train.compile)
    meta = datasets.load_meta()
    key = checkpoint_key(params, meta, ctx.world_size)
    ckpt = load_checkpoint(key, params.runtime.resume, log)
    run_key = ckpt["run_key"] if ckpt else tracking.new_run_key()
    recorder = None
    if ctx.is_main:  # started first: it opens the MLflow run while this process sets up
        recorder = tracking.Recorder(
            "train", params, run_key, world_size=ctx.world_size, device=str(ctx.device)
        )
    with tracking.maybe(recorder):
        job = setup(params, meta, ctx)
        history = restore(job, ckpt, ctx.rank) if ckpt else []
        if history:
            log.info("resuming from epoch %d of %d", history[-1]["epoch"], params.train.epochs)
        if recorder is not None:
            recorder.ready()  # its start-up never competes with training steps
            for row in history:  # epochs a kill left unlogged (it skips the others)
                recorder.log_epoch(row)
        pruning = sweep.Pruning.from_env(params, ctx.is_main)  # a sweep's trial reports
        pruned = False
        for epoch in range(len(history) + 1, params.train.epochs + 1):
            history.append(run_epoch(job, epoch, ctx))
            rngs = dist.gather(rng_state())
            if ctx.is_main:
                save_checkpoint(job, history, key, run_key, rngs)
                recorder.log_epoch(history[-1])
                log_epoch(log, history[-1], params.train.epochs)
            if epoch < params.train.epochs and pruned_here(pruning, history[-1], ctx):
                log.info("the sweep's pruner stopped this trial after epoch %d", epoch)
                pruned = True
                break
        if ctx.is_main:
            metrics = write_outputs(job, history, run_key, pruned)
            log.info(
                "trained %d epochs on %d process(es): val accuracy %.4f, %.0f img/s",
                len(history),
                ctx.world_size,
                metrics["val_accuracy"],
                metrics["images_per_second"],
            )
    dist.teardown()


def log_epoch(log: logging.Logger, row: dict[str, float], epochs: int) -> None:
    """One line per epoch in the stage's log."""
    log.info(
        "epoch %d/%d: loss %.4f, val loss %.4f, val accuracy %.4f, %.0f img/s",
        row["epoch"],
        epochs,
        row["train_loss"],
        row["val_loss"],
        row["val_accuracy"],
        row["images_per_second"],
    )


if __name__ == "__main__":
    main(load_params())
