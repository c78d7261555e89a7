"""The optimizer and the learning-rate schedule: a linear warm-up, then cosine, step or
constant."""

from __future__ import annotations

import math

import torch
from torch import nn

from stages.core.params import Train


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
