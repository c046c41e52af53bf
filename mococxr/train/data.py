"""From a DataConfig to the tables each training stage needs: records, patient-level splits, cache.

Every stage derives its splits through :func:`split_records` with the same ``split_seed``, so the
images pretraining sees never include a test image, and every fine-tune run of a grid shares one test
set (the report module refuses to compare runs whose test manifests differ).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mococxr.config import DataConfig
from mococxr.data.cache import ImageCache
from mococxr.data.labels import apply_policy, resolve_tasks
from mococxr.data.records import read_records
from mococxr.data.splits import split_patients


def load_records(cfg: DataConfig, *, csv: str | None = None) -> pd.DataFrame:
    kwargs = {"frontal_only": cfg.frontal_only} if cfg.dataset == "chexpert" else {}
    return read_records(cfg.dataset, cfg.root, csv if csv is not None else cfg.csv, **kwargs)


def split_records(cfg: DataConfig, records: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Patient-level {train, val, test}. With ``test_csv`` (CheXpert's valid.csv) that file is the test set."""
    records = load_records(cfg) if records is None else records
    tasks = resolve_tasks(cfg.task, records)
    stratify = tasks[0] if tasks else None
    if cfg.test_csv:
        test = load_records(cfg, csv=cfg.test_csv)
        splits = split_patients(records, val=cfg.val, test=0.0, seed=cfg.split_seed, stratify=stratify,
                                test_records=test)
        splits["test"] = test
    else:
        splits = split_patients(records, val=cfg.val, test=cfg.test, seed=cfg.split_seed, stratify=stratify)
    return {k: apply_policy(v, tasks, cfg.policy) for k, v in splits.items()}


def pretrain_records(cfg: DataConfig) -> pd.DataFrame:
    """The unlabeled images pretraining uses: train and val patients, never a test image."""
    records = load_records(cfg)
    if cfg.test_csv:
        return records.reset_index(drop=True)
    splits = split_patients(records, val=cfg.val, test=cfg.test, seed=cfg.split_seed,
                            stratify=_first_task(cfg, records))
    return pd.concat([splits["train"], splits["val"]], ignore_index=True)


def _first_task(cfg: DataConfig, records: pd.DataFrame) -> str | None:
    tasks = resolve_tasks(cfg.task, records)
    return tasks[0] if tasks else None


def load_cache(cfg: DataConfig, records: pd.DataFrame, image_size: int) -> ImageCache | None:
    """Open (building on first use) the pre-resized cache when ``cfg.cache`` names a folder."""
    if not cfg.cache:
        return None
    size = 256 if image_size > 128 else image_size  # augment at most one resize away from the model size
    return ImageCache.build(records, Path(cfg.cache) / f"{size}px", size=size)
