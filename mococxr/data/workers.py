"""Worker processes that never outlive the command that started them.

A process pool's workers wait on a pipe whose write end they themselves inherited, so when their parent
is killed with SIGKILL (no chance to shut the pool down) they never see end-of-file and wait forever,
each holding the memory it had (~0.5 GB while rendering the phantom). Every pool the data code starts
runs :func:`die_with_parent` as its initializer: on Linux the kernel then sends the worker SIGKILL the
moment its parent dies (``PR_SET_PDEATHSIG``); elsewhere a daemon thread polls the parent's pid.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_POLL_S = 1.0


def die_with_parent(parent_pid: int) -> None:
    """Pool initializer: end this worker when process ``parent_pid`` (the pool's owner) is gone."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before the signal was armed
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass  # no usable libc: fall back to polling
    threading.Thread(target=_poll, args=(parent_pid,), name="mococxr-parent-watch", daemon=True).start()


def _poll(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:  # re-parented: the owner is gone
            os._exit(1)
        threading.Event().wait(_POLL_S)


__all__ = ["die_with_parent"]
