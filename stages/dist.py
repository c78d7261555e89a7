"""torch.distributed in one place: one code path for one process and many (torchrun)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psutil
import torch
import torch.distributed as dist

from stages.errors import StageError

log = logging.getLogger(__name__)

# stages.launch exports its pid so that workers know which process to outlive no longer.
LAUNCHER_PID_ENV = "STAGES_LAUNCHER_PID"


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


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def setup(device_preference: str, threads: int) -> Context:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK once and join the process group."""
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", 1)
    device = pick_device(device_preference, local_rank)
    if device.type == "cpu":
        torch.set_num_threads(threads or max(cpu_cores() // local_world_size, 1))
    else:
        torch.cuda.set_device(device)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _exit_with_launcher()
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            timeout=timedelta(minutes=10),
            device_id=device if device.type == "cuda" else None,
        )
    return Context(rank, world_size, local_rank, local_world_size, device)


def teardown() -> None:
    """Leave the process group cleanly (a barrier first so no rank exits mid-collective)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _exit_with_launcher(poll_s: float = 0.5) -> None:
    # torchrun starts workers in new sessions, so a SIGKILLed launcher (or `dvc repro`
    # above it) sends them no signal: they would keep training and writing files. Watch
    # the launcher and leave at once when it is gone.
    parent = os.getppid()
    # stages.launch names itself, so a launcher that died before this point (the worker
    # is already reparented) is caught too.
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher and int(launcher) != parent and not psutil.pid_exists(int(launcher)):
        _launcher_died()
    watch_callers(_launcher_died, poll_s, parent)


def _launcher_died() -> None:
    # Printed, not logged: ranks other than 0 filter their log records.
    print("error: the torchrun launcher died; stopping this worker", file=sys.stderr, flush=True)
    # os._exit: no atexit handlers or joins that could block on a dead peer; outputs are
    # written atomically, so nothing is left half-written.
    os._exit(1)


# Shells that run a stage's cmd for DVC (`$SHELL -c cmd`, or `/bin/sh -c cmd`).
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "yash", "fish", "busybox"})


def callers(parent: int | None = None) -> list[psutil.Process]:
    """The parent (this process's, or `parent`) and, through `<shell> -c` wrappers, its callers.

    DVC runs `$SHELL -c cmd`: bash execs a lone command, but dash (Debian's /bin/sh, used
    when SHELL is unset) stays in between, and a killed `dvc repro` leaves that shell
    running, so the shell alone cannot tell that the caller has died.
    """
    # NoSuchProcess when `parent` is gone already.
    proc: psutil.Process | None = psutil.Process(os.getppid() if parent is None else parent)
    chain: list[psutil.Process] = []
    while proc is not None:
        chain.append(proc)
        try:
            argv = proc.cmdline()
        except psutil.Error:
            break
        if not argv or os.path.basename(argv[0]) not in SHELLS or "-c" not in argv[1:]:
            break
        proc = proc.parent()
    return chain


def _gone(proc: psutil.Process) -> bool:
    # is_running() is False once the pid is gone or reused; a zombie waits to be reaped.
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def watch_callers(
    on_death: Callable[[], None], poll_s: float = 0.5, parent: int | None = None
) -> None:
    """Call `on_death` (from a daemon thread) once the parent or, through shell wrappers,
    the process that started it (`dvc repro`) has died."""
    try:
        chain = callers(parent)
    except psutil.NoSuchProcess:
        chain = []  # the parent died before we looked: on_death at once

    def watch() -> None:
        while chain and not any(_gone(proc) for proc in chain):
            time.sleep(poll_s)
        on_death()

    threading.Thread(target=watch, name="caller-watch", daemon=True).start()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over every process (a no-op in a single process)."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s Python object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


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
