"""The package's shape stays as DESIGN.md draws it: floors import only downwards, report/ reads only
MLflow and data, models/ and tracking/ know nothing of each other, and modules and functions stay small
enough to hold in one's head (the phantom renderer excepted)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mococxr"
# DESIGN.md's floors, bottom to top: cli -> flows -> sweep -> train -> models, report -> data, tracking,
# config. tracking sits below train and models: training logs to MLflow, MLflow never trains or builds a
# model. report sits beside models: it reads MLflow and never starts work, so a flow calls it (the demo
# is one: flows/demo.py); commands/ is the cli's own package.
FLOORS = {
    "errors": 0,
    "config": 0,
    "console": 0,
    "data": 1,
    "tracking": 1,
    "models": 2,
    "report": 2,
    "train": 3,
    "sweep": 4,
    "flows": 5,
    "cli": 6,
    "commands": 6,
    "__main__": 6,
    "__init__": 6,
}
# What report/ may import besides itself: it only reads MLflow and the data it describes.
REPORT_READS = {"data", "tracking", "config", "errors", "console"}
# Floors that must not know of each other though the floor numbers alone would allow it.
NEVER = {
    ("models", "tracking"): "models/ knows nothing of MLflow: the caller resolves a URI to a state dict",
    ("tracking", "models"): "tracking/ hands back a file or a state dict; the caller builds the model",
}
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


def test_every_floor_is_named():
    unknown = sorted({_floor(_name(p)) for p in _modules()} - set(FLOORS))
    assert not unknown, f"modules outside DESIGN's floors (add them to FLOORS): {unknown}"


def test_floors_import_only_downwards():
    upward = sorted(
        (a, b) for a, b in import_edges() if FLOORS[_floor(b)] > FLOORS[_floor(a)] and _floor(b) != "__init__"
    )
    assert not upward, f"upward imports: {upward}"


def test_report_reads_only_mlflow_and_data():
    wrong = sorted(
        (a, b)
        for a, b in import_edges()
        if _floor(a) == "report" and _floor(b) not in REPORT_READS | {"report"}
    )
    assert not wrong, f"report/ may import only {sorted(REPORT_READS)}: {wrong}"


def test_models_and_tracking_know_nothing_of_each_other():
    wrong = [
        f"{a} -> {b}: {NEVER[_floor(a), _floor(b)]}"
        for a, b in sorted(import_edges())
        if (_floor(a), _floor(b)) in NEVER
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_floors():
    graph: dict[str, set[str]] = {}
    for a, b in import_edges():
        if _floor(a) != _floor(b):
            graph.setdefault(_floor(a), set()).add(_floor(b))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(
            n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ())
        )

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


# -- names spelled once -------------------------------------------------------------------------------
# tracking/mlflow.py owns the mococxr.* tag schema (tag(), tags(), TAG_KEYS, TAG_PREFIX) and the run
# description tag (NOTE_TAG); every other module names a tag through it, so a misspelt or unlisted key
# fails at once.
SCHEMA = "tracking/mlflow.py"


# TODO(vocabulary): modules that still spell a tag themselves, with what to change. The checks below skip
# them; empty this as they move (a stale entry fails test_the_spelling_todo_is_current).
def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of every string constant in ``tree`` that is not a docstring (f-string parts included)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def spelling_faults(path: Path) -> dict[str, list[str]]:
    """What ``path`` spells itself that tracking/mlflow.py owns: raw ``mococxr.*`` tag names (a module's
    dotted name is not one), ``TAG_PREFIX``, and the run description tag."""
    tree = ast.parse(path.read_text())
    modules = {_name(p) for p in _modules()}
    faults: dict[str, list[str]] = {"tag": [], "prefix": [], "note": []}
    for line, text in _strings(tree):
        if text.startswith("mococxr.") and text not in modules:
            faults["tag"].append(f"{line} {text!r}")
        if "mlflow.note.content" in text:
            faults["note"].append(f"{line} {text!r}")
    for node in ast.walk(tree):
        name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", getattr(node, "name", None))
        if isinstance(node, (ast.Name, ast.Attribute, ast.alias)) and name == "TAG_PREFIX":
            faults["prefix"].append(f"{node.lineno}")
        if isinstance(node, ast.alias) and name == "MLFLOW_RUN_NOTE":
            faults["note"].append(f"{node.lineno} imports MLFLOW_RUN_NOTE")
    return faults


def _faults(kind: str) -> list[str]:
    skip = {SCHEMA}
    return [
        f"{rel}:{fault}"
        for path in _modules()
        if (rel := str(path.relative_to(PACKAGE))) not in skip
        for fault in spelling_faults(path)[kind]
    ]


def test_tag_names_go_through_the_schema():
    raw = _faults("tag")
    assert not raw, "mococxr.* tag names spelled outside tracking/mlflow.py (use mt.tag(key); add the key "
    "to TAG_KEYS):\n" + "\n".join(raw)
    prefix = _faults("prefix")
    assert not prefix, "TAG_PREFIX used outside tracking/mlflow.py (use mt.tag(key)):\n" + "\n".join(prefix)


def test_the_run_description_tag_is_spelled_once():
    found = _faults("note")
    assert not found, "mlflow.note.content spelled outside tracking/mlflow.py (use mt.NOTE_TAG):\n" + (
        "\n".join(found)
    )


def _literal_text(node: ast.AST) -> bool:
    """Whether ``node`` is (or joins) string text written in place: a literal or an f-string."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp):
        return _literal_text(node.left) or _literal_text(node.right)
    return isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("join", "format")


def test_search_filters_are_built_in_one_place():
    """Every MLflow filter handed to a ``search_*`` call comes from tracking/filters.py, which quotes names
    correctly: a string or f-string written at the call is hand-built."""
    found = []
    for path in _modules():
        rel = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "").startswith("search_")):
                continue
            args = [*node.args, *(k.value for k in node.keywords if k.arg in ("filter_string", "filter"))]
            found += [f"{rel}:{node.lineno}" for a in args if _literal_text(a)]
    assert not found, "hand-built MLflow filters (use tracking/filters.py):\n" + "\n".join(found)
