"""Frozen features, computed once per encoder and image set and reused by every epoch, draw and run.

A linear run's encoder is frozen and in eval mode, and its validation and test images go through the
deterministic eval transform: every epoch of every run of that encoder would recompute exactly the
same features. :class:`FeatureCache` computes them once and keeps them on local disk, beside the image
cache, as a float32 memory-mapped matrix (``[n, feature_dim]``, rows in records order), so a run
reads only the pages it touches and a CheXpert-sized val set costs ~40 MB, not a pass through the
encoder per epoch.

The key is the content of what is computed, never a name for it: a sha256 over the encoder's weights
and buffers (the same checkpoint reached as a LoggedModel, a registry version or a file is one key;
a different one never shares it), the ordered image ids and paths, the image size, the transform
and the format. An entry is written to a temporary folder and renamed into place, so a killed
writer leaves no half entry; a damaged entry (wrong size, unreadable metadata) is recomputed.

The cache is disposable and bounded: MLflow stays the system of record (every run still logs its
metrics and predictions); deleting the folder only costs a recomputation. After each write the
least recently used entries are removed until the folder is under its bound (``MOCOCXR_FEATURE_CACHE_GB``,
default 8 GB). The folder is ``MOCOCXR_FEATURE_CACHE`` when set, else ``features/`` beside the data
config's image cache, else ``~/.cache/mococxr/features``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mococxr.console import working
from mococxr.data.cache import ImageCache
from mococxr.errors import DataError
from mococxr.train.linear_eval import extract_features

FORMAT = 1
META = "meta.json"
MATRIX = "features.f32"
DEFAULT_GB = 8.0


def cache_root(image_cache: str | None) -> Path:
    """Where feature entries live: ``MOCOCXR_FEATURE_CACHE``, else beside the image cache, else ~/.cache."""
    if env := os.environ.get("MOCOCXR_FEATURE_CACHE"):
        return Path(env)
    if image_cache:
        return Path(image_cache) / "features"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mococxr" / "features"


def bound_bytes() -> int:
    """The folder's size bound in bytes (``MOCOCXR_FEATURE_CACHE_GB``, default 8)."""
    text = os.environ.get("MOCOCXR_FEATURE_CACHE_GB", str(DEFAULT_GB))
    try:
        gb = float(text)
    except ValueError:
        raise DataError(f"MOCOCXR_FEATURE_CACHE_GB={text!r}: expected a number of gigabytes") from None
    return int(gb * 1e9)


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes): the encoder's identity."""
    h = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def images_fingerprint(records: pd.DataFrame) -> str:
    """sha256 of the ordered image ids and paths: the rows a feature matrix holds."""
    h = hashlib.sha256()
    for image_id, path in zip(records["image_id"].astype(str), records["path"].astype(str), strict=True):
        h.update(f"{image_id}\t{path}\n".encode())
    return h.hexdigest()


@dataclass
class FeatureCache:
    """Features of one frozen ``encoder`` at ``image_size`` under the eval transform, by image set."""

    encoder: torch.nn.Module
    image_size: int
    root: Path
    images: ImageCache | None = None
    workers: int = 0
    device: torch.device | str | None = None
    fingerprint: str = ""
    stats: dict[str, float] = field(default_factory=lambda: {"hits": 0, "misses": 0, "seconds": 0.0})
    _keys: dict[int, tuple[pd.DataFrame, str]] = field(default_factory=dict, repr=False)
    _sizes: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.fingerprint = self.fingerprint or encoder_fingerprint(self.encoder)

    def key(self, records: pd.DataFrame) -> str:
        """The entry name of ``records``' features (memoized per records object: a run asks every epoch)."""
        if (known := self._keys.get(id(records))) is not None and known[0] is records:
            return known[1]
        parts = {
            "format": FORMAT,
            "encoder": self.fingerprint,
            "images": images_fingerprint(records),
            "image_size": self.image_size,
            "transform": "eval",
            "dtype": "float32",
        }
        key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
        self._keys[id(records)] = (records, key)
        return key

    def features(self, records: pd.DataFrame) -> np.ndarray:
        """The ``[len(records), feature_dim]`` float32 features, from disk or computed once and stored."""
        key = self.key(records)
        entry = self.root / key
        found = _open(entry, len(records))
        if found is not None:
            self.stats["hits"] += 1
            self._sizes[key] = found.nbytes
            os.utime(entry)  # least-recently-used order for the bound
            return found
        t0 = time.perf_counter()
        with working(f"features of {len(records)} images at {self.image_size}px"):  # a line per 10 s if long
            feats = extract_features(
                self.encoder,
                records,
                image_size=self.image_size,
                cache=self.images,
                workers=self.workers,
                device=self.device,
                mixed_precision=False,
            )
        self.stats["misses"] += 1
        self.stats["seconds"] += time.perf_counter() - t0
        self._sizes[key] = feats.nbytes
        stored = _store(entry, feats.astype(np.float32, copy=False), {"n": len(records), "key": key})
        if stored is not None:
            evict(self.root, keep=entry)
            return stored
        return feats

    def params(self) -> dict[str, str]:
        """What a run logs: where the features came from and how much they hold."""
        return {
            "feature_cache_dir": str(self.root),
            "feature_cache_hits": str(int(self.stats["hits"])),
            "feature_cache_misses": str(int(self.stats["misses"])),
            "feature_cache_mb": f"{sum(self._sizes.values()) / 1e6:.1f}",
            "feature_cache_seconds": f"{self.stats['seconds']:.1f}",
            "feature_cache_bound_gb": f"{bound_bytes() / 1e9:g}",
        }


def _open(entry: Path, n: int) -> np.ndarray | None:
    """The stored matrix of ``entry`` (read-only memmap) when it is whole, else None."""
    try:
        meta = json.loads((entry / META).read_text())
        if meta.get("format") != FORMAT or meta.get("n") != n:
            return None
        matrix = np.memmap(entry / MATRIX, dtype=np.float32, mode="r", shape=(n, int(meta["dim"])))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return matrix


def _store(entry: Path, feats: np.ndarray, meta: dict) -> np.ndarray | None:
    """Write ``feats`` as ``entry`` (temporary folder, then rename); None when the disk will not take it."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".writing-", dir=entry.parent))
        try:
            feats.tofile(tmp / MATRIX)
            (tmp / META).write_text(
                json.dumps({**meta, "format": FORMAT, "dim": int(feats.shape[1]), "dtype": "float32"})
            )
            if entry.exists():
                shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        return None  # a full or read-only cache folder only costs recomputation: the run goes on
    return _open(entry, len(feats))


def evict(root: Path, *, keep: Path | None = None, limit: int | None = None) -> list[Path]:
    """Delete the least recently used entries until ``root`` holds at most ``limit`` bytes (never
    ``keep``)."""
    limit = bound_bytes() if limit is None else limit
    entries = []
    for entry in Path(root).iterdir() if Path(root).is_dir() else []:
        if entry.is_dir() and not entry.name.startswith(".writing-"):
            size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
            entries.append((entry.stat().st_mtime, size, entry))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, entry in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if keep is not None and entry == keep:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= size
        removed.append(entry)
    return removed
