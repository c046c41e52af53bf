"""Probes run when a store is opened, so a dead server or a broken ``mlflow.db`` is one clear error
within seconds rather than a traceback from deep inside MLflow after minutes of retries."""

from __future__ import annotations

import os
from pathlib import Path

import requests

from mococxr.errors import TrackingError

# How long a tracking server may take to answer before the command gives up (seconds).
SERVER_TIMEOUT_ENV = "MOCOCXR_SERVER_TIMEOUT"
DEFAULT_SERVER_TIMEOUT = 30
# MLflow's own retry defaults (7 retries, backoff 2, 120 s timeout) wait ~4 minutes on a dead server;
# a command here fails within about a minute unless the user sets these variables.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def server_timeout() -> float:
    """Seconds a tracking server may take to answer (``MOCOCXR_SERVER_TIMEOUT``, default 30)."""
    raw = os.environ.get(SERVER_TIMEOUT_ENV, str(DEFAULT_SERVER_TIMEOUT))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise TrackingError(f"{SERVER_TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


def probe_server(uri: str) -> None:
    """Fail within the timeout when the server does not answer, rather than after MLflow's ~4 minutes of
    retries, and bound MLflow's own retries for a server that dies later (unless the user set them)."""
    timeout = server_timeout()
    for name, value in {**_HTTP_DEFAULTS, "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(timeout)))}.items():
        os.environ.setdefault(name, value)
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)  # any answer means the server is there
    except requests.RequestException as exc:
        reason = "no answer" if isinstance(exc, requests.Timeout) else "connection failed"
        raise TrackingError(
            f"MLflow tracking server {uri} did not answer ({reason}; timeout {timeout:g} s): start it, fix "
            f"--tracking-uri/MLFLOW_TRACKING_URI, or raise {SERVER_TIMEOUT_ENV}"
        ) from None


def probe_sqlite(db: Path) -> None:
    """A garbage or truncated ``mlflow.db`` named as such, before MLflow fails on it deep inside alembic.

    Reads the 100-byte header only: the magic string, and the page count times page size against the
    file's length (a truncated copy is shorter), so the probe costs nothing on a large store."""
    if not db.exists() or db.stat().st_size == 0:
        return  # a new store: MLflow creates it
    with open(db, "rb") as f:
        header = f.read(100)
    size = db.stat().st_size
    problem = None
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        problem = "it is not an SQLite database"
    else:
        page = int.from_bytes(header[16:18], "big")
        page = 65536 if page == 1 else page
        pages = int.from_bytes(header[28:32], "big")
        valid = header[24:28] == header[92:96]  # the page count is only valid when these agree
        if valid and pages and size < pages * page:
            problem = f"it is truncated ({size} of {pages * page} bytes)"
    if problem:
        raise TrackingError(f"MLflow store {db} is unreadable: {problem}; restore it from a backup, or move it "
                            "aside to start a new store")
