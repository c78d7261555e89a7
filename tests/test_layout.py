"""The package's layout, read from the source: imports run one way with no cycle, importing
changes nothing global, and each stage's code deps in dvc.yaml are the modules it imports."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import imports
from helpers.repos import ROOT, STAGES
from stages.core.dvcyaml import NUMBERS_UNCHANGED, pipeline

PACKAGE = ROOT / "stages"
# Lower layers never import higher ones; a module may import its own layer (no cycle).
LAYERS = {
    "core": 0,  # params, paths, outputs, errors, logs, processes, the dvc.yaml reader
    "data": 1,  # prepared data and its sources
    "models": 1,  # the zoo and the runtimes that run a model file
    "sweep": 2,  # Optuna: the space, the study, a trial's side, the driver
    "training": 3,  # the training math, distribution, checkpoint
    "tracking": 3,  # MLflow: the store, the stage's helper process, a sweep's parent run
    "release": 4,  # decision, statistics, registry, card, pyfunc model
    # 5: the stage modules at the top of stages/ (one per dvc.yaml stage)
    "tools": 6,  # the console scripts
    # 7: the runners, `python -m stages <stage>` and train's launcher
}
RUNNERS = ("stages.__main__", "stages.launch")


def layer(module: str) -> int:
    """The layer of a module of the package."""
    if module in RUNNERS:
        return 7
    parts = module.split(".")
    return LAYERS.get(parts[1], 5)


def test_every_module_sits_in_a_known_place_and_says_its_job() -> None:
    for name, file in imports.modules(PACKAGE).items():
        parts = name.split(".")
        if len(parts) > 2 or (file.parent != PACKAGE):
            assert parts[1] in LAYERS, f"{name}: in no known sub-package"
        elif name not in ("stages", *RUNNERS):
            assert parts[1] in STAGES, f"{name}: at the top of stages/ but no dvc.yaml stage"
        tree = ast.parse(file.read_text())
        if file.name == "__init__.py" and file.parent != PACKAGE:
            assert not tree.body, f"{name}: a sub-package's __init__ stays empty"
            continue
        assert ast.get_docstring(tree), f"{name}: no sentence at the top says its job"


def test_imports_run_one_way_with_no_cycle() -> None:
    graph = imports.graph(PACKAGE)
    upward = sorted(
        f"{module} -> {imported}"
        for module, imported_ in graph.items()
        for imported in imported_
        if layer(imported) > layer(module)
    )
    assert upward == []
    assert imports.cycle(graph) is None
    # The IR model travels inside every registered model: it imports nothing of ours.
    assert graph["stages.release.ir_model"] == set()
    # The graph sees imports inside functions and under TYPE_CHECKING too.
    assert "stages.models.runtimes" in graph["stages.tracking.mlflow_store"]  # in a method
    assert imports.cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert imports.cycle({"a": {"a"}}) == ["a", "a"]  # a module importing itself


@pytest.mark.slow  # imports every library the package uses: several seconds
def test_importing_any_module_changes_nothing_global() -> None:
    # In a fresh interpreter: the libraries our modules import at their top first (some set
    # variables of their own, e.g. KMP_* for OpenMP), then every module of ours, and the
    # excepthook and environment compared with what they were before ours.
    files = imports.modules(PACKAGE)
    libraries = sorted(
        {
            alias.name if isinstance(node, ast.Import) else node.module
            for file in files.values()
            for node in ast.parse(file.read_text()).body
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
            if (alias.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
            not in ("stages", "__future__")
        }
    )
    code = (
        "import importlib, os, sys\n"
        f"for name in {libraries!r}:\n"
        "    importlib.import_module(name)\n"
        "env, hook = dict(os.environ), sys.excepthook\n"
        f"for name in {sorted(files)!r}:\n"
        "    importlib.import_module(name)\n"
        "keys = set(env) | set(os.environ)\n"
        "changed = sorted(k for k in keys if env.get(k) != os.environ.get(k))\n"
        "print(changed, sys.excepthook is hook)\n"
    )
    # A bare environment: this test process imported the package already, and whatever an
    # import set here would be inherited, so unchanged there.
    bare = {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=bare, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "[] True"


def test_only_entry_points_exit_the_process() -> None:
    # A library raises; the entry points (the runners, the console scripts, the MLflow
    # helper's process) decide how the process ends, through core/entry.py.
    entry_points = ("stages/__main__.py", "stages/launch.py", "stages/tools/")
    entry_points += ("stages/tracking/helper.py", "stages/core/entry.py")
    calls = [
        f"{rel}:{node.lineno}: {ast.unparse(node.func)}"
        for file in imports.modules(PACKAGE).values()
        if not (rel := file.relative_to(ROOT).as_posix()).startswith(entry_points)
        for node in ast.walk(ast.parse(file.read_text()))
        if isinstance(node, ast.Call)
        and ast.unparse(node.func) in ("os._exit", "sys.exit", "exit_now", "install_excepthook")
    ]
    assert calls == []


def needed_code(stage: str, graph: dict[str, set[str]], files: dict[str, Path]) -> set[str]:
    """The source files a stage's numbers can depend on: what its module imports, directly
    or through other such modules, less the modules that cannot change its numbers."""

    def exempt(module: str) -> bool:
        rel = files[module].relative_to(ROOT).as_posix()
        return any(
            rel == key or (key.endswith("/") and rel.startswith(key)) for key in NUMBERS_UNCHANGED
        )

    seen, todo = set(), [f"stages.{stage}"]
    while todo:
        module = todo.pop()
        if module in seen or exempt(module):
            continue
        seen.add(module)
        todo.extend(graph[module])
    return {files[m].relative_to(ROOT).as_posix() for m in seen}


def test_each_stage_lists_the_code_it_imports_as_deps(monkeypatch: pytest.MonkeyPatch) -> None:
    graph = imports.graph(PACKAGE)
    files = imports.modules(PACKAGE)
    assert all((ROOT / key).exists() for key in NUMBERS_UNCHANGED), "a stale exemption"
    monkeypatch.chdir(ROOT)  # Stage.code() reads the deps relative to the repository root
    for stage in pipeline(ROOT / "dvc.yaml"):
        listed = {f.as_posix() for f in stage.code()} - {"stages/__init__.py"}
        listed = {f for f in listed if not f.endswith("/__init__.py")}
        needed = needed_code(stage.name, graph, files)
        assert needed - listed == set(), f"{stage.name}: imports code dvc.yaml does not list"
        # Every code dep covers something the stage needs (a folder may cover more).
        for dep in (d for d in stage.deps if d.startswith("stages/")):
            covered = {f for f in needed if f == dep or f.startswith(dep.rstrip("/") + "/")}
            assert covered, f"{stage.name}: dvc.yaml lists {dep}, which it does not import"


def test_the_stages_and_their_commands_come_from_dvc_yaml() -> None:
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert tuple(declared) == STAGES
    for name, spec in declared.items():
        assert spec["cmd"].split()[-3:] == ["-m", "stages", name] or spec["cmd"] == (
            f"python -m stages {name}"
        ), name
        assert (PACKAGE / f"{name}.py").exists()


def test_the_checkpoint_key_follows_the_train_stages_code_deps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checkpoint's code key is the files train lists in dvc.yaml, as the package that
    # runs holds them (here a copy, where the key reads them): changing one of them makes
    # an old checkpoint stale; changing the log format does not.
    from stages.core import dvcyaml
    from stages.core.params import load_params
    from stages.training import checkpoint

    shutil.copytree(PACKAGE, tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(dvcyaml, "PACKAGE_ROOT", tmp_path / "stages")
    monkeypatch.chdir(ROOT)  # dvc.yaml and params.yaml
    params, meta = load_params(), {"digest": "d"}
    first = checkpoint.checkpoint_key(params, meta, 1)
    assert first == checkpoint.checkpoint_key(params, meta, 1)
    with open(tmp_path / "stages/core/logs.py", "a") as fh:
        fh.write("# a comment\n")
    assert checkpoint.stale_reason(checkpoint.checkpoint_key(params, meta, 1), first) is None
    with open(tmp_path / "stages/training/engine.py", "a") as fh:
        fh.write("# a comment\n")
    changed = checkpoint.checkpoint_key(params, meta, 1)
    assert "training code" in checkpoint.stale_reason(changed, first)


def test_the_stages_that_get_a_helper_are_those_that_record_through_one() -> None:
    # The runner starts an MLflow helper early for the stages dvc.yaml shows reading or
    # writing the run record; each of those, and no other, records through a Recorder.
    from stages.tracking import helper

    derived = {s.name for s in pipeline(ROOT / "dvc.yaml") if helper.records_through_helper(s)}
    used = {name for name in STAGES if "Recorder(" in (PACKAGE / f"{name}.py").read_text()}
    assert derived == used == {"train", "evaluate", "export", "convert", "benchmark"}
