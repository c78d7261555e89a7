"""A sweep's search space, read from the `sweep` section of params.yaml: Optuna distributions
checked against the real params, the metric's stage, the study's name."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from stages.core import dvcyaml, outputs, paths
from stages.core.errors import StageError
from stages.core.params import Range, Sweep, parse_params

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")


def _lookup(raw: dict[str, Any], dotted: str) -> tuple[dict[str, Any], str]:
    """The mapping that holds a dotted params path, and the last key."""
    *sections, key = dotted.split(".")
    node: Any = raw
    for part in sections:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or key not in node or isinstance(node[key], dict):
        raise StageError(f"params.yaml: sweep.space.{dotted}: not a parameter in params.yaml")
    return node, key


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw params with the dotted paths set to these values."""
    copy = json.loads(json.dumps(raw))
    for dotted, value in values.items():
        node, key = _lookup(copy, dotted)
        node[key] = value
    return copy


def distributions(raw: dict[str, Any], spec: Sweep) -> dict[str, Any]:
    """Optuna's distribution for every entry of the space; a bad entry stops with one line.

    Every choice, and both ends of every range, must be a value the params schema takes.
    """
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    from stages.core.params import SETTINGS

    out: dict[str, Any] = {}
    for dotted, entry in spec.space.items():
        if dotted.split(".")[0] in SETTINGS:
            raise StageError(
                f"params.yaml: sweep.space.{dotted}: a setting, not a parameter a trial varies"
            )
        node, key = _lookup(raw, dotted)
        if isinstance(entry, Range):
            integer = isinstance(node[key], int) and not isinstance(node[key], bool)
            ends = [entry.low, entry.high]
            if integer:
                if any(v != int(v) for v in [*ends, entry.step or 1]):
                    raise StageError(
                        f"params.yaml: sweep.space.{dotted}: {dotted} is an integer; "
                        "low, high and step must be whole numbers"
                    )
                ends = [int(v) for v in ends]
            tried = ends
        else:
            tried = list(entry)
        for value in tried:
            try:
                parse_params(with_values(raw, {dotted: value}))
            except StageError as exc:
                reason = str(exc).split(": ", 2)[-1]
                raise StageError(
                    f"params.yaml: sweep.space.{dotted}: the params schema rejects {value!r}: "
                    + reason.removesuffix(f", got {value!r}")
                ) from None
        if not isinstance(entry, Range):
            out[dotted] = CategoricalDistribution(list(entry))
        elif integer:
            step = int(entry.step or 1)
            out[dotted] = IntDistribution(tried[0], tried[1], log=entry.log, step=step)
        else:
            out[dotted] = FloatDistribution(entry.low, entry.high, log=entry.log, step=entry.step)
    return out


def grid(space: dict[str, Any]) -> dict[str, list[Any]]:
    """The grid sampler's search space: the choices, or every step of a stepped range."""
    from optuna.distributions import CategoricalDistribution

    out: dict[str, list[Any]] = {}
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            out[name] = list(dist.choices)
        elif dist.step is None:
            raise StageError(
                f"params.yaml: sweep.space.{name}: the grid sampler needs choices or a range "
                "with a step"
            )
        else:
            count = round((dist.high - dist.low) / dist.step) + 1
            out[name] = [dist.low + i * dist.step for i in range(count)]
    return out


def metric_stage(spec: Sweep, stages: list[dvcyaml.Stage]) -> str:
    """The stage that writes the sweep's metric, checked against `until` and the workspace."""
    names = [s.name for s in stages]
    if spec.until not in names:
        raise StageError(f"params.yaml: sweep.until: no stage {spec.until!r} in dvc.yaml")
    stage = spec.metric.split("/")[0]
    if stage not in names[: names.index(spec.until) + 1]:
        raise StageError(
            f"params.yaml: sweep.metric: {spec.metric!r}: no stage up to {spec.until!r} writes "
            f"it (stages: {', '.join(names[: names.index(spec.until) + 1])})"
        )
    file = paths.METRICS / f"{stage}.json"
    if file.exists():  # what this workspace's last run wrote
        known = outputs.prefixed(stage, outputs.read_json(file))
        if known and spec.metric not in known:
            raise StageError(
                f"params.yaml: sweep.metric: {file} has no {spec.metric!r}; it has "
                + ", ".join(sorted(known)[:8])
            )
    return stage


def study_name(spec: Sweep) -> str:
    """The default study: named after what is searched, so that a changed space starts anew."""
    searched = spec.model_dump(exclude={"trials", "jobs"})
    blob = json.dumps(searched, sort_keys=True, default=str)
    return "sweep-" + hashlib.sha256(blob.encode()).hexdigest()[:8]
