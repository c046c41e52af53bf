"""What the terminal shows: commands spelled so they run as printed from the project folder, and
progress that is a tqdm bar on a terminal but a plain line every few seconds otherwise (a tqdm bar
redirected to a file becomes one very long line of carriage returns; a log wants complete lines).

A redirected log is never silent for long: a plain progress line also comes when one item (a batch, an
epoch) takes longer than the interval, and :func:`working` does the same for a step that is not a loop
(a linear monitor, a feature extraction, creating a store's tables)."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

# Lines from the heartbeat thread below and the forks the main thread makes (DataLoader workers, the image
# cache's decoding pool) never overlap: a child forked while that thread held a stream's lock would hang
# on its first write to the stream. Held around every fork, and by the thread while it writes.
_WRITING = threading.Lock()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_WRITING.acquire, after_in_parent=_WRITING.release, after_in_child=_WRITING.release
    )


def line_buffered() -> None:
    """Write stdout (and stderr) a line at a time even when redirected to a file or a pipe, where Python
    otherwise holds up to 8 KB: ``mococxr demo > out.log`` shows each line when it is printed, and the
    time between lines in the log is the time between them in the run."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):  # not a text file (pytest's capture, a StringIO)
            pass


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


# When the last progress line was written (monotonic s), by any of the lines below: two of them that follow or
# nest (a batch bar, then the epoch's monitor; an epoch bar around a feature extraction) keep one rhythm.
_LAST_LINE = [0.0]


def write(line: str, file: TextIO | None = None) -> None:
    """Print a progress line (an epoch's summary) to ``file`` (stdout): above any bar on a terminal, flushed
    in a log; the heartbeats below count it as a line."""
    with _WRITING:
        _emit(line, file if file is not None else sys.stdout)
        _LAST_LINE[0] = time.monotonic()


def _emit(line: str, file: TextIO) -> None:
    """One whole line: above any tqdm bar on a terminal, flushed in a log."""
    tqdm.write(line, file=file)
    file.flush()


class _Heartbeat:
    """A daemon thread that calls ``say(now)`` whenever ``every_s`` seconds pass without a progress line
    (its own, or any other of this module's). It first speaks no sooner than ``0.3 * every_s`` into its own
    step, so a short step after a long silence stays quiet; ``stop()`` ends it."""

    def __init__(self, every_s: float, say: Callable[[float], None]) -> None:
        self.every_s, self.say = every_s, say
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mococxr-heartbeat", daemon=True)
        self._thread.start()

    def _due(self) -> float:
        # 0.3: a step that starts just before the next line was due speaks 3 s into it (at most 13 s after
        # the last line with the default 10 s), yet a step of a second or two after a long silence is quiet
        return max(_LAST_LINE[0] + self.every_s, self.start + 0.3 * self.every_s)

    def _run(self) -> None:
        while not self._stop.wait(max(0.05, self._due() - time.monotonic())):
            with _WRITING:
                now = time.monotonic()
                if self._stop.is_set():
                    return
                if now < self._due():
                    continue  # a line was written meanwhile
                _LAST_LINE[0] = now
                try:
                    self.say(now)
                except (OSError, ValueError):  # the stream went away (closed, a broken pipe): stop quietly
                    return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)  # at most one line being written


class PlainProgress:
    """Iterates like tqdm and prints ``desc: n/total (rate) postfix`` at most every ``every_s`` seconds.

    An item that takes longer than ``every_s`` (the caller's step between two items, or the iterable
    producing the next one) gets a line every ``every_s`` seconds too, ending ``[on 4/6 for 12 s]``."""

    def __init__(
        self,
        iterable: Iterable[Any],
        desc: str,
        total: int | None,
        every_s: float,
        file: TextIO,
        *,
        initial: int = 0,
        unit: str = "it",
    ):
        self.iterable, self.desc, self.every_s, self.file = iterable, desc, every_s, file
        self.total = total if total is not None else _len(iterable)
        self.postfix: dict[str, Any] = {}
        self.initial = self.n = initial
        self.unit = unit
        self._beat: _Heartbeat | None = None

    def __iter__(self) -> Iterator[Any]:
        start = last = item_start = time.monotonic()
        if self.every_s > 0:  # started here, not in __init__: after the caller's pool or loader has forked
            self._beat = _Heartbeat(self.every_s, lambda now: self.write_line(now - start, now - item_start))
        try:
            for item in self.iterable:
                yield item
                self.n += 1  # after the caller's step, so its set_postfix is in the line
                now = item_start = time.monotonic()
                if now - max(last, _LAST_LINE[0]) >= self.every_s:
                    last = now
                    with _WRITING:
                        _LAST_LINE[0] = now
                        self.write_line(now - start)
        finally:
            self.close()

    def write_line(self, elapsed: float, on_item: float | None = None) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        done = self.n - self.initial
        rate = f" ({done / elapsed:.2f} {self.unit}/s)" if elapsed > 0 else ""
        extra = "".join(f"  {k} {v}" for k, v in self.postfix.items())
        still = f"  [on {self.n + 1}{of} for {on_item:.0f} s]" if on_item is not None else ""
        print(f"{self.desc}: {self.n}{of}{rate}{extra}{still}", file=self.file, flush=True)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        """Stop the heartbeat; nothing to clear: every line printed is complete."""
        if self._beat is not None:
            self._beat.stop()
            self._beat = None


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
    initial: int = 0,
    unit: str = "it",
) -> Any:
    """``iterable`` wrapped to show progress: a tqdm bar when ``file`` (stderr) is a terminal, else a
    :class:`PlainProgress` line at most every ``every_s`` seconds (and at least that often while an item
    is slow); nothing when not ``enabled``. ``initial``: items already done (a resumed build), counted in
    ``n/total`` but not in the rate.

    Either has ``set_postfix(**values)`` and ``close()``.
    """
    file = file if file is not None else sys.stderr
    if enabled and not _is_tty(file):
        return PlainProgress(iterable, desc, total, every_s, file, initial=initial, unit=unit)
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        disable=not enabled,
        leave=False,
        file=file,
        initial=initial,
        unit=unit,
    )


@contextmanager
def working(
    desc: str, *, enabled: bool = True, every_s: float = 10.0, file: TextIO | None = None
) -> Iterator[None]:
    """Print ``desc: still working (12 s)`` every ``every_s`` seconds while the block runs; a block that
    ends sooner prints nothing. For a long step that is not a loop, so a log (or a terminal) never goes
    silent for minutes; the lines go to ``file`` (stderr), on a terminal too."""
    if not enabled or every_s <= 0:
        yield
        return
    file = file if file is not None else sys.stderr
    start = time.monotonic()

    beat = _Heartbeat(every_s, lambda now: _emit(f"{desc}: still working ({now - start:.0f} s)", file))
    try:
        yield
    finally:
        beat.stop()


def _is_tty(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False
