"""Where runs live and how they are tagged.

MLflow is the system of record. This module owns the store location (the embedded default is
``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts/``; ``MLFLOW_TRACKING_URI`` or
``--tracking-uri`` override it, including an ``http(s)://`` tracking server), the ``mococxr.*`` tag
schema and the run lifecycle (its owner, how a run ends). Logging plain data (JSON,
DataFrames, state dicts) is :mod:`mococxr.tracking.artifacts`.
The file store is refused: it raises in MLflow >= 3.13 and cannot hold LoggedModels well.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mococxr.console import working, write
from mococxr.errors import ConfigError, MococxrError, TrackingError, user_message
from mococxr.tracking.probe import check_sqlite, probe_server, probe_sqlite, store_check_wanted

TAG_PREFIX = "mococxr."
DEFAULT_STORE_DIR = "mlruns"
# Database schemes (with an optional +driver) and tracking servers; MLflow's file store is refused.
SUPPORTED_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https")
EXPERIMENT_KIND_TAG = (
    "mlflow.experimentKind"  # the UI opens "custom_model_development" in Model training mode
)
NOTE_TAG = "mlflow.note.content"

# Tag keys (without the prefix) that DESIGN.md fixes; anything else is a bug in the caller.
TAG_KEYS = frozenset(
    {
        "kind",
        "backbone",
        "init",
        "protocol",
        "dataset",
        "task",
        "label_fraction",
        "draw",
        "pretrain_run_id",
        "checkpoint_epoch",
        "optuna_study",
        "optuna_trial",
        "optuna_state",
        "manifest_sha256",
        "test_manifest_sha256",
        "config_hash",
        "registry_version",
        "grid",
        "preset",
        "image_size",
        "owner",
        "end_reason",  # who ran a run (host:pid) and why it ended unfinished: see start_run
        "lr",
        "scheduler",  # a plan's registered trial checkpoints: the searched values (flows/stages.py)
        "init_fallback",  # why init auto started a run from random weights (train/inits.py)
        "linear_lr",  # the learning rate a linear fine-tune run's head trained at (train/linear_lr.py)
        "best_at_last_epoch",  # a fine-tune run's best validated epoch was its last (train/finetune.py)
        # On registered versions (tracking/registry.py): the run and LoggedModel a version came from, its
        # alias or "archived" (the key says "stage" because stores already hold it), its fine-tune run count.
        "run_id",
        "model_id",
        "stage",
        "finetune_runs",
        "kept",  # on a checkpoint that reconcile/retention would have deleted (train/checkpoints.py)
        "report_files",  # a report run's folder of its current, complete files (report/record.py)
    }
)


def tag(key: str) -> str:
    """The full tag name for ``key`` (``kind`` -> ``mococxr.kind``)."""
    if key not in TAG_KEYS:
        raise ValueError(f"unknown mococxr tag {key!r}; known: {sorted(TAG_KEYS)}")
    return TAG_PREFIX + key


def tags(**values: Any) -> dict[str, str]:
    """``tags(kind="pretrain", backbone="resnet18")`` -> prefixed string tags, ``None`` values dropped."""
    return {tag(k): str(v) for k, v in values.items() if v is not None}


def default_tracking_uri(base: str | os.PathLike | None = None) -> str:
    """``sqlite:///<base>/mlruns/mlflow.db`` with ``base`` the current folder by default."""
    store = Path(base or os.getcwd()).resolve() / DEFAULT_STORE_DIR
    return f"sqlite:///{store / 'mlflow.db'}"


def resolve_tracking_uri(override: str | None = None) -> str:
    """The tracking URI in force: ``override``, else ``MLFLOW_TRACKING_URI``, else the embedded store."""
    uri = override or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme in ("", "file") or (len(scheme) == 1 and scheme.isalpha()):  # a bare path or C:\...
        raise TrackingError(
            f"tracking URI {uri!r} names MLflow's file store, which MLflow 3.13+ refuses; use a "
            f"database store such as sqlite:///{Path(uri.removeprefix('file:')).resolve()}/mlflow.db "
            "or an http(s):// tracking server"
        )
    if scheme.split("+", 1)[0] not in SUPPORTED_SCHEMES:
        raise TrackingError(
            f"tracking URI {uri!r}: unsupported scheme {scheme!r}; use sqlite:///PATH/mlflow.db, "
            "postgresql://..., mysql://..., mssql://... or an http(s):// tracking server"
        )
    return uri


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    return None


def artifact_root(uri: str) -> Path | None:
    """Local artifact folder for a sqlite store (beside the database), ``None`` for servers/other DBs.

    ``MOCOCXR_ARTIFACT_ROOT`` overrides it. A tracking server chooses its own (``mlflow-artifacts:``).
    """
    if os.environ.get("MOCOCXR_ARTIFACT_ROOT"):
        return Path(os.environ["MOCOCXR_ARTIFACT_ROOT"]).resolve()
    db = _sqlite_path(uri)
    return db.resolve().parent / "artifacts" if db is not None else None


@dataclass(frozen=True)
class Store:
    """Where this process logs: the MLflow tracking URI, the local artifact folder (sqlite stores) and
    the Optuna storage that lives beside the MLflow store (``optuna.db`` next to ``mlflow.db``)."""

    tracking_uri: str
    artifact_root: Path | None
    optuna_storage: str


_OPENED: dict[str, Store] = {}


OPTUNA_ENV = "MOCOCXR_OPTUNA_STORAGE"  # the Optuna storage every worker shares (studies and work queues)


def default_optuna_storage(tracking_uri: str) -> str:
    """Optuna's storage for a tracking URI: ``$MOCOCXR_OPTUNA_STORAGE`` (a shared PostgreSQL for many
    machines), else ``optuna.db`` beside a sqlite ``mlflow.db``, else ``mlruns/optuna.db`` in the current
    folder (a tracking server's users name a shared one)."""
    if os.environ.get(OPTUNA_ENV):
        return os.environ[OPTUNA_ENV]
    db = _sqlite_path(tracking_uri)
    folder = db.resolve().parent if db is not None else Path(os.getcwd()).resolve() / DEFAULT_STORE_DIR
    return f"sqlite:///{folder / 'optuna.db'}"


class _Stderr:
    """``sys.stderr`` as it is at each write (pytest's capture, a redirect made after import)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def quiet_mlflow() -> None:
    """Keep MLflow's chatter off the terminal, its warnings and errors on it; every entry point runs this
    (through :func:`open_store`), and running it again changes nothing.

    - Its INFO lines ("Creating initial MLflow database tables...", "Updating database tables", alembic's
      migration steps): the ``mlflow`` and ``alembic`` loggers log from WARNING up.
    - Its ``eprint`` lines ("Successfully registered model ...", "Created version ..."): they and its
      log handler share one stream, ``MLFLOW_LOGGING_STREAM``; the handler now writes to stderr itself,
      and that stream is switched off, so only the ``eprint`` lines are lost.
    - The "View run ... at: http://..." and "View experiment at" lines a tracking server's runs print as
      they end: ``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT``.

    ``MLFLOW_LOGGING_LEVEL`` set by the user (e.g. ``INFO`` or ``DEBUG`` to see it all again) leaves MLflow's
    own logging as it is, and a ``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT`` already set is kept.
    """
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if os.environ.get("MLFLOW_LOGGING_LEVEL"):
        return
    from mlflow.utils import logging_utils

    for name in ("mlflow", "alembic"):
        if logging.getLogger(name).getEffectiveLevel() < logging.WARNING:
            logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("mlflow", "alembic", "sqlalchemy.engine", "huey"):  # the loggers MLflow gives its handler
        for handler in logging.getLogger(name).handlers:
            if (
                isinstance(handler, logging.StreamHandler)
                and handler.stream is logging_utils.MLFLOW_LOGGING_STREAM
            ):
                handler.setStream(_STDERR)
    logging_utils.MLFLOW_LOGGING_STREAM.enabled = False


_STDERR = _Stderr()


def open_store(tracking_uri: str | None = None) -> Store:
    """Point MLflow at the store in force and return it; called once by each entry point.

    The store is ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the embedded
    ``sqlite:///mlruns/mlflow.db``. The embedded store's folder and tables are created on first use;
    a store already opened by this process is not opened again. A sqlite store's header is checked
    always, its pages (``PRAGMA quick_check``) when it is small or ``MOCOCXR_CHECK_STORE=1`` asks
    (see :mod:`mococxr.tracking.probe`). MLflow's INFO chatter is switched off (:func:`quiet_mlflow`).
    """
    quiet_mlflow()
    uri = resolve_tracking_uri(tracking_uri)
    store = _OPENED.get(uri)
    if store is None:
        db = _sqlite_path(uri)
        if uri.startswith(("http://", "https://")):
            probe_server(uri)
        mlflow.set_tracking_uri(uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            probe_sqlite(db)
            if store_check_wanted(db):
                check_sqlite(db)
            # Several processes starting on a new sqlite store race to create its tables (alembic fails
            # with "0 found"); the first one creates them under a lock, the others then find them.
            with open(db.with_name(db.name + ".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                new = not db.exists() or db.stat().st_size == 0
                if new:  # MLflow's own line about it is switched off (quiet_mlflow); ~10 s on 2 CPU cores
                    write(f"creating the MLflow store {uri} (its tables, once)", file=sys.stderr)
                try:
                    with working(f"creating the MLflow store {uri}", enabled=new):
                        MlflowClient().search_experiments(max_results=1)
                except Exception as exc:  # a damaged store that the checks above let through, named
                    if isinstance(exc, MococxrError) or (message := user_message(exc, uri)) is None:
                        raise
                    raise TrackingError(message) from exc
        store = Store(uri, artifact_root(uri), default_optuna_storage(uri))
        _OPENED[uri] = store
    elif mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)
    return store


def current_store(store: Store | None = None) -> Store:
    """``store`` when the caller passed one down, else the store in force (opened once per URI), so a
    library call without an entry point still logs where ``MLFLOW_TRACKING_URI`` points."""
    if store is not None:
        if mlflow.get_tracking_uri() != store.tracking_uri:
            mlflow.set_tracking_uri(store.tracking_uri)
        return store
    return open_store()


def check_experiment_name(name: str) -> str:
    """``name`` if it can name an experiment (and its artifact folder), else a ``ConfigError`` naming it.

    The artifact folder is ``<artifact root>/<name with / as _>``: ``.``, ``..`` and blank names would put
    artifacts beside ``mlflow.db`` or above it, so they are refused with every other name that would leave
    the artifact root."""
    folder = name.replace("/", "_")  # the artifact folder's name (see ensure_experiment)
    problem = None
    if not name.strip():
        problem = "it is empty"
    elif "\x00" in name:
        problem = "it holds a NUL character"
    elif "'" in name and '"' in name:
        problem = "it holds both a single and a double quote, which no MLflow search filter can match"
    elif folder.strip() in (".", "..") or os.path.dirname(os.path.normpath(f"/root/{folder}")) != "/root":
        problem = "it is a path component, so its artifacts would land outside the artifact root"
    if problem:
        raise ConfigError(
            f"experiment name {name!r} (--experiment) is refused: {problem}; use letters, digits, "
            "'-', '_' or '/'"
        )
    return name


def ensure_experiment(name: str) -> str:
    """The id of experiment ``name``, created with the project's artifact location if it is new.

    Experiments are tagged as model training (``mlflow.experimentKind``), so the MLflow UI opens them on
    their runs rather than in GenAI mode, and carry a description; an older experiment gains the kind.
    Names that are path components (``.``, ``..``, blank) are refused (:func:`check_experiment_name`)."""
    check_experiment_name(name)
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(
                f"experiment {name!r} is deleted; restore it (`mlflow experiments restore`) or pick another "
                "name"
            )
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
        return exp.experiment_id
    root = artifact_root(mlflow.get_tracking_uri())
    location = None
    if root is not None:
        location = (root / name.replace("/", "_")).as_uri()
    exp_tags = {
        EXPERIMENT_KIND_TAG: "custom_model_development",
        NOTE_TAG: f"mococxr experiment {name!r}: runs logged by the `mococxr` command (see README.md)",
    }
    try:
        return client.create_experiment(name, artifact_location=location, tags=exp_tags)
    except mlflow.exceptions.MlflowException:  # created meanwhile by another worker
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def owner_id() -> str:
    """``host:pid`` of this process: the ``mococxr.owner`` tag of the runs it starts."""
    return f"{os.uname().nodename}:{os.getpid()}"


def _end_after(exc: BaseException, where: str, run_id: str) -> None:
    """Mark the active run KILLED (Ctrl-C, SIGTERM) or FAILED with the reason; raise what the caller
    should."""
    status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
    try:
        mlflow.set_tag(
            tag("end_reason"),
            "interrupted (Ctrl-C or SIGTERM)" if status == "KILLED" else f"{type(exc).__name__}: {exc}"[:500],
        )
    except Exception:  # noqa: BLE001 - the reason is a courtesy; the status below is what matters
        pass
    try:
        mlflow.end_run(status)
    except Exception as end_exc:
        raise TrackingError(
            f"{where} stopped with {type(exc).__name__}: {exc}; marking it {status} failed too ({end_exc}), "
            f"so it still shows RUNNING although it is incomplete: once the server is back, run "
            f"MlflowClient().set_terminated({run_id!r}, {status!r})"
        ) from exc
    if isinstance(exc, (MlflowException, requests.RequestException)) and not isinstance(exc, MococxrError):
        raise TrackingError(f"{where} is incomplete and marked {status}: logging failed: {exc}") from exc


@contextmanager
def start_run(
    experiment: str,
    *,
    run_name: str | None = None,
    run_tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or, with ``run_id``, resume) a run in ``experiment``; status is FAILED if the body raises.

    ``KeyboardInterrupt`` marks the run KILLED, so an interrupted run is visible as such and resumable.
    A logging call that fails for good (MLflow has already retried transient server errors) is raised
    as a ``TrackingError`` naming the run, the store and the request that failed, so a half-logged run
    never looks complete; if the run cannot even be marked, the error says it is left RUNNING.
    The run carries its owner (``mococxr.owner`` = host:pid). A run whose worker dies is marked FAILED
    by whoever finds its work queue lease dead (see :mod:`mococxr.sweep.queue`).
    """
    exp_id = ensure_experiment(experiment)
    nested = mlflow.active_run() is not None
    owner = tags(owner=owner_id())
    resumed = run_id is not None
    if resumed:  # resumed runs change owner
        run = mlflow.start_run(
            run_id=run_id, nested=nested, run_name=run_name, tags={**(run_tags or {}), **owner}
        )
    else:
        run = mlflow.start_run(
            experiment_id=exp_id,
            run_name=run_name,
            tags={**(run_tags or {}), **owner},
            parent_run_id=parent_run_id,
            nested=nested,
        )
    where = f"run {run.info.run_id} (experiment {experiment!r}) in {mlflow.get_tracking_uri()}"
    try:
        yield run
    except BaseException as exc:
        _end_after(exc, where, run.info.run_id)
        raise
    try:
        mlflow.end_run("FINISHED")
    except Exception as exc:
        raise TrackingError(
            f"{where}: everything was logged, but marking it FINISHED failed ({exc}); "
            f"it shows RUNNING until MlflowClient().set_terminated({run.info.run_id!r})"
        ) from exc
    if resumed:
        _clear_end_reason(run.info.run_id, where)


def _clear_end_reason(run_id: str, where: str) -> None:
    """A resumed run that FINISHED drops the ``mococxr.end_reason`` of its earlier, KILLED or FAILED life."""
    client = MlflowClient()
    try:
        if tag("end_reason") in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, tag("end_reason"))
    except MlflowException as exc:  # the run is FINISHED and complete; only its old reason stays
        warnings.warn(
            f"{where} FINISHED, but its stale {tag('end_reason')} tag could not be removed: {exc}",
            stacklevel=3,
        )
