"""The training math: batches on the device, seeding, mixed precision, one step, one epoch, a
validation pass."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from stages.core.errors import StageError
from stages.core.params import Train
from stages.data import datasets
from stages.training import dist

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


def epoch_indices(order: list[int], cfg: Train) -> list[int]:
    """This rank's images of one epoch, cut to `train.max_steps` steps when that is set."""
    return order[: cfg.max_steps * cfg.batch_size] if cfg.max_steps else order


def steps_per_epoch(images: int, cfg: Train) -> int:
    """Optimizer steps of one epoch over this rank's `images`."""
    steps = math.ceil(images / cfg.batch_size)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


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
