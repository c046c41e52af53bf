"""From a DataConfig to everything a run needs, once: records, tasks, patient-level splits, manifests.

One :class:`Prepared` is made per run (or per study, or per grid) and handed to pretraining, its
monitor, fine-tuning and every trial, so the label CSV is parsed and split once per process. All
stages share the same ``split_seed``, so the images pretraining sees never include a test image and
every fine-tune run of a grid shares one test set (the report refuses to compare runs whose test
manifests differ).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from mococxr.config import DataConfig
from mococxr.data.cache import ImageCache
from mococxr.data.labels import apply_policy, resolve_tasks
from mococxr.data.records import read_records
from mococxr.data.splits import Manifest, make_manifest, split_patients


@dataclass(frozen=True)
class Prepared:
    """The data of one run. ``splits`` carry the uncertainty policy; ``pretrain`` is unlabeled."""

    config: DataConfig
    records: pd.DataFrame  # the label CSV as read (the train CSV when a test CSV is given)
    tasks: tuple[str, ...]
    splits: dict[str, pd.DataFrame]  # train / val / test, policy applied
    pretrain: pd.DataFrame  # train + val patients (every record when the test set is a separate CSV)

    @cached_property
    def manifests(self) -> dict[str, Manifest]:
        """val, test and pretrain manifests, derived from the tables so they always describe them (a
        ``dataclasses.replace`` that swaps a split gets the manifests of the new split)."""
        seed = self.config.split_seed
        return {
            "val": make_manifest("val", self.splits["val"], seed=seed),
            "test": make_manifest("test", self.splits["test"], seed=seed),
            "pretrain": make_manifest("pretrain", self.pretrain, seed=seed),
        }

    @property
    def labeled(self) -> pd.DataFrame:
        """Train and val: what a linear probe or the pretraining monitor may look at."""
        return pd.concat([self.splits["train"], self.splits["val"]], ignore_index=True)


def read(cfg: DataConfig, *, csv: str | None = None) -> pd.DataFrame:
    """The records table of ``cfg`` (or of another CSV of the same dataset, e.g. the test CSV)."""
    kwargs = {"frontal_only": cfg.frontal_only} if cfg.dataset == "chexpert" else {}
    return read_records(cfg.dataset, cfg.root, csv if csv is not None else cfg.csv, **kwargs)


def prepare(cfg: DataConfig, records: pd.DataFrame | None = None) -> Prepared:
    """Read (unless ``records`` is given), resolve tasks, split by patient and write the manifests.

    With ``test_csv`` (CheXpert's valid.csv) that file is the test set and train/val come from the rest.
    """
    records = read(cfg) if records is None else records
    tasks = tuple(resolve_tasks(cfg.task, records))
    stratify = tasks[0] if tasks else None
    if cfg.test_csv:
        test = read(cfg, csv=cfg.test_csv)
        raw = split_patients(
            records, val=cfg.val, test=0.0, seed=cfg.split_seed, stratify=stratify, test_records=test
        )
        raw["test"] = test
        pretrain = records.reset_index(drop=True)
    else:
        raw = split_patients(records, val=cfg.val, test=cfg.test, seed=cfg.split_seed, stratify=stratify)
        pretrain = pd.concat([raw["train"], raw["val"]], ignore_index=True)
    splits = {k: apply_policy(v, list(tasks), cfg.policy) for k, v in raw.items()}
    return Prepared(cfg, records, tasks, splits, pretrain)


def open_cache(cfg: DataConfig, records: pd.DataFrame, image_size: int) -> ImageCache | None:
    """Open (building on first use) the pre-resized cache when ``cfg.cache`` names a folder."""
    if not cfg.cache:
        return None
    size = 256 if image_size > 128 else image_size  # augment at most one resize away from the model size
    return ImageCache.build(records, Path(cfg.cache) / f"{size}px", size=size)
