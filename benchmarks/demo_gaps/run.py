"""Run a command, timestamp every line it prints, and report the longest silences between lines.

The command's stdout and stderr are merged into one pipe (as ``make demo > out.log 2>&1`` would write
them), so it sees no terminal: progress is what a redirected log gets. Each line is written to
``--log`` prefixed by the seconds since the start, and the longest ``--top`` gaps are printed with the
line that ended each, then whether any gap exceeds ``--limit`` seconds (exit 1 if so).

    python benchmarks/demo_gaps/run.py --log /tmp/demo-gaps.log -- mococxr demo --quick
    python benchmarks/demo_gaps/run.py --cwd "$(mktemp -d)" -- /work/main/.venv/bin/mococxr demo --quick
    python benchmarks/demo_gaps/run.py -- make demo

A gap is measured from the previous line's end (or the start) to the end of the line; a line written
in pieces counts when its newline arrives. Carriage returns also end a line, so a tqdm bar that
redraws itself is counted like the lines it redraws.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--log", type=Path, default=None, help="timestamped copy of the output")
    parser.add_argument("--cwd", type=Path, default=None, help="folder to run the command in")
    parser.add_argument("--top", type=int, default=5, help="how many of the longest gaps to print")
    parser.add_argument("--limit", type=float, default=15.0, help="the longest acceptable gap (s)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the command's lines")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")

    # No PYTHONUNBUFFERED: the command's stdout is a pipe, block-buffered like a file it is redirected to,
    # so a line held in a buffer arrives late here too (as it would in `make demo > out.log`).
    env = dict(os.environ)
    start = time.monotonic()
    last = start
    gaps: list[tuple[float, float, str]] = []  # (gap, at, line)
    log = args.log.open("w") if args.log else None
    proc = subprocess.Popen(
        command, cwd=args.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0
    )
    buf = b""
    try:
        while chunk := proc.stdout.read(65536):  # unbuffered: what one read() gets, no waiting for more
            buf += chunk
            *lines, buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
            for raw in lines:
                now = time.monotonic()
                line = raw.decode(errors="replace")
                gaps.append((now - last, now - start, line))
                last = now
                stamped = f"{now - start:9.2f} +{gaps[-1][0]:6.2f}  {line}"
                if log:
                    print(stamped, file=log, flush=True)
                if not args.quiet:
                    print(stamped, flush=True)
    finally:
        rc = proc.wait()
        end = time.monotonic()
        if buf:
            gaps.append((end - last, end - start, buf.decode(errors="replace")))
        elif end - last > 0:
            gaps.append((end - last, end - start, "<exit>"))
        if log:
            log.close()
    worst = sorted(gaps, reverse=True)[: args.top]
    print(f"\n== exit {rc}; {len(gaps)} lines in {end - start:.1f} s; load average {_load()}")
    print(f"== the {len(worst)} longest gaps between lines (s, at s, the line that ended the gap):")
    for gap, at, line in worst:
        print(f"{gap:8.1f} {at:9.1f}  {line[:150]}")
    over = [g for g in gaps if g[0] > args.limit]
    print(f"== gaps over {args.limit:g} s: {len(over)}" + (" (FAIL)" if over else " (ok)"))
    return 1 if over or rc else 0


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
