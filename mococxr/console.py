"""How commands the tool prints are spelled, so that each runs as printed from the project folder."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def script(name: str) -> str | None:
    """How to call this environment's console script ``name`` from the current folder; None if absent.

    A bare name when PATH finds this environment's copy, else a path relative to the current folder
    (``.venv/bin/mlflow`` after ``make demo``), else an absolute one.
    """
    path = Path(sys.prefix).resolve() / "bin" / name
    if not path.is_file():
        return None
    found = shutil.which(name)
    if found and Path(found).resolve() == path.resolve():
        return name
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def mococxr(*words: str) -> str:
    """``mococxr <words>`` spelled so it runs from the current folder (``.venv/bin/mococxr ...``)."""
    return " ".join([script("mococxr") or "mococxr", *words])
