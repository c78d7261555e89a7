"""A throwaway copy of this repository for the benchmark scripts to run stages in."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIT = {
    "GIT_AUTHOR_NAME": "benchmark",
    "GIT_AUTHOR_EMAIL": "benchmark@example.com",
    "GIT_COMMITTER_NAME": "benchmark",
    "GIT_COMMITTER_EMAIL": "benchmark@example.com",
}


def copy_tree(dest: Path) -> Path:
    """The working tree's tracked and new files (no outputs, no venv) as a fresh git repo."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((ROOT / name).read_bytes())
    env = {**os.environ, **GIT}
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "b"]):
        subprocess.run(command, cwd=dest, env=env, check=True)
    return dest


def run(command: list[str], cwd: Path) -> float:
    """Run a command in `cwd`; its wall time (exits with its output when it fails)."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - started


def cpu_name() -> str:
    """The CPU's model name, and whether it computes bf16 natively."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line]
    name = names[0] if names else "?"
    native = "native bf16" if ("avx512_bf16" in text or "amx_bf16" in text) else "no native bf16"
    return f"{name}, {os.cpu_count()} cores, {native}"
