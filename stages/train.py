"""Stage train: one code path for one CPU, one GPU or many processes (torchrun + DDP)."""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from stages import datasets, dist, logs, models, paths, plots, tracking
from stages.errors import StageError
from stages.outputs import save_torch, write_csv, write_json
from stages.params import Params, Train, load_params


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


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
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


def train_epoch(model, data: Batches, order: list[int], step_fn, cfg: Train, bar) -> torch.Tensor:
    """One pass over this rank's share; returns [loss sum, correct, count] as a tensor."""
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=data.labels.device)
    index = torch.as_tensor(order, device=data.labels.device)
    for start in range(0, len(index), cfg.batch_size):
        batch = index[start : start + cfg.batch_size]
        images = data.images[batch]
        if cfg.augment_shift:
            images = shift(images, cfg.augment_shift)
        labels = data.labels[batch]
        loss, logits = step_fn(datasets.to_model_input(images), labels)
        totals[0] += loss.detach().double() * len(batch)
        totals[1] += (logits.argmax(1) == labels).sum()
        totals[2] += len(batch)
        bar.update(len(batch))
    return totals


@torch.no_grad()
def evaluate(model, data: Batches, ctx: dist.Context, batch_size: int, autocast) -> tuple:
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
    """This process's random generators, for a bit-identical resume."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_key(params: Params, meta: dict[str, Any], world_size: int) -> str:
    """What a checkpoint must match to be resumed: training params, data, world size."""
    return params.digest("seed", "model", "train") + f"-{meta['digest'][:16]}-w{world_size}"


def load_checkpoint(key: str, log) -> dict[str, Any] | None:
    """The checkpoint in models/ if it was written by these same params, else None."""
    if not paths.CHECKPOINT.exists():
        return None
    try:
        ckpt = torch.load(paths.CHECKPOINT, map_location="cpu", weights_only=False)
    except Exception as exc:
        log.warning("%s: unreadable (%s); training from scratch", paths.CHECKPOINT, exc)
        return None
    if ckpt.get("key") != key:
        log.info(
            "%s was written with other params or data; ignoring it and training from scratch",
            paths.CHECKPOINT,
        )
        return None
    return ckpt


def main(params: Params) -> None:
    """Train `model.name` on the prepared data; write the model, metrics and history."""
    cfg = params.train
    ctx = dist.setup(cfg.device, cfg.threads)
    log = logs.setup("train", ctx.rank)
    seed_everything(params.seed, cfg.deterministic)
    meta = datasets.load_meta()
    config = models.model_config(params.model.name, meta)
    train_data = Batches.on(datasets.load_split("train"), ctx.device)
    val_data = Batches.on(datasets.load_split("val"), ctx.device)
    dtype = amp_dtype(cfg, ctx.device)
    tracker = tracking.Tracker(params.mlflow, "train") if ctx.is_main else None

    raw_model = models.build(config).to(ctx.device)
    if cfg.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(raw_model, cfg)
    sampler = DistributedSampler(
        range(len(train_data)),
        num_replicas=ctx.world_size,
        rank=ctx.rank,
        shuffle=True,
        seed=params.seed,
    )
    steps_per_epoch = math.ceil(sampler.num_samples / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch)
    )
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=dtype == torch.float16)

    key = checkpoint_key(params, meta, ctx.world_size)
    ckpt = load_checkpoint(key, log) if cfg.resume else None
    history: list[dict[str, float]] = []
    start_epoch, run_id = 1, None
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"][ctx.rank])
        history, run_id = ckpt["history"], ckpt.get("run_id")
        start_epoch = ckpt["epoch"] + 1
        log.info("resuming from epoch %d of %d (%s)", ckpt["epoch"], cfg.epochs, paths.CHECKPOINT)

    model: nn.Module = raw_model
    if ctx.distributed:
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in raw_model.modules())
        model = DistributedDataParallel(
            raw_model,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            broadcast_buffers=has_bn,
        )
    if cfg.compile:
        model = torch.compile(model)

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(ctx.device.type, dtype=dtype)

    def step(images: torch.Tensor, labels: torch.Tensor):
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        return loss, logits

    with tracking.maybe(tracker):
        if tracker is not None:
            open_run(tracker, run_id, params, meta, ctx, cfg, history)
        train_seconds = sum(row["seconds"] for row in history)
        for epoch in range(start_epoch, cfg.epochs + 1):
            sampler.set_epoch(epoch)
            order = list(sampler)
            bar = tqdm(
                total=len(order) * ctx.world_size,
                desc=f"epoch {epoch}/{cfg.epochs}",
                unit="img",
                disable=not ctx.is_main,
                file=sys.stderr,
                leave=False,
                mininterval=1.0,
                unit_scale=ctx.world_size,
            )
            started = time.perf_counter()
            totals = train_epoch(model, train_data, order, step, cfg, bar)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            seconds = time.perf_counter() - started
            bar.close()
            loss_sum, correct, count = dist.all_reduce_sum(totals).tolist()
            val_loss, val_acc, _ = evaluate(model, val_data, ctx, 4 * cfg.batch_size, autocast)
            row = {
                "epoch": epoch,
                "train_loss": loss_sum / count,
                "train_accuracy": correct / count,
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "lr": scheduler.get_last_lr()[0],
                "images_per_second": count / seconds,
                "seconds": seconds,
            }
            history.append(row)
            train_seconds += seconds
            rngs = dist.gather(rng_state())
            if ctx.is_main:
                save_torch(
                    {
                        "key": key,
                        "epoch": epoch,
                        "model": raw_model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "rng": rngs,
                        "history": history,
                        "run_id": tracker.run_id if tracker else None,
                    },
                    paths.CHECKPOINT,
                )
                log.info(
                    "epoch %d/%d: loss %.4f, val loss %.4f, val accuracy %.4f, %.0f img/s",
                    epoch,
                    cfg.epochs,
                    row["train_loss"],
                    val_loss,
                    val_acc,
                    row["images_per_second"],
                )
                if tracker is not None:
                    tracker.log_metrics(epoch_metrics(row), step=epoch)

        if ctx.is_main:
            last = history[-1]
            images_seen = sum(r["images_per_second"] * r["seconds"] for r in history)
            metrics = {
                "train_loss": last["train_loss"],
                "train_accuracy": last["train_accuracy"],
                "val_loss": last["val_loss"],
                "val_accuracy": last["val_accuracy"],
                "images_per_second": images_seen / train_seconds,
                "train_seconds": train_seconds,
                "epochs": len(history),
                "world_size": ctx.world_size,
                "global_batch_size": cfg.batch_size * ctx.world_size,
            }
            save_torch({"config": config, "state_dict": raw_model.state_dict()}, paths.MODEL)
            write_json(paths.TRAIN_METRICS, metrics)
            write_csv(paths.TRAIN_HISTORY, history)
            plots.save_history(history, paths.PLOTS / "train" / "curves.png")
            write_json(paths.RUN_ID, {"run_id": tracker.run_id if tracker else None})
            if tracker is not None:
                tracker.log_metrics(tracking.prefixed("train", metrics))
                tracker.log_artifacts(paths.PLOTS / "train", "plots")
                tracker.log_pytorch_model(raw_model.cpu().eval(), models.example_input(config))
            log.info(
                "trained %d epochs on %d process(es): val accuracy %.4f, %.0f img/s",
                len(history),
                ctx.world_size,
                last["val_accuracy"],
                metrics["images_per_second"],
            )
    dist.teardown()


def epoch_metrics(row: dict[str, float]) -> dict[str, float]:
    """A history row under MLflow names grouped by split: train/loss, val/accuracy, ..."""
    return {
        "train/loss": row["train_loss"],
        "train/accuracy": row["train_accuracy"],
        "val/loss": row["val_loss"],
        "val/accuracy": row["val_accuracy"],
        "train/lr": row["lr"],
        "train/images_per_second": row["images_per_second"],
    }


def open_run(
    tracker: tracking.Tracker,
    run_id: str | None,
    params: Params,
    meta: dict[str, Any],
    ctx: dist.Context,
    cfg: Train,
    history: list[dict[str, float]],
) -> None:
    """Reopen the checkpoint's run when resuming, else start one; log params and data."""
    system = params.mlflow.system_metrics
    if run_id is None or not tracker.resume(run_id, system_metrics=system):
        tracker.start(
            {
                "dvc.experiment": os.environ.get("DVC_EXP_NAME", ""),
                "params.hash": params.digest("seed", "model", "train"),
                "world_size": ctx.world_size,
                "device": str(ctx.device),
                "model.name": params.model.name,
                "data.source": meta["source"],
            },
            system_metrics=system,
        )
    tracker.log_params(params.flat("seed", "model", "train"))
    tracker.log_params({f"data.{k}": v for k, v in meta.get("params", {}).items()})
    tracker.log_dataset(meta)
    # A kill between a checkpoint and its metrics leaves epochs unlogged: fill them in.
    done = tracker.logged_steps("train/loss")
    for row in history:
        if int(row["epoch"]) not in done:
            tracker.log_metrics(epoch_metrics(row), step=int(row["epoch"]))


if __name__ == "__main__":
    main(load_params())
