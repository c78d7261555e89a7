"""The processes of a stage: the cores they may use, their memory, and who started them.

A killed `dvc repro` (SIGKILL, the OOM killer) sends its stage no signal, and torchrun's
workers run in sessions of their own: without watching, they would keep training and
writing files. The launcher watches whatever started it, the workers watch the launcher.
This lives outside the code a checkpoint is keyed on: how processes are supervised does
not change what they compute.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable

import psutil

# stages.launch exports its pid so that workers know which process to outlive no longer.
LAUNCHER_PID_ENV = "STAGES_LAUNCHER_PID"
# Shells that run a stage's cmd for DVC (`$SHELL -c cmd`, or `/bin/sh -c cmd`).
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "yash", "fish", "busybox"})


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask (a container's, taskset's), not the
    machine's total, since more threads than that only contend."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# glibc's mallopt() parameters, and the most its own adjustment raises the first to.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
GLIBC_MMAP_THRESHOLD_MAX = 32 << 20


def keep_freed_memory() -> None:
    """Keep the memory a training step frees for the next step (glibc only).

    glibc's malloc gives blocks over 128 KiB back to the system as soon as they are freed,
    and the next step's activations fault it back in page by page (4 KiB each). It raises
    both limits itself (to the size of a large freed block, up to 32 MiB, trimming above
    twice that) but only once such a block is freed: in the train stage that was after
    the first validation, so its first epoch ran 10-20 % slower, with about 100 times the
    page faults of the second (docs/measurements.md). This sets those raised limits from
    the start. Elsewhere (macOS, musl) the allocator is not glibc's: nothing to do.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * GLIBC_MMAP_THRESHOLD_MAX)


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


def watch_launcher(on_death: Callable[[], None]) -> None:
    """In a torchrun worker: call `on_death` once the launcher is gone."""
    parent = os.getppid()
    # stages.launch names itself, so a launcher that died before this point (the worker
    # is already reparented) is caught too.
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher and int(launcher) != parent and not psutil.pid_exists(int(launcher)):
        on_death()
        return
    watch_callers(on_death, parent=parent)
