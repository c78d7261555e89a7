"""Logging for the stages: one format, and only rank 0 speaks (by a filter)."""

from __future__ import annotations

import logging
import os
import sys
import warnings


class RankFilter(logging.Filter):
    """Let rank 0 log everything; other ranks only errors, so N processes print once."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.ERROR


def setup(stage: str, rank: int = 0) -> None:
    """Configure the root logger of a stage's (or a tool's) process: one format, rank 0 speaks."""
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"[{stage}]" if rank == 0 else f"[{stage} rank {rank}]"
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix} %(message)s", "%H:%M:%S"))
    handler.addFilter(RankFilter(rank))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("STAGES_LOG_LEVEL", "INFO"))
    # Libraries are chatty at INFO (alembic migrations, NNCF statistics, MLflow notices):
    # keep their warnings, drop their progress talk.
    for noisy in (
        "alembic",
        "mlflow",
        "nncf",
        "urllib3",
        "git",
        "matplotlib",
        "PIL",
        "httpx",
        "onnxscript",
        "onnx_ir",
        "torch.onnx",
        "openvino",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # torch.export's notes on specialised shapes are about its internals, not the user's.
    logging.getLogger("torch._export").setLevel(logging.ERROR)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
