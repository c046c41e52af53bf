"""The fine-tune runs a report reads from MLflow: finding them, checking them, loading their predictions.

Runs are found by their ``mococxr.*`` tags (FINISHED fine-tune runs only); each run's per-image test
predictions are downloaded once and cached by run id (a finished run's artifacts never change), then
aligned on ``image_id`` so that every run is scored on the same, sorted list of test images.

Run sets that would compare unlike things are refused here, before any bootstrap: runs scored on
different test sets (test manifest hash or image ids differ), different labels for the same image, two
runs claiming the same cell and draw, or a table cell whose draws are missing where the other cells
have them. Every message names the runs involved.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from mococxr.console import progress as progress_bar
from mococxr.data.phantom import is_phantom
from mococxr.errors import ConfigError, DataError, TrackingError
from mococxr.tracking import artifacts as ma
from mococxr.tracking import filters as flt
from mococxr.tracking import mlflow as mt

PREDICTIONS_ARTIFACT = "predictions/test.parquet"
# a download that fails with these failed on this machine's disk (the cache under --out), not in the store
_LOCAL_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
# A table cell: every draw of one architecture x initialization x protocol x label fraction.
CELL = ["backbone", "init", "protocol", "fraction"]
_REQUIRED_TAGS = ("backbone", "init", "protocol", "label_fraction", "draw")


@dataclass
class Aligned:
    """Every run's test predictions on one shared, sorted list of images."""

    image_id: np.ndarray
    patient_id: np.ndarray
    tasks: list[str]
    labels: np.ndarray  # [n, tasks], NaN = masked
    scores: dict[str, np.ndarray]  # run id -> [n, tasks]


# --------------------------------------------------------------------------- finding runs


def find_runs(
    experiment: str,
    *,
    dataset: str | None = None,
    task: str | None = None,
    backbone: str | None = None,
) -> pd.DataFrame:
    """The finished fine-tune runs of ``experiment`` matching the filters, one row per run.

    Columns: run_id, run_name, backbone, init, protocol, dataset, task, fraction (float), draw (int),
    test_manifest_sha256, config_hash, pretrain_run_id. Raises ``TrackingError`` when the experiment
    does not exist or nothing matches, naming the experiment and the filters.
    """
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingError(f"experiment {experiment!r} not found at {mlflow.get_tracking_uri()}")
    filters = {"kind": "finetune", "dataset": dataset, "task": task, "backbone": backbone}
    for key, value in filters.items():
        if value is not None and not flt.searchable(value):
            raise ConfigError(f"report filter {key}={value!r} must not hold both a single and a double quote")
    where = flt.both(flt.status("FINISHED"), flt.tags({mt.tag(k): v for k, v in filters.items()}))
    found, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], where, max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            break
    if not found:
        shown = ", ".join(f"{k}={v}" for k, v in filters.items() if v is not None)
        raise TrackingError(f"no FINISHED runs in experiment {experiment!r} with {shown}")
    return pd.DataFrame([_run_row(r) for r in found]).sort_values(["run_id"]).reset_index(drop=True)


def _run_row(run) -> dict:
    t = run.data.tags
    rid = run.info.run_id
    missing = [k for k in _REQUIRED_TAGS if mt.tag(k) not in t]
    if missing:
        raise DataError(
            f"run {rid}: missing tag(s) {[mt.tag(k) for k in missing]}; was it logged by finetune?"
        )
    try:
        fraction, draw = float(t[mt.tag("label_fraction")]), int(t[mt.tag("draw")])
    except ValueError as exc:
        raise DataError(
            f"run {rid}: tags {mt.tag('label_fraction')}/{mt.tag('draw')} are not numbers: {exc}"
        ) from exc
    row = {"run_id": rid, "run_name": run.info.run_name or ""}
    for key in ("backbone", "init", "protocol", "dataset", "task"):
        row[key] = t.get(mt.tag(key), "")
    row.update(fraction=fraction, draw=draw)
    for key in (
        "test_manifest_sha256",
        "config_hash",
        "pretrain_run_id",
        "registry_version",
        "checkpoint_epoch",
    ):
        row[key] = t.get(mt.tag(key), "")
    p = run.data.params
    row.update(
        registered_model=p.get("init_registered_model", ""),
        phantom=_is_phantom(p),
        test_source=_test_source(p),
    )
    return row


def _is_phantom(params: Mapping[str, str]) -> bool:
    """Whether a run trained on the demo's phantom: its ``phantom`` param (finetune checks the marker file
    the phantom generator writes into the data root), else, for runs older than that param, the marker itself
    when the run's data root is on this machine."""
    if "phantom" in params:
        return params["phantom"] == "True"
    root = params.get("data.root")
    return bool(root) and is_phantom(root)


def _test_source(params: Mapping[str, str]) -> str:
    """Where a run's test images came from, in words, from its data params."""
    if params.get("data.test_csv", "None") not in ("None", ""):
        return f"the images of {params['data.test_csv']}"
    if "data.test" in params:
        return (
            f"a patient-level split ({params['data.test']} of patients, split seed "
            f"{params.get('data.split_seed', '?')})"
        )
    return "unknown (the runs log no data params)"


def cell_name(backbone: str, init: str, protocol: str, fraction: float) -> str:
    """A cell's name in tables and messages: ``resnet18/moco/linear/0.1``."""
    return f"{backbone}/{init}/{protocol}/{fraction:g}"


def _listing(runs: pd.DataFrame, limit: int = 6) -> str:
    ids = [
        f"{r.run_id} ({cell_name(r.backbone, r.init, r.protocol, r.fraction)} draw {r.draw})"
        for r in runs.itertuples()
    ]
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def check_runs(runs: pd.DataFrame) -> None:
    """Refuse run sets whose table would compare unlike things (see the module docstring).

    Cheap: tags only, before any artifact is downloaded. Every message names the runs involved.
    """
    for key, flag in (("dataset", "--dataset"), ("task", "--task")):
        values = sorted(runs[key].unique())
        if len(values) > 1:
            groups = "; ".join(f"{key}={v!r}: {_listing(runs[runs[key] == v], 3)}" for v in values)
            raise DataError(
                f"runs mix several {key}s, which cannot share a table; pick one with {flag}. {groups}"
            )
    shas = sorted(runs["test_manifest_sha256"].unique())
    if len(shas) > 1:
        groups = "; ".join(
            f"test manifest {s[:12] or '(untagged)'}: {_listing(runs[runs.test_manifest_sha256 == s], 3)}"
            for s in shas
        )
        raise DataError(f"runs were scored on different test sets and cannot be compared: {groups}")

    dup = runs[runs.duplicated(CELL + ["draw"], keep=False)]
    if len(dup):
        raise DataError(
            "several finished runs claim the same cell and draw (reruns or different configs); delete or "
            f"move the unwanted ones, or filter by --backbone/--task: {_listing(dup, 10)}"
        )

    rows = runs[["backbone", "init", "protocol"]].drop_duplicates()
    problems = []
    for fraction, at_f in runs.groupby("fraction"):
        draws = set(at_f["draw"])
        for row in rows.itertuples(index=False):
            cell = at_f[
                (at_f.backbone == row.backbone) & (at_f.init == row.init) & (at_f.protocol == row.protocol)
            ]
            name = cell_name(row.backbone, row.init, row.protocol, fraction)
            if cell.empty:
                problems.append(
                    f"{name}: no runs (other cells at fraction {fraction:g}: {_listing(at_f, 3)})"
                )
            elif set(cell["draw"]) != draws:
                missing = sorted(draws - set(cell["draw"]))
                problems.append(f"{name}: draws {missing} missing (has {_listing(cell, 3)})")
    if problems:
        raise DataError("table cells with missing runs:\n  " + "\n  ".join(problems))


def check_comparison(runs: pd.DataFrame, treatment: str | None, baselines: Sequence[str]) -> list[str]:
    """The baseline inits the improvement table compares ``treatment`` against (those the runs carry).

    Init labels are whatever the grid called them, so a treatment or baseline label the runs do not
    carry would silently leave the improvement table empty; it is refused instead, naming the labels
    the runs do carry. The table is asked for when ``treatment`` is set and the runs carry more than
    one init: runs of a single init (or ``treatment=None``) have absolute numbers only, and get an
    empty improvement table as before.
    """
    inits = sorted(runs["init"].unique())
    if treatment is None or len(inits) < 2:
        return []
    hint = "; set treatment/baseline to labels among these (treatment=None: absolute numbers only)"
    if treatment not in inits:
        raise ConfigError(
            f"no run carries the treatment init {treatment!r}; the runs carry inits {inits}{hint}"
        )
    present = [b for b in baselines if b in inits and b != treatment]
    if not present:
        raise ConfigError(
            f"no run carries any of the baseline inits {list(baselines)} to compare "
            f"{treatment!r} against; the runs carry inits {inits}{hint}"
        )
    return present


# --------------------------------------------------------------------------- predictions


def load_predictions(
    run_ids: Sequence[str], cache_dir: str | os.PathLike, *, workers: int = 8, progress: bool = False
) -> dict[str, pd.DataFrame]:
    """Each run's ``predictions/test.parquet`` as a DataFrame, downloaded in parallel and cached.

    The cache key is the run id alone: the report only reads FINISHED runs, whose artifacts do not
    change. Only a file that parsed enters the cache: it is downloaded into a temporary folder, read,
    then renamed in, so neither an interrupted download nor a corrupt artifact is ever cached (a fixed
    artifact is read afresh). A cached file that no longer parses is dropped and downloaded again.
    A corrupt artifact is a ``DataError`` naming the run and the artifact.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    client = MlflowClient()

    def fetch(run_id: str) -> pd.DataFrame:
        path = cache / f"{run_id}.parquet"
        if path.is_file():
            try:
                return pd.read_parquet(path)
            except Exception:  # damaged on disk since (or cached by an older, unverifying version)
                path.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            try:
                local = client.download_artifacts(run_id, PREDICTIONS_ARTIFACT, tmp)
            except OSError as exc:
                if exc.errno in _LOCAL_DISK_ERRORS:  # our side: the folder the files go to, not the store
                    raise OSError(exc.errno, exc.strerror, str(cache)) from exc
                raise TrackingError(f"run {run_id}: cannot download {PREDICTIONS_ARTIFACT}: {exc}") from exc
            except Exception as exc:  # MlflowException: the message names the run
                raise TrackingError(f"run {run_id}: cannot download {PREDICTIONS_ARTIFACT}: {exc}") from exc
            frame = read_predictions(local, run_id)
            os.replace(local, path)
        return frame

    with ma.quiet_downloads(), ThreadPoolExecutor(max_workers=max(1, min(workers, len(run_ids)))) as pool:
        jobs = pool.map(fetch, run_ids)
        frames = list(progress_bar(jobs, "predictions", total=len(run_ids), enabled=progress))
    return dict(zip(run_ids, frames, strict=True))


def read_predictions(path: str | os.PathLike, run_id: str) -> pd.DataFrame:
    """A downloaded predictions file, or a ``DataError`` that names the run and says how to fix it."""
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError or ValueError depending on the damage
        raise DataError(
            f"run {run_id}: artifact {PREDICTIONS_ARTIFACT} is not a readable parquet file ({exc}); log it "
            "again (or delete or filter out the run) and re-run the report; nothing was cached"
        ) from exc


def align_predictions(predictions: Mapping[str, pd.DataFrame]) -> Aligned:
    """Put every run's predictions on the same sorted image list; refuse differing images or labels."""
    ref_id, aligned_labels, out = None, None, {}
    tasks: list[str] = []
    for rid, df in predictions.items():
        if "image_id" not in df.columns:
            raise DataError(f"run {rid}: {PREDICTIONS_ARTIFACT} has no image_id column")
        if df["image_id"].duplicated().any():
            dup = df.loc[df["image_id"].duplicated(), "image_id"].iloc[0]
            raise DataError(f"run {rid}: {PREDICTIONS_ARTIFACT} lists image {dup!r} more than once")
        df = df.sort_values("image_id", kind="stable").reset_index(drop=True)
        run_tasks = [c.removeprefix("label:") for c in df.columns if c.startswith("label:")]
        missing = [t for t in run_tasks if f"score:{t}" not in df.columns]
        if not run_tasks or missing:
            raise DataError(
                f"run {rid}: {PREDICTIONS_ARTIFACT} needs label:<task> and score:<task> columns; "
                f"has {list(df.columns)}"
            )
        labels = df[[f"label:{t}" for t in run_tasks]].to_numpy(np.float64)
        if ref_id is None:
            ref_id, ref, tasks, aligned_labels = rid, df, run_tasks, labels
        else:
            _check_same_test_set(ref_id, ref, tasks, aligned_labels, rid, df, run_tasks, labels)
        out[rid] = df[[f"score:{t}" for t in tasks]].to_numpy(np.float64)
    if ref_id is None:
        raise DataError("no predictions to align")
    patients = ref["patient_id"].astype(str).to_numpy() if "patient_id" in ref else ref["image_id"].to_numpy()
    return Aligned(ref["image_id"].astype(str).to_numpy(), patients, tasks, aligned_labels, out)


def _check_same_test_set(ref_id, ref, tasks, ref_labels, rid, df, run_tasks, labels) -> None:
    if run_tasks != tasks:
        raise DataError(f"runs {ref_id} and {rid} predict different tasks: {tasks} vs {run_tasks}")
    a, b = ref["image_id"].to_numpy(), df["image_id"].to_numpy()
    if a.shape != b.shape or not (a == b).all():
        only_ref, only_run = np.setdiff1d(a, b), np.setdiff1d(b, a)
        raise DataError(
            f"runs {ref_id} and {rid} were scored on different test images ({len(only_ref)} only in the "
            f"first, e.g. {list(only_ref[:3])}; {len(only_run)} only in the second, "
            f"e.g. {list(only_run[:3])})"
        )
    same = (ref_labels == labels) | (np.isnan(ref_labels) & np.isnan(labels))
    if not same.all():
        i, j = np.argwhere(~same)[0]
        raise DataError(
            f"runs {ref_id} and {rid} disagree on label:{tasks[j]} of image {a[i]!r} "
            f"({ref_labels[i, j]} vs {labels[i, j]}): different label policy or data?"
        )
