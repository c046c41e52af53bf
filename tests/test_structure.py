"""The package's shape stays as DESIGN.md draws it: floors import only downwards, modules and functions
stay small enough to hold in one's head (the phantom renderer excepted)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mococxr"
# Bottom to top. tracking sits below train: training logs to MLflow, MLflow never trains.
FLOORS = {"errors": 0, "config": 0, "console": 0, "data": 1, "models": 2, "tracking": 3, "train": 4, "sweep": 5,
          "report": 6, "demo": 7, "cli": 8, "__main__": 8, "__init__": 8}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
EXEMPT = {"data/phantom.py"}  # the phantom renderer: drawing code, long by nature


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def import_edges() -> set[tuple[str, str]]:
    """(importing module, imported mococxr module) for every import, at module level or inside functions."""
    edges = set()
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mococxr"):
                edges.add((_name(path), node.module))
            elif isinstance(node, ast.Import):
                edges.update((_name(path), a.name) for a in node.names if a.name.startswith("mococxr"))
    return edges


def test_floors_import_only_downwards():
    upward = sorted((a, b) for a, b in import_edges()
                    if FLOORS[_floor(b)] > FLOORS[_floor(a)] and _floor(b) != "__init__")
    assert not upward, f"upward imports: {upward}"


def test_no_import_cycle_between_floors():
    graph: dict[str, set[str]] = {}
    for a, b in import_edges():
        if _floor(a) != _floor(b):
            graph.setdefault(_floor(a), set()).add(_floor(b))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    cycles = sorted(f for f in graph if reaches(f, f, {f}))
    assert not cycles, f"floors in an import cycle: {cycles}"


def test_modules_and_functions_are_small():
    too_long = []
    for path in _modules():
        rel = str(path.relative_to(PACKAGE))
        if rel in EXEMPT:
            continue
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}(): {n} lines")
    assert not too_long, "\n".join(too_long)
