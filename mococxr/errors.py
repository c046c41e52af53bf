"""The one exception family a user can cause.

Every error that bad input can trigger (a CSV row, a missing file, an unknown URI, a bad config)
raises a subclass of :class:`MococxrError` whose message says *what* is wrong and *where* (file, row,
field) and, where it helps, how to fix it. The CLI prints the message without a traceback and exits
with status 2; nothing already written or logged is removed.
"""


class MococxrError(Exception):
    """Base class of all user-facing errors."""


class DataError(MococxrError):
    """A dataset, CSV, image, split or manifest is not what was expected."""


class ConfigError(MococxrError):
    """A config file, CLI option or sweep/grid definition is invalid."""


class TrackingError(MococxrError):
    """An MLflow store, run, model URI or registry operation could not be resolved."""


class InterruptedBySignal(KeyboardInterrupt):
    """SIGTERM, raised as a KeyboardInterrupt so that runs are marked KILLED as on Ctrl-C."""


# -- the one boundary: an exception that reached the CLI -> (exit status, one line) ------------------------
_CORRUPT_DB = ("file is not a database", "database disk image is malformed", "database or disk is full")
_OS_ADVICE = {
    "ENOSPC": "no space left on the device holding {path}: free space there, or point MOCOCXR_ARTIFACT_ROOT "
    "(artifacts), --out or --cache at another disk, then rerun",
    "EDQUOT": "disk quota exceeded writing {path}: free space or write elsewhere, then rerun",
    "EROFS": "{path} is on a read-only file system: point MOCOCXR_ARTIFACT_ROOT, --tracking-uri or --out "
    "at a writable folder",
    "EACCES": "permission denied on {path}: make it writable/readable for this user or choose another folder",
    "EPERM": "operation not permitted on {path}: make it writable for this user or choose another folder",
    "ENOTDIR": "{path}: a file stands where a folder is expected; remove it or choose another folder",
    "EISDIR": "{path} is a folder where a file is expected",
}


def _chain(exc: BaseException):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _causes(exc: BaseException):
    """``exc`` and what it was explicitly raised from, or raised while handling unless ``from None``."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def _raised_in(exc: BaseException, folder: str) -> bool:
    """Whether any frame of the exception or its causes ran code under ``folder`` (e.g. a package)."""
    import traceback

    return any(
        folder in frame.f_code.co_filename
        for e in _chain(exc)
        for frame, _ in traceback.walk_tb(e.__traceback__)
    )


def _without_sql_noise(message: str) -> str:
    """Drop SQLAlchemy's trailing ``[SQL: ...]`` and ``(Background on this error at: ...)`` lines, which a
    message that quotes a database error carries and which say nothing to a user."""
    lines = message.splitlines()
    kept = [
        line for line in lines if not line.lstrip().startswith(("[SQL:", "[parameters:", "(Background on"))
    ]
    return "\n".join(kept) if kept else message


def _store_message(exc: BaseException, text: str, tracking_uri: str | None) -> str:
    """A corrupt or full sqlite database, named: the MLflow store, or Optuna's storage when it raised."""
    if _raised_in(exc, "/optuna/"):
        db = "the Optuna storage (--storage; default optuna.db beside mlflow.db)"
    elif tracking_uri and tracking_uri.startswith("sqlite:///"):
        db = "MLflow store " + tracking_uri.removeprefix("sqlite:///")
    else:
        db = "the MLflow tracking database"
    if "is full" in text:
        return f"{db}: the database or its disk is full; free space on that disk and rerun"
    problem = next(s for s in _CORRUPT_DB if s in text)
    return f"{db} is damaged ({problem}); restore it from a backup, or move it aside to start a new store"


def _os_message(exc: OSError) -> str | None:
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    if name not in _OS_ADVICE:
        return None
    # shutil's copy names the source first and the destination (the full or read-only side) second
    path = next((p for p in (exc.filename2, exc.filename) if p is not None), "the output folder")
    return f"{_OS_ADVICE[name].format(path=path)} ({exc.strerror or name})"


def user_message(exc: BaseException, tracking_uri: str | None = None) -> str | None:
    """The one-line message for a failure a user can cause or fix, or ``None`` for a bug.

    Looks through the exception's causes: an ``OSError`` (full disk, read-only folder, permission),
    a corrupt sqlite store (as sqlite3, SQLAlchemy or MLflow reports it), an unknown id in MLflow
    (``RESOURCE_DOES_NOT_EXIST``) or an unreachable server. Types are matched by name so that this
    module imports nothing heavy.
    """
    where = f" in {tracking_uri}" if tracking_uri else ""
    for e in _chain(exc):
        text = str(e)
        if isinstance(e, MococxrError):
            # ours, unless it wraps a damaged database (`raise ... from exc`: a run whose logging hit a
            # damaged store); a message raised `from None` has said what it means
            raw = next(
                (
                    str(c)
                    for c in _causes(e)
                    if not isinstance(c, MococxrError) and any(s in str(c) for s in _CORRUPT_DB[:2])
                ),
                None,
            )
            return _store_message(exc, raw, tracking_uri) if raw else _without_sql_noise(text)
        if any(s in text for s in _CORRUPT_DB):
            return _store_message(exc, text, tracking_uri)
        if isinstance(e, OSError) and (msg := _os_message(e)):
            return msg
        if getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            return f"not found{where}: {getattr(e, 'message', text)}"
        if type(e).__name__ in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "MaxRetryError"):
            return f"cannot reach the MLflow tracking server{where}: {text.splitlines()[0][:300]}"
        if type(e).__name__ == "UnsupportedModelRegistryStoreURIException":
            return text.strip().splitlines()[0]
    return None
