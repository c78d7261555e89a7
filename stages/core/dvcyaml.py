"""The pipeline as dvc.yaml declares it: its stages, their params sections, outputs and code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from stages.core import paths

# The package's folder (stages/): its parent is the repository root dvc.yaml's paths start at.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]

# The project's modules whose change cannot change any stage's numbers, each with the
# reason. A stage's code `deps:` in dvc.yaml list every other project module it imports
# (tests/test_layout.py checks it against the imports), so that editing these reruns
# nothing and editing any other reruns the stages that use it.
NUMBERS_UNCHANGED = {
    "stages/__main__.py": "the runner: which stage to start, not what it computes",
    "stages/launch.py": "train's runner: how its processes start and are watched (the "
    "process count it picks is in the checkpoint's key and the MLflow run)",
    "stages/core/entry.py": "how an entry point reports an error and exits",
    "stages/core/errors.py": "the wording of errors",
    "stages/core/logs.py": "the log's format",
    "stages/core/params.py": "the params schema: the values are in params.yaml, which "
    "dvc.yaml lists section by section",
    "stages/core/paths.py": "where files are (dvc.yaml names every output as well)",
    "stages/core/outputs.py": "how files are written (atomically) and read back",
    "stages/core/processes.py": "cores, memory and supervision of processes",
    "stages/core/dvcyaml.py": "reading dvc.yaml",
    "stages/tracking/": "the MLflow copy of the outputs",
    "stages/sweep/": "a sweep's bookkeeping: its study, its trials' tags and their reports "
    "to the pruner (which stops a trial, never changes one outside a sweep)",
}


@dataclass(frozen=True)
class Stage:
    """One stage as dvc.yaml declares it (what MLflow gets of it, the code it runs)."""

    name: str
    params: tuple[str, ...]
    metrics: tuple[Path, ...]
    files: tuple[Path, ...]
    deps: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()

    def code(self) -> list[Path]:
        """The project's source files among the stage's deps (folders as their .py files),
        relative to the root of the package that runs, which is where dvc.yaml names them."""
        files: list[Path] = []
        for dep in (Path(d) for d in self.deps if Path(d).parts[0] == PACKAGE_ROOT.name):
            path = PACKAGE_ROOT.parent / dep
            found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
            files += [f.relative_to(PACKAGE_ROOT.parent) for f in found]
        return files


def artifact_folder(path: Path) -> str | None:
    """Where an output goes among the run's artifacts (None: not logged as a file)."""
    if path == paths.OPENVINO:
        return "openvino"
    if path.parts[0] in ("plots", "reports"):
        return path.parts[0]
    return None  # inputs of later stages, and the models, which go in as MLflow models


def pipeline(file: Path = paths.DVC_YAML) -> list[Stage]:
    """The stages of dvc.yaml, in order, with their params sections, metrics and files."""
    stages = yaml.safe_load(file.read_text())["stages"]

    def names(entries: list) -> list[str]:
        # An entry is a path, or a mapping from a path (or a params file) to its options.
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries]

    return [
        Stage(
            name,
            tuple(names(spec.get("params", []))),
            tuple(Path(m) for m in names(spec.get("metrics", []))),
            tuple(Path(o) for o in names(spec.get("outs", [])) if artifact_folder(Path(o))),
            tuple(names(spec.get("deps", []))),
            tuple(names(spec.get("outs", []))),
        )
        for name, spec in stages.items()
    ]


def stage(name: str, file: Path = paths.DVC_YAML) -> Stage:
    """One stage of dvc.yaml by name."""
    return next(s for s in pipeline(file) if s.name == name)


def stages_before(stage: str, stages: list[Stage]) -> list[Stage]:
    """The stages that run before `stage` in the pipeline."""
    names = [s.name for s in stages]
    return stages[: names.index(stage)] if stage in names else stages
