"""A torch Dataset over the records table: one image (or MoCo's [query, key]) and its task targets.

The dataset applies no label policy and no split: it reads the rows and the task columns it is
given, as they are (``apply_policy`` and the split/draw functions run upstream on the table), so
the table logged with a run is exactly what the model saw.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from mococxr.data.cache import ImageCache, load_gray
from mococxr.errors import DataError


class CXRDataset(Dataset):
    """Items ``(image, target)`` for the rows of ``records``.

    ``image`` is ``transform(PIL image, mode L)``: a tensor, or ``[q, k]`` with
    :class:`~mococxr.data.transforms.TwoCrops`; the raw PIL image when ``transform`` is None.
    ``target`` is a float32 tensor ``[len(tasks)]`` with the table's values (NaN = unknown, to be
    masked by the loss), or an empty tensor when ``tasks`` is None (pretraining).
    With ``cache`` (an :class:`~mococxr.data.cache.ImageCache`), images are read from it by
    ``image_id`` instead of being decoded from ``path``.
    """

    def __init__(
        self,
        records: pd.DataFrame,
        transform: Callable[[Image.Image], Any] | None,
        tasks: Sequence[str] | None = None,
        cache: ImageCache | None = None,
    ):
        if not isinstance(records, pd.DataFrame):
            raise DataError(f"records must be a pandas DataFrame, got {type(records).__name__}")
        needed = ["image_id"] if cache is not None else ["image_id", "path"]
        for column in needed:
            if column not in records.columns:
                raise DataError(
                    f"records have no '{column}' column (columns: {', '.join(map(str, records.columns))})"
                )
        self.tasks = list(tasks) if tasks is not None else []
        missing = [task for task in self.tasks if task not in records.columns]
        if missing:
            raise DataError(
                f"task column(s) {missing} not in records (columns: {', '.join(map(str, records.columns))})"
            )
        # Plain lists and one tensor, not the DataFrame: cheap to index, and workers do not copy pandas.
        self.image_ids = records["image_id"].astype(str).tolist()
        self.paths = (
            records["path"].astype(str).tolist() if "path" in records.columns else [""] * len(records)
        )
        if cache is not None:
            absent = [i for i, image_id in enumerate(self.image_ids) if image_id not in cache]
            if absent:
                raise DataError(
                    f"records row {absent[0]}: image_id {self.image_ids[absent[0]]!r} is not in the image "
                    f"cache {cache.path} ({len(absent)} rows missing); rebuild it with "
                    "ImageCache.build(records, ...)"
                )
        try:
            values = records[self.tasks].to_numpy(dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise DataError(f"task columns {self.tasks} must hold numbers (1, 0, -1 or NaN): {exc}") from exc
        self.targets = torch.tensor(values.reshape(len(records), len(self.tasks)))
        self.transform = transform
        self.cache = cache

    def __len__(self) -> int:
        return len(self.image_ids)

    def load(self, index: int) -> Image.Image:
        """The untransformed image of row ``index`` (mode L), from the cache or the file."""
        if self.cache is not None:
            return self.cache.get(self.image_ids[index])
        try:
            return load_gray(self.paths[index])
        except DataError as exc:
            raise DataError(f"{exc} (records row {index}, image_id {self.image_ids[index]!r})") from exc

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` seeding Python's and NumPy's RNGs from the worker's torch seed.

    torchvision transforms draw from torch, which DataLoader already seeds per worker from its
    ``generator``; this makes any ``random``/``numpy`` based transform reproducible as well.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _loader_kwargs(seed: int) -> dict[str, Any]:
    """DataLoader arguments making shuffling and augmentation reproducible for a given ``seed``.

    Use as ``DataLoader(dataset, batch_size=..., num_workers=..., **_loader_kwargs(seed))``. With
    ``num_workers=0`` augmentations draw from the global torch RNG: seed it with ``torch.manual_seed``.
    """
    return {"generator": torch.Generator().manual_seed(int(seed)), "worker_init_fn": seed_worker}
