"""Progress of long loops: a tqdm bar on a terminal, a plain line every few seconds otherwise.

A tqdm bar redirected to a file becomes one very long line of carriage returns; a log file or a
sweep worker's output wants a short, complete line now and then instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm


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


def progress(iterable: Iterable[Any], desc: str, *, enabled: bool = True, total: int | None = None,
             every_s: float = 10.0, file: TextIO | None = None) -> Any:
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
