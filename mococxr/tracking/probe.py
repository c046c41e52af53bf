"""Probes run when a store is opened, so a dead server or a broken ``mlflow.db`` is one clear error
within seconds rather than a traceback from deep inside MLflow after minutes of retries."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from urllib.parse import quote

import requests

from mococxr.errors import TrackingError

# How long a tracking server may take to answer before the command gives up (seconds).
SERVER_TIMEOUT_ENV = "MOCOCXR_SERVER_TIMEOUT"
DEFAULT_SERVER_TIMEOUT = 30
# MLflow's own retry defaults (7 retries, backoff 2, 120 s timeout) wait ~4 minutes on a dead server;
# a command here fails within about a minute unless the user sets these variables.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# PRAGMA quick_check at open: "1" always, "0" never, unset on stores up to CHECK_STORE_MAX_BYTES. Measured on
# this machine (metrics-heavy stores, page cache warm / cold): 1.7 MB 5 / 33 ms, 6 MB 17 / 104 ms,
# 20 MB 50 / 330 ms, 66 MB 130 / 1,100 ms, 258 MB 600 / 5,200 ms, 1 GB 2,250 / 10,200 ms.
CHECK_STORE_ENV = "MOCOCXR_CHECK_STORE"
CHECK_STORE_MAX_BYTES = 32 * 2**20


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
        raise TrackingError(
            f"MLflow store {db} is unreadable: {problem}; restore it from a backup, or move it "
            "aside to start a new store"
        )


def store_check_wanted(db: Path) -> bool:
    """Whether :func:`check_sqlite` runs on ``db``: ``MOCOCXR_CHECK_STORE=1`` always, ``=0`` never, else on
    an existing store of at most ``CHECK_STORE_MAX_BYTES`` (where it costs well under a second)."""
    raw = os.environ.get(CHECK_STORE_ENV, "").strip()
    if raw not in ("", "0", "1"):
        raise TrackingError(
            f"{CHECK_STORE_ENV}={raw!r}: expected 1 (check the store at open), 0 (never) or "
            f"unset (check stores up to {CHECK_STORE_MAX_BYTES / 2**20:g} MiB)"
        )
    if raw == "0" or not db.exists() or db.stat().st_size == 0:
        return False
    return raw == "1" or db.stat().st_size <= CHECK_STORE_MAX_BYTES


def check_sqlite(db: Path) -> None:
    """Damaged pages inside ``mlflow.db`` named as such, before commands keep writing into it.

    Runs SQLite's ``PRAGMA quick_check`` (every page and record, not the index contents) on a read-only
    connection. A store locked by other processes past the busy timeout, or holding a crashed writer's hot
    journal (which only a writable connection rolls back), is left unchecked: the check is a courtesy, and
    MLflow waits on the same lock or rolls the journal back itself."""
    try:
        con = sqlite3.connect(f"file:{quote(str(db.resolve()))}?mode=ro", uri=True, timeout=10)
        try:
            rows = [str(row[0]) for row in con.execute("PRAGMA quick_check")]
        finally:
            con.close()
    except sqlite3.OperationalError as exc:  # not damage: locked, read-only rollback, unreadable file
        if any(word in str(exc) for word in ("locked", "busy", "readonly", "read-only")):
            return
        raise TrackingError(
            f"MLflow store {db} cannot be read ({exc}): check that it is a readable file"
        ) from None
    except sqlite3.DatabaseError as exc:  # "database disk image is malformed", "file is not a database"
        rows = [str(exc)]
    if rows != ["ok"]:
        found = " ".join(" ".join(rows).replace("*** in database main ***", "").split())
        raise TrackingError(
            f"MLflow store {db} is damaged ({found[:200]}); restore it from a backup, or move it "
            "aside to start a new store"
        )
