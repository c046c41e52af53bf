"""A pre-resized uint8 image cache: decode every image once, then feed training from a memmap.

Decoding a 2000 px PNG costs ~20-40 ms, slower than a CPU training step consumes images; a
256 px grayscale copy in one memory-mapped file (~65 MB per 1,000 images) is read and augmented at
~1,000 img/s per core. The cache is a directory::

    path/
      index.json     {"format", "size", "resize", "image_ids", "paths"}, written once per build
      progress.json  {"done": k, "n": n}: images 0..k-1 are written (the build resumes from k)
      images.u8      raw uint8 array [n, size, size], row i is image_ids[i]

Each image is converted to grayscale (see :func:`load_gray`) and resized to ``size`` x ``size``
with PIL's antialiased bilinear filter, *squashing* it to a square rather than cropping: the
transforms in :mod:`mococxr.data.transforms` also squash, so an image has the same geometry from
its file or from the cache, and no border (where lateral findings such as effusions sit) is lost.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mococxr.console import progress as progress_bar
from mococxr.data.workers import die_with_parent
from mococxr.errors import DataError

FORMAT = 1
INDEX = "index.json"
PROGRESS = "progress.json"
IMAGES = "images.u8"
RESIZE = "square, PIL bilinear antialiased, aspect ratio not kept"
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def load_gray(path: str | os.PathLike, size: int | None = None) -> Image.Image:
    """Read an image file as an 8-bit grayscale PIL image (mode ``L``), resized when ``size`` is given.

    8-bit and colour images are converted with PIL (``RGB`` -> ``L`` uses ITU-R 601 luma). 16-bit and
    float images (e.g. 12-bit radiographs stored in 16-bit PNGs) are stretched linearly from their
    own min to max onto 0..255: PIL's plain conversion would clip everything above 255 to white.
    With ``size``, JPEGs are decoded at the smallest DCT scale still >= ``size`` (much faster for
    full-resolution CheXpert) and the result is resized to ``size`` x ``size``.
    Any decoding failure raises :class:`DataError` naming the file.
    """
    try:
        with Image.open(path) as image:
            if size is not None:
                image.draft("L", (size, size))
            gray = _to_gray(image)
            if size is not None and gray.size != (size, size):
                gray = gray.resize((size, size), Image.Resampling.BILINEAR)
            gray.load()
            return gray
    except FileNotFoundError as exc:
        raise DataError(f"image file not found: {path}") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib errors... per format
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


def _to_gray(image: Image.Image) -> Image.Image:
    if image.mode == "L":
        image.load()
        return image
    if image.mode in _HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float32)
        lo, hi = float(values.min()), float(values.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return Image.fromarray(np.rint((values - lo) * scale).astype(np.uint8))
    return image.convert("L")


def _load_row(item: tuple[int, str], size: int) -> np.ndarray:
    """Worker function: one cache row as a uint8 array (module level so a process pool can pickle it)."""
    row, path = item
    try:
        return np.asarray(load_gray(path, size), dtype=np.uint8)
    except DataError as exc:
        raise DataError(f"{exc} (records row {row})") from None


def _write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically: an interrupted build never leaves a half-written index behind."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DataError(
            f"image cache file {path} is unreadable ({exc}); delete the directory and rebuild"
        ) from exc


def _validate_records(records: pd.DataFrame) -> tuple[list[str], list[str]]:
    if not isinstance(records, pd.DataFrame):
        raise DataError(f"records must be a pandas DataFrame, got {type(records).__name__}")
    for column in ("image_id", "path"):
        if column not in records.columns:
            raise DataError(
                f"records have no '{column}' column (columns: {', '.join(map(str, records.columns))})"
            )
        missing = records[column].isna().to_numpy().nonzero()[0]
        if len(missing):
            raise DataError(f"records row {missing[0]}: field '{column}' is empty")
    if len(records) == 0:
        raise DataError("records are empty: nothing to cache")
    ids = records["image_id"].astype(str).tolist()
    duplicated = records["image_id"].astype(str).duplicated().to_numpy().nonzero()[0]
    if len(duplicated):
        row = int(duplicated[0])
        raise DataError(f"records row {row}: image_id {ids[row]!r} is not unique")
    return ids, records["path"].astype(str).tolist()


class ImageCache:
    """Read-only view of a cache directory: ``get(image_id)`` returns the pre-resized PIL image (mode L).

    Create one with :meth:`build` (decodes images, reuses or resumes an existing cache) or
    :meth:`open`. Safe to pass to DataLoader workers: the memmap is reopened lazily in each process
    instead of being pickled.
    """

    def __init__(self, path: str | os.PathLike, image_ids: list[str], size: int):
        self.path = Path(path)
        self.size = int(size)
        self.image_ids = list(image_ids)
        self._row = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self._images: np.memmap | None = None

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> ImageCache:
        """Open a complete cache directory; :class:`DataError` if it is missing, partial or damaged."""
        path = Path(path)
        index = _read_json(path / INDEX)
        if index is None:
            raise DataError(f"no image cache at {path}: build it with ImageCache.build(records, '{path}')")
        if index.get("format") != FORMAT:
            raise DataError(
                f"image cache {path} has format {index.get('format')}, expected {FORMAT}; rebuild it"
            )
        n, size = len(index["image_ids"]), int(index["size"])
        done = (_read_json(path / PROGRESS) or {}).get("done", 0)
        if done != n:
            raise DataError(
                f"image cache {path} is incomplete ({done} of {n} images); rerun the build to resume"
            )
        expected = n * size * size
        actual = (path / IMAGES).stat().st_size if (path / IMAGES).is_file() else -1
        if actual != expected:
            raise DataError(
                f"image cache file {path / IMAGES} has {actual} bytes, expected {expected}; rebuild it"
            )
        return cls(path, index["image_ids"], size)

    def _array(self) -> np.memmap:
        if self._images is None:
            shape = (len(self.image_ids), self.size, self.size)
            self._images = np.memmap(self.path / IMAGES, dtype=np.uint8, mode="r", shape=shape)
        return self._images

    def get_array(self, image_id: str) -> np.ndarray:
        """The cached uint8 array ``[size, size]`` of ``image_id`` (a read-only view of the memmap)."""
        row = self._row.get(image_id)
        if row is None:
            raise DataError(f"image_id {image_id!r} is not in the image cache {self.path}; rebuild the cache")
        return self._array()[row]

    def get(self, image_id: str) -> Image.Image:
        """The cached image of ``image_id`` as a PIL image, mode ``L``, ``size`` x ``size``."""
        return Image.fromarray(np.array(self.get_array(image_id)))

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._row

    def __repr__(self) -> str:
        return f"ImageCache({str(self.path)!r}, n={len(self)}, size={self.size})"

    def __getstate__(self) -> dict:
        # np.memmap pickles as its full contents; workers reopen the file instead.
        return {**self.__dict__, "_images": None}

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        records: pd.DataFrame,
        path: str | os.PathLike,
        size: int = 256,
        workers: int | None = None,
        *,
        progress: bool = True,
    ) -> ImageCache:
        """Decode and resize every image of ``records`` (columns ``image_id``, ``path``) into ``path``.

        Re-running is cheap and safe: a complete cache of the same ``size`` that holds every
        ``(image_id, path)`` pair of ``records`` is reused as it is (it may hold more images, e.g.
        the full dataset when ``records`` is one split); an interrupted build of such a cache
        resumes where it stopped; anything else is rebuilt from scratch. ``workers`` decoding
        processes (default ``min(2, cpu_count)``; 1 decodes in this process). An unreadable image
        raises :class:`DataError` naming the file and row; the images before it stay written, so
        the build resumes after the file is fixed.
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise DataError(f"cache size must be an integer >= 8, got {size!r}")
        workers = min(2, os.cpu_count() or 1) if workers is None else int(workers)
        if workers < 1:
            raise DataError(f"workers must be >= 1, got {workers}")
        ids, paths = _validate_records(records)
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise DataError(f"image cache path {path} exists and is not a directory")

        index = _read_json(path / INDEX)
        if index is not None and cls._covers(index, ids, paths, size):
            done = (_read_json(path / PROGRESS) or {}).get("done", 0)
            if done != len(index["image_ids"]) or not cls._data_ok(path, index):
                cls._fill(
                    path,
                    index["paths"],
                    size,
                    start=done if cls._data_ok(path, index) else None,
                    workers=workers,
                    progress=progress,
                )
            return cls.open(path)

        path.mkdir(parents=True, exist_ok=True)
        (path / PROGRESS).unlink(missing_ok=True)  # before the index: a stale "done" must never match it
        _write_json(
            path / INDEX, {"format": FORMAT, "size": size, "resize": RESIZE, "image_ids": ids, "paths": paths}
        )
        cls._fill(path, paths, size, start=None, workers=workers, progress=progress)
        return cls.open(path)

    @staticmethod
    def _covers(index: dict, ids: list[str], paths: list[str], size: int) -> bool:
        """True when ``index`` has this ``size`` and every (image_id, path) pair of the records."""
        if index.get("format") != FORMAT or index.get("size") != size:
            return False
        cached = dict(zip(index.get("image_ids", []), index.get("paths", []), strict=True))
        return all(cached.get(image_id) == p for image_id, p in zip(ids, paths, strict=True))

    @staticmethod
    def _data_ok(path: Path, index: dict) -> bool:
        expected = len(index["image_ids"]) * index["size"] ** 2
        return (path / IMAGES).is_file() and (path / IMAGES).stat().st_size == expected

    @staticmethod
    def _fill(
        path: Path, paths: list[str], size: int, *, start: int | None, workers: int, progress: bool
    ) -> None:
        """Write rows ``start..n-1`` of ``images.u8`` (``start=None``: a fresh file), checkpointing as it
        goes."""
        n = len(paths)
        if start is None:
            (path / PROGRESS).unlink(missing_ok=True)
        mode = "w+" if start is None else "r+"
        start = start or 0
        images = np.memmap(path / IMAGES, dtype=np.uint8, mode=mode, shape=(n, size, size))
        todo = list(enumerate(paths))[start:]
        every = max(64, min(4096, n // 100))  # checkpoint ~100 times per build, never per image
        done = start
        try:
            # The pool first, then the bar: no progress-bar thread exists when the workers fork. A bar on a
            # terminal, else a line every 10 s (see mococxr.console.progress).
            with _decoder(workers, len(todo)) as imap:
                decoded = enumerate(imap(partial(_load_row, size=size), todo), start=start)
                desc = f"caching images at {size}px"
                bar = progress_bar(decoded, desc, enabled=progress, total=n, initial=start, unit="img")
                for row, array in bar:
                    images[row] = array
                    done = row + 1
                    if done % every == 0:
                        images.flush()
                        _write_json(path / PROGRESS, {"done": done, "n": n})
                bar.close()
        finally:
            # Also on an error or Ctrl-C: rows before `done` are written, so a rerun resumes there.
            images.flush()
            _write_json(path / PROGRESS, {"done": done, "n": n})


@contextmanager
def _decoder(workers: int, n: int) -> Iterator[Callable]:
    """An ``imap(fn, items)`` that keeps order: in this process, or over a pool of ``workers`` processes."""
    if workers <= 1 or n <= 1:
        yield map
        return
    # fork where there is one (as DataLoader does): a spawned child re-imports the caller's __main__,
    # torch included, which cost ~15 s per worker here. The children only run PIL and NumPy.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(min(workers, n), die_with_parent, (os.getpid(),)) as pool:
        yield partial(pool.imap, chunksize=8)
