"""The project's import graph, read from the source: every import, at module level, inside
functions and under TYPE_CHECKING alike."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

# What a module loads without importing it: MLflow runs the IR model's file as the
# registered model's code ("models from code").
LOADED_BY_PATH = {"stages.release.pyfunc": ("stages.release.ir_model",)}


def modules(package: Path) -> dict[str, Path]:
    """Every module of the package by dotted name (packages by their __init__)."""
    root = package.parent
    out = {}
    for file in sorted(package.rglob("*.py")):
        parts = file.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = file
    return out


def _imported(node: ast.AST, known: dict[str, Path]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in known:
                yield alias.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        for alias in node.names:
            full = f"{node.module}.{alias.name}"
            if full in known:  # `from stages.core import paths`: the module paths
                yield full
            elif node.module in known:  # `from stages.core.paths import MODEL`
                yield node.module


def graph(package: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports (package __init__s left out: they are empty)."""
    known = modules(package)
    edges: dict[str, set[str]] = {}
    for name, file in known.items():
        tree = ast.parse(file.read_text(), str(file))
        found = {m for node in ast.walk(tree) for m in _imported(node, known)}
        found |= set(LOADED_BY_PATH.get(name, ()))
        edges[name] = {m for m in found if known[m].name != "__init__.py"}  # itself too
    return edges


def closure(edges: dict[str, set[str]], start: str) -> set[str]:
    """`start` and every module it imports, directly or not."""
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(edges.get(module, ()))
    return seen


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for nxt in sorted(edges.get(module, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (found := visit(module)):
            return found
    return None
