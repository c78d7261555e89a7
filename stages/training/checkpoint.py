"""The training checkpoint: what it must match to be resumed (params, code, data, world size)
and the random states that make a resumed run bit-identical."""

from __future__ import annotations

import hashlib
import logging
import random
from typing import Any

import numpy as np
import torch

from stages.core import dvcyaml, paths
from stages.core.errors import StageError
from stages.core.outputs import load_torch
from stages.core.params import Params

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """This process's random generators, for a bit-identical resume (tensors and numbers)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        # As a tensor, so the checkpoint loads with torch.load(weights_only=True).
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() saved."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_key(params: Params, meta: dict[str, Any], world_size: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: training params, code, data, world size."""
    # The code train depends on as dvc.yaml lists it: a checkpoint written by other code
    # is stale, as DVC would rerun the stage for it.
    code = hashlib.sha256()
    for file in dvcyaml.stage("train").code():
        source = dvcyaml.PACKAGE_ROOT.parent / file
        code.update(file.as_posix().encode() + b"\0" + source.read_bytes())
    return {
        "params": params.digest("seed", "model", "train"),
        "code": code.hexdigest()[:16],
        "data": meta["digest"],
        "world_size": world_size,
    }


def stale_reason(found: Any, key: dict[str, Any]) -> str | None:
    """Why a checkpoint's key does not match this run (None when it does)."""
    if not isinstance(found, dict) or set(found) != set(key):
        return "an older version of the train stage"
    if found["params"] != key["params"]:
        return "other seed/model/train params"
    if found["code"] != key["code"]:
        return "other training code (stages/ changed)"
    if found["data"] != key["data"]:
        return "other prepared data"
    if found["world_size"] != key["world_size"]:
        return f"{found['world_size']} process(es) (this run has {key['world_size']})"
    return None


def load_checkpoint(key: dict[str, Any], resume: bool) -> dict | None:
    """The checkpoint in models/ if resuming is on and it was written by this same training."""
    if not paths.CHECKPOINT.exists():
        return None
    if not resume:
        log.info("runtime.resume is false: ignoring %s, training from scratch", paths.CHECKPOINT)
        return None
    try:
        ckpt = load_torch(paths.CHECKPOINT, "a training checkpoint")
    except StageError as exc:
        log.warning("%s; training from scratch", exc)
        return None
    reason = stale_reason(ckpt.get("key"), key)
    if reason is not None:
        log.info(
            "%s was written with %s; ignoring it and training from scratch",
            paths.CHECKPOINT,
            reason,
        )
        return None
    return ckpt
