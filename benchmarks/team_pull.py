"""What a teammate's `dvc pull` + `dvc repro` costs on the default pipeline (README "Team").

Run from the repository root:

    python benchmarks/team_pull.py

Person A: a fresh copy of this working tree runs `dvc repro` on the default params, sets a
local-folder DVC remote, pushes, and pushes git to a bare repository. Person B clones it,
then `dvc pull` and `dvc repro` are timed; the baseline measured in the same run is A's
own `dvc repro`. B's repro must run no stage.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workspace import copy_tree, cpu_name, run


def main() -> None:
    dvc = str(Path(sys.executable).parent / "dvc")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a = copy_tree(root / "a")
        repro_a = run([dvc, "repro"], a)
        run([dvc, "remote", "add", "-d", "team", str(root / "remote")], a)
        run(["git", "add", "-A"], a)
        run(["git", "commit", "-qm", "results"], a)
        run(["git", "init", "-q", "--bare", "-b", "main", str(root / "origin.git")], root)
        run(["git", "push", "-q", str(root / "origin.git"), "HEAD:main"], a)
        push = run([dvc, "push"], a)
        run(["git", "clone", "-q", str(root / "origin.git"), str(root / "b")], root)
        b = root / "b"
        pull = run([dvc, "pull"], b)
        started = time.perf_counter()
        done = subprocess.run([dvc, "repro"], cwd=b, capture_output=True, text=True, check=True)
        repro_b = time.perf_counter() - started
        ran = [line for line in done.stdout.splitlines() if line.startswith("Running stage")]
    print(cpu_name())
    print(f"  A: dvc repro          {repro_a:7.1f} s (the baseline)")
    print(f"  A: dvc push           {push:7.1f} s")
    print(f"  B: dvc pull           {pull:7.1f} s")
    print(f"  B: dvc repro          {repro_b:7.1f} s, stages run: {ran or 'none'}")
    print(f"  B: pull + repro / A's repro: {(pull + repro_b) / repro_a:.3f}")
    if ran:
        sys.exit("error: the teammate's dvc repro ran stages")


if __name__ == "__main__":
    main()
