"""What ships and whether it may become `@champion`: the deployable IR, the accuracy gates, the
decision against the current champion."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.core import paths
from stages.core.params import Params, Promote

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class Deployable:
    """The IR that ships, and why that one."""

    runtime: str  # the benchmark's name for it: openvino_int8 or openvino_fp16
    xml: Path
    reason: str


def choose_deployable(convert: dict[str, Any], benchmark: dict[str, Any], cfg: Promote):
    """INT8 when it passed its gate and is faster than FP16 by cfg.min_speedup, else FP16."""
    method = convert.get("int8_method", "none")
    if method == "none" or "openvino_int8" not in benchmark:
        reason = "the FP16 IR: no INT8 IR passed openvino.max_accuracy_drop"
        return Deployable("openvino_fp16", paths.IR_FP16, reason)
    speedup = benchmark["openvino_int8"]["throughput"] / benchmark["openvino_fp16"]["throughput"]
    if speedup >= cfg.min_speedup:
        reason = f"the INT8 IR ({method}): {speedup:.2f}x the FP16 IR's throughput"
        return Deployable("openvino_int8", paths.IR_INT8, reason)
    reason = (
        f"the FP16 IR: INT8 reached only {speedup:.2f}x its throughput "
        f"(promote.min_speedup {cfg.min_speedup:g})"
    )
    return Deployable("openvino_fp16", paths.IR_FP16, reason)


@dataclass
class Decision:
    """Where the alias goes and why; version and comparison once registered."""

    alias: str  # champion, challenger, or "" when nothing was registered
    reasons: list[str]
    version: str = ""
    champion_version: str = ""
    comparison: dict[str, float] = field(default_factory=dict)


def decide(
    failed: list[str],
    champion: str,
    same_data: bool,
    comparison: dict[str, float],
    cfg: Promote,
) -> tuple[str, list[str]]:
    """The alias for a new version: the gates, then the champion, then the evidence."""
    if failed:
        return CHALLENGER, [f"gate failed: {reason}" for reason in failed]
    if not champion:
        return CHAMPION, ["no champion yet: the first model that passed every gate"]
    if not same_data:
        return CHALLENGER, [
            f"other data: champion version {champion} was scored on other test images "
            "(another test-split digest), so the two are not compared"
        ]
    c = comparison
    evidence = (
        f"{cfg.metric} {c['score']:.4f} against champion version {champion}'s "
        f"{c['champion_score']:.4f} on the same {c['only_this_right']} + "
        f"{c['only_champion_right']} images the two disagree on: {c['improvement']:+.4f}, "
        f"at least {c['improvement_low']:+.4f} at {1 - cfg.alpha:.0%} confidence"
    )
    if c["improvement_low"] > cfg.min_improvement:
        return CHAMPION, [f"better by more than chance: {evidence}"]
    return CHALLENGER, [
        f"not better by more than chance: {evidence} "
        f"(needs more than promote.min_improvement {cfg.min_improvement:g})"
    ]


def check_gates(deployed_accuracy: float, results: dict[str, dict], params: Params) -> list[str]:
    """The gates the deployable model must pass; what failed, in words."""
    failed = [
        f"{name} stage wrote no metrics"
        for name in ("evaluate", "export", "convert", "benchmark")
        if not results[name]
    ]
    pytorch = results["evaluate"].get("accuracy")
    limit = params.openvino.max_accuracy_drop
    if pytorch is not None and pytorch - deployed_accuracy > limit + 1e-9:
        failed.append(
            f"the deployable model's test accuracy {deployed_accuracy:.4f} is more than "
            f"openvino.max_accuracy_drop {limit:g} below PyTorch's {pytorch:.4f}"
        )
    return failed
