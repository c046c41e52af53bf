"""What the terminal shows: commands spelled so they run as printed from the project folder, and
progress that is a tqdm bar on a terminal but a plain line every few seconds otherwise (a tqdm bar
redirected to a file becomes one very long line of carriage returns; a log wants complete lines)."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm


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


class PlainProgress:
    """Iterates like tqdm and prints ``desc: n/total (rate) postfix`` at most every ``every_s`` seconds."""

    def __init__(self, iterable: Iterable[Any], desc: str, total: int | None, every_s: float, file: TextIO):
        self.iterable, self.desc, self.every_s, self.file = iterable, desc, every_s, file
        self.total = total if total is not None else _len(iterable)
        self.postfix: dict[str, Any] = {}
        self.n = 0

    def __iter__(self) -> Iterator[Any]:
        start = last = time.monotonic()
        for item in self.iterable:
            yield item
            self.n += 1  # after the caller's step, so its set_postfix is in the line
            now = time.monotonic()
            if now - last >= self.every_s:
                last = now
                self.write_line(now - start)

    def write_line(self, elapsed: float) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        rate = f" ({self.n / elapsed:.2f} it/s)" if elapsed > 0 else ""
        extra = "".join(f"  {k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n}{of}{rate}{extra}", file=self.file, flush=True)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        """Nothing to clear: every line printed is complete."""


def _len(iterable: Iterable[Any]) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def progress(
    iterable: Iterable[Any],
    desc: str,
    *,
    enabled: bool = True,
    total: int | None = None,
    every_s: float = 10.0,
    file: TextIO | None = None,
) -> Any:
    """``iterable`` wrapped to show progress: a tqdm bar when ``file`` (stderr) is a terminal, else a
    :class:`PlainProgress` line at most every ``every_s`` seconds; nothing when not ``enabled``.

    Either has ``set_postfix(**values)`` and ``close()``.
    """
    file = file if file is not None else sys.stderr
    if enabled and not _is_tty(file):
        return PlainProgress(iterable, desc, total, every_s, file)
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False, file=file)


def _is_tty(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False
