"""Stage train: one code path for one CPU, one GPU or many processes (torchrun + DDP)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from stages.core import logs, paths, plots
from stages.core.outputs import save_torch, write_csv, write_json
from stages.core.params import Params, Train
from stages.data import datasets
from stages.models import zoo
from stages.sweep import trials
from stages.tracking import helper, mlflow_store
from stages.training import dist
from stages.training.checkpoint import checkpoint_key, load_checkpoint, rng_state, set_rng_state
from stages.training.engine import (
    Batches,
    StepFn,
    amp_dtype,
    autocast_for,
    epoch_indices,
    evaluate,
    make_step,
    seed_everything,
    steps_per_epoch,
    train_epoch,
    wrap,
)
from stages.training.optim import make_optimizer, make_scheduler

log = logging.getLogger(__name__)


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
    config = zoo.model_config(params.model.name, meta)
    train_data = Batches.on(datasets.load_split("train"), ctx.device)
    val_data = Batches.on(datasets.load_split("val"), ctx.device)
    dtype = amp_dtype(cfg, ctx.device)
    autocast = autocast_for(ctx.device, dtype)
    log.info(
        "training on %s, %d process(es), backend %s, mixed precision %s",
        ctx.device,
        ctx.world_size,
        dist.backend(),
        str(dtype).removeprefix("torch.") if dtype else "off",
    )
    raw_model = zoo.build(config).to(ctx.device)
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
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch(sampler.num_samples, cfg))
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
    order = epoch_indices(list(job.sampler), cfg)
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


def pruned_here(pruning: trials.Pruning | None, row: dict[str, float], ctx: dist.Context) -> bool:
    """In a sweep's trial: whether its pruner ends training after this epoch (rank 0
    asks the study, every rank hears the answer); a trial whose sweep died stops."""
    if not trials.in_trial():
        return False
    stop = pruning.should_stop(row) if pruning is not None else False
    return bool(dist.all_reduce_sum(torch.tensor([float(stop)], device=ctx.device)).item())


def final_metrics(history: list[dict[str, float]], pruned: bool) -> dict[str, float]:
    """metrics/train.json: the last epoch's scores and the whole run's throughput (and, in
    a sweep's trial, whether its pruner stopped it)."""
    last = history[-1]
    seconds = sum(row["seconds"] for row in history)
    images = sum(row["train_images"] for row in history)
    trial = {"pruned": pruned} if trials.in_trial() else {}
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
    logs.setup("train", ctx.rank)
    seed_everything(params.seed, params.train.deterministic, params.train.compile)
    meta = datasets.load_meta()
    key = checkpoint_key(params, meta, ctx.world_size)
    ckpt = load_checkpoint(key, params.runtime.resume)
    run_key = ckpt["run_key"] if ckpt else mlflow_store.new_run_key()
    recorder = None
    if ctx.is_main:  # started first: it opens the MLflow run while this process sets up
        recorder = helper.Recorder(
            "train", params, run_key, world_size=ctx.world_size, device=str(ctx.device)
        )
    with helper.optional_recorder(recorder):
        job = setup(params, meta, ctx)
        history = restore(job, ckpt, ctx.rank) if ckpt else []
        if history:
            log.info("resuming from epoch %d of %d", history[-1]["epoch"], params.train.epochs)
        if recorder is not None:
            recorder.ready()  # its start-up never competes with training steps
            for row in history:  # epochs a kill left unlogged (it skips the others)
                recorder.log_epoch(row)
        pruning = trials.Pruning.from_env(params, ctx.is_main)  # a sweep's trial reports
        pruned = False
        for epoch in range(len(history) + 1, params.train.epochs + 1):
            history.append(run_epoch(job, epoch, ctx))
            rngs = dist.gather(rng_state())
            if ctx.is_main:
                save_checkpoint(job, history, key, run_key, rngs)
                recorder.log_epoch(history[-1])
                log_epoch(history[-1], params.train.epochs)
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


def log_epoch(row: dict[str, float], epochs: int) -> None:
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
