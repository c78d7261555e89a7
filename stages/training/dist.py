"""torch.distributed in one place: one code path for one process and many (torchrun)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from stages.core import processes
from stages.core.errors import StageError


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job: its rank, the world and its device."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """auto: this process's GPU when CUDA is there, else the CPU."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise StageError("train.device: cuda was asked for but no CUDA device is available")
    if local_rank >= torch.cuda.device_count():
        raise StageError(
            f"train.nproc_per_node: process {local_rank} has no GPU "
            f"(this machine has {torch.cuda.device_count()})"
        )
    return torch.device("cuda", local_rank)


def local_processes(nproc_per_node: str | int) -> int:
    """What `auto` means: every GPU here, or one process on a CPU-only machine."""
    if nproc_per_node == "auto":
        return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1
    return int(nproc_per_node)


def setup(device_preference: str, threads: int) -> Context:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK once and join the process group."""
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", 1)
    device = pick_device(device_preference, local_rank)
    if device.type == "cpu":
        torch.set_num_threads(threads or max(processes.usable_cores() // local_world_size, 1))
        processes.keep_freed_memory()
    else:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            timeout=timedelta(minutes=10),
            device_id=device if device.type == "cuda" else None,
        )
    return Context(rank, world_size, local_rank, local_world_size, device)


def backend() -> str:
    """The process group's backend (nccl, gloo), or "none" in a single process."""
    return str(dist.get_backend()) if dist.is_initialized() else "none"


def teardown() -> None:
    """Leave the process group cleanly (a barrier first so no rank exits mid-collective)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over every process (a no-op in a single process)."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather(obj: Any) -> list[Any]:
    """Every rank's Python object, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (batch-norm statistics) into every rank's module."""
    if not dist.is_initialized():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src)


def shard(count: int, ctx: Context) -> range:
    """This rank's share of `count` items, every item exactly once, nothing padded."""
    return range(ctx.rank, count, ctx.world_size)
