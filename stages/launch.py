"""torchrun for the train stage, with params checked first and `auto` meaning GPUs-or-1.

`python -m stages.launch [torchrun options] -m stages.train` is torchrun itself (the
same options, the same rendezvous), with three differences: params.yaml is validated
before any worker starts, `--nproc-per-node=auto` means every GPU here or a single process
on a CPU-only machine (torchrun's own `auto` starts one process per CPU core), and a failed
worker ends the launcher with one line instead of torchrun's traceback.
"""

from __future__ import annotations

import sys

from stages import dist, logs
from stages.errors import StageError
from stages.params import load_params


def resolve(argv: list[str]) -> list[str]:
    """torchrun's arguments with `--nproc-per-node=auto` replaced by a process count."""
    out = []
    for arg in argv:
        if arg.startswith("--nproc-per-node=") or arg.startswith("--nproc_per_node="):
            flag, value = arg.split("=", 1)
            arg = f"{flag}={dist.local_processes(value)}"
        out.append(arg)
    return out


def main(argv: list[str]) -> None:
    """Validate params, then hand over to torchrun's own entry point."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    load_params()
    log = logs.setup("launch")
    args = get_args_parser().parse_args(resolve(argv))
    log.info("torchrun: %s process(es) per node, %s node(s)", args.nproc_per_node, args.nnodes)
    try:
        run(args)
    except ChildFailedError as exc:
        failures = ", ".join(
            f"rank {f.global_rank} exit code {f.exitcode}" for f in exc.failures.values()
        )
        raise StageError(f"train: a worker failed ({failures}); its error is shown above") from None


if __name__ == "__main__":
    main(sys.argv[1:])
