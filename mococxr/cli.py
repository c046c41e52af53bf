"""The ``mococxr`` command: parses arguments and dispatches to the subcommand's handler, nothing more.

The arguments are built in :mod:`mococxr.commands.args`, the handlers are :mod:`mococxr.commands.handlers`
and :mod:`mococxr.commands.paper`. User errors print one line without a traceback and exit 2 (see
:func:`main`).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from mococxr.commands.args import build_parser, check_registry_args
from mococxr.commands.handlers import (
    cmd_data_check,
    cmd_data_stats,
    cmd_data_synth,
    cmd_demo,
    cmd_finetune,
    cmd_grid,
    cmd_linear_eval,
    cmd_pretrain,
    cmd_registry,
    cmd_report,
    cmd_sweep,
)
from mococxr.commands.paper import cmd_paper
from mococxr.console import line_buffered
from mococxr.errors import InterruptedBySignal, user_message


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. The one boundary for errors: a user's error (bad flag, file, URI, id, corrupt
    store, unreachable server, full or read-only disk) is one line and exit 2; anything else is a bug:
    one line, exit 1, the traceback with ``--debug``. Ctrl-C exits 130 and SIGTERM 143, after the
    runs in flight are marked KILLED."""
    line_buffered()  # a redirected log gets each line as it is printed
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "registry":
        check_registry_args(parser, args)
    previous = _on_sigterm()
    try:
        return int(globals()[args.handler](args) or 0)
    except KeyboardInterrupt as exc:
        sigterm = isinstance(exc, InterruptedBySignal)
        print(
            f"mococxr: {'terminated (SIGTERM)' if sigterm else 'interrupted (Ctrl-C)'}; an MLflow run in "
            "flight is marked KILLED",
            file=sys.stderr,
        )
        return 143 if sigterm else 130
    except Exception as exc:
        if args.debug:
            raise
        message = user_message(exc, _tracking_uri_in_force(args))
        if message is not None:
            print(f"mococxr: error: {message}", file=sys.stderr)
            return 2
        first = " ".join(str(exc).split())[:300]
        print(
            f"mococxr: internal error: {type(exc).__name__}: {first} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _tracking_uri_in_force(args: argparse.Namespace) -> str | None:
    """The store an error may concern: the one opened, else the one that was being opened (the flag,
    ``MLFLOW_TRACKING_URI`` or the embedded default), so a damaged store is named however it was chosen."""
    store = getattr(args, "store", None)
    if store is not None:
        return store.tracking_uri
    tracking = sys.modules.get("mococxr.tracking.mlflow")  # not imported: no store was being opened
    if tracking is None:
        return args.tracking_uri
    try:
        return tracking.resolve_tracking_uri(args.tracking_uri)
    except Exception:  # noqa: BLE001 - a refused URI: its own error is the one being reported
        return args.tracking_uri


def _on_sigterm():
    """Make SIGTERM behave like Ctrl-C (the tracking code marks the run KILLED); returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise InterruptedBySignal(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


# The handlers are re-exported: a subcommand's parser names its handler (``handler="cmd_..."``), and
# main looks it up here when the command runs.
__all__ = [
    "build_parser",
    "cmd_data_check",
    "cmd_data_stats",
    "cmd_data_synth",
    "cmd_demo",
    "cmd_finetune",
    "cmd_grid",
    "cmd_linear_eval",
    "cmd_paper",
    "cmd_pretrain",
    "cmd_registry",
    "cmd_report",
    "cmd_sweep",
    "main",
]


if __name__ == "__main__":
    raise SystemExit(main())
