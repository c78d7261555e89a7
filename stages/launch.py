"""torchrun for the train stage, with params checked first and `auto` meaning GPUs-or-1.

`python -m stages.launch [torchrun options] -m stages train` is torchrun itself (the
same options, the same rendezvous), with four differences: params.yaml is validated
before any worker starts, `--nproc-per-node=auto` means every GPU here or a single process
on a CPU-only machine (torchrun's own `auto` starts one process per CPU core), the workers
stop when whatever started the launcher (`dvc repro`, through a `sh -c` wrapper or not) is
killed, and a failed worker ends the launcher with one line instead of torchrun's traceback.
One process on one node (the default on a CPU-only machine) trains in the launcher's own
process: no torchrun agent and no worker importing PyTorch a second time (about 3 s).
"""

from __future__ import annotations

import logging
import os
import runpy
import signal
import sys

from stages.core import logs, processes
from stages.core.entry import exit_now, install_excepthook
from stages.core.errors import StageError
from stages.core.params import load_params
from stages.tracking import helper

log = logging.getLogger(__name__)

NPROC_FLAGS = ("--nproc-per-node", "--nproc_per_node")


def resolve(argv: list[str]) -> list[str]:
    """torchrun's arguments with `--nproc-per-node auto` replaced by a process count."""
    from stages.training import dist

    out: list[str] = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        # torchrun's other values (a number, gpu, cpu) pass through untouched.
        if eq and flag in NPROC_FLAGS and value == "auto":
            arg = f"{flag}={dist.local_processes(value)}"
        elif out and out[-1] in NPROC_FLAGS and arg == "auto":
            arg = str(dist.local_processes(arg))
        out.append(arg)
    return out


def single_process(args) -> bool:
    """One process on one node: nothing for torchrun to start, watch or rendezvous."""
    return str(args.nproc_per_node) == "1" and str(args.nnodes) in ("1", "1:1")


def run_here(args) -> None:
    """Run the training module or script in this process, as its worker would."""
    sys.argv = [args.training_script, *args.training_script_args]
    if args.module:
        runpy.run_module(args.training_script, run_name="__main__", alter_sys=True)
    else:  # as `python script.py` would: the script's folder first on the path
        sys.path.insert(0, os.path.dirname(os.path.abspath(args.training_script)))
        runpy.run_path(args.training_script, run_name="__main__")


def main(argv: list[str]) -> None:
    """Validate params, then hand over to torchrun's own entry point."""
    params = load_params()
    logs.setup("launch")
    # Should a single process train here, its MLflow helper starts before PyTorch's import
    # (not for any other script: no Recorder would take the helper).
    if argv[-3:] == ["-m", "stages", "train"]:
        helper.prestart("train", params)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(resolve(argv))
    alone = single_process(args)
    if alone:
        log.info("one process on one node: training in the launcher's process")
    else:
        log.info("torchrun: %s processes per node, %s node(s)", args.nproc_per_node, args.nnodes)
    os.environ[processes.LAUNCHER_PID_ENV] = str(os.getpid())
    if str(args.nproc_per_node).isdigit() and "OMP_NUM_THREADS" not in os.environ:
        # torchrun would set 1 (with a warning); the workers set their own thread count
        # (runtime.threads), this only keeps OpenMP libraries from starting more.
        share = max(processes.usable_cores() // int(args.nproc_per_node), 1)
        os.environ["OMP_NUM_THREADS"] = str(share)

    def parent_died() -> None:
        # `dvc repro` was killed without a chance to signal us: stop the workers the way
        # torchrun does on SIGTERM (its handler terminates them, then the agent exits).
        log.error("the process that started train (dvc repro) died; stopping the workers")
        os.kill(os.getpid(), signal.SIGTERM)

    processes.watch_callers(parent_died)
    if alone:
        run_here(args)  # SIGTERM ends it as it would end a worker
        return
    helper.discard("train")  # rank 0 of the workers starts its own
    try:
        run(args)
    except ChildFailedError as exc:
        # failures maps each failed worker's global rank to its ProcessFailure
        failures = ", ".join(
            f"rank {rank} exit code {failure.exitcode}"
            for rank, failure in sorted(exc.failures.items())
        )
        raise StageError(f"train: worker(s) failed ({failures}); see the error above") from None
    except SignalException as exc:
        raise StageError(f"train: stopped by {exc.sigval.name}; the workers were ended") from None


if __name__ == "__main__":
    install_excepthook()
    main(sys.argv[1:])
    exit_now()  # the workers have ended: skip tearing PyTorch down
