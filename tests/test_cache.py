"""ImageCache (build, reuse, rebuild, resume, errors) and CXRDataset (targets, masks, loading)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import mococxr.data.cache as cache_module
from mococxr.data.cache import ImageCache, load_gray
from mococxr.data.dataset import CXRDataset, _loader_kwargs
from mococxr.data.transforms import TwoCrops, build_transform
from mococxr.errors import DataError

SIZES = [(40, 60), (64, 64), (90, 50), (33, 47), (70, 80), (48, 36)]


def _write_images(root: Path, n: int = 6, seed: int = 0) -> pd.DataFrame:
    """Small PNGs of varied shapes and modes, and the minimal records table over them."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        width, height = SIZES[i % len(SIZES)]
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        if i % 3 == 1:
            image = Image.merge(
                "RGB", [image, image.rotate(90), image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
            )
        path = root / f"img{i:03d}.png"
        image.save(path)
        rows.append({"image_id": path.name, "path": str(path)})
    return pd.DataFrame(rows)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _direct(path: str, size: int) -> np.ndarray:
    return np.asarray(
        Image.open(path).convert("L").resize((size, size), Image.Resampling.BILINEAR), dtype=int
    )


# -- ImageCache ----------------------------------------------------------------------------------------
def test_cache_round_trip_matches_a_direct_resize(tmp_path):
    records = _write_images(tmp_path / "img")
    cache = ImageCache.build(records, tmp_path / "cache", size=32, workers=1, progress=False)
    assert len(cache) == len(records) and cache.size == 32
    assert "img000.png" in cache and "nope.png" not in cache
    for row in records.itertuples():
        image = cache.get(row.image_id)
        assert image.mode == "L" and image.size == (32, 32)
        assert np.abs(np.asarray(image, dtype=int) - _direct(row.path, 32)).max() <= 1
    reopened = ImageCache.open(tmp_path / "cache")
    assert np.array_equal(np.asarray(reopened.get("img004.png")), np.asarray(cache.get("img004.png")))
    with pytest.raises(DataError, match="not in the image cache"):
        cache.get("nope.png")


def test_two_worker_build_equals_in_process_build(tmp_path):
    records = _write_images(tmp_path / "img")
    one = ImageCache.build(records, tmp_path / "one", size=24, workers=1, progress=False)
    two = ImageCache.build(records, tmp_path / "two", size=24, workers=2, progress=False)
    for image_id in records["image_id"]:
        assert np.array_equal(one.get_array(image_id), two.get_array(image_id))


def test_rerun_reuses_and_changes_rebuild(tmp_path):
    records = _write_images(tmp_path / "img")
    data = tmp_path / "cache" / "images.u8"
    ImageCache.build(records, tmp_path / "cache", size=32, workers=1, progress=False)
    stamp = data.stat().st_mtime_ns

    again = ImageCache.build(records, tmp_path / "cache", size=32, workers=1, progress=False)
    subset = ImageCache.build(records.iloc[:3], tmp_path / "cache", size=32, workers=1, progress=False)
    assert data.stat().st_mtime_ns == stamp and len(again) == len(subset) == len(records)

    resized = ImageCache.build(records, tmp_path / "cache", size=24, workers=1, progress=False)
    assert resized.size == 24 and data.stat().st_size == len(records) * 24 * 24

    extra = _write_images(tmp_path / "more", n=1, seed=5).assign(image_id="extra.png")
    grown = ImageCache.build(
        pd.concat([records, extra]), tmp_path / "cache", size=24, workers=1, progress=False
    )
    assert len(grown) == len(records) + 1 and "extra.png" in grown

    moved = records.assign(path=records["path"].str.replace("img003", "img000", regex=False))
    rebuilt = ImageCache.build(moved, tmp_path / "cache", size=24, workers=1, progress=False)
    assert len(rebuilt) == len(records)
    assert np.array_equal(rebuilt.get_array("img003.png"), rebuilt.get_array("img000.png"))


def test_truncated_image_is_a_data_error_and_the_build_resumes(tmp_path, monkeypatch):
    records = _write_images(tmp_path / "img")
    bad = Path(records.loc[4, "path"])
    good = bad.read_bytes()
    _truncate(bad)
    with pytest.raises(DataError, match=r"img004\.png.*records row 4"):
        ImageCache.build(records, tmp_path / "cache", size=32, workers=1, progress=False)
    assert json.loads((tmp_path / "cache" / "progress.json").read_text())["done"] == 4
    with pytest.raises(DataError, match="incomplete"):
        ImageCache.open(tmp_path / "cache")

    bad.write_bytes(good)
    loaded = []
    real = cache_module._load_row
    monkeypatch.setattr(
        cache_module, "_load_row", lambda item, size: loaded.append(item[0]) or real(item, size)
    )
    cache = ImageCache.build(records, tmp_path / "cache", size=32, workers=1, progress=False)
    assert loaded == [4, 5]  # rows 0-3 were kept from the interrupted build
    assert np.abs(np.asarray(cache.get("img004.png"), dtype=int) - _direct(str(bad), 32)).max() <= 1


def test_truncated_image_fails_in_a_worker_process_too(tmp_path):
    records = _write_images(tmp_path / "img")
    _truncate(Path(records.loc[2, "path"]))
    with pytest.raises(DataError, match=r"img002\.png"):
        ImageCache.build(records, tmp_path / "cache", size=32, workers=2, progress=False)


def test_open_and_build_validate_their_inputs(tmp_path):
    with pytest.raises(DataError, match="no image cache"):
        ImageCache.open(tmp_path / "missing")
    records = _write_images(tmp_path / "img", n=2)
    with pytest.raises(DataError, match="not unique"):
        ImageCache.build(pd.concat([records, records]), tmp_path / "cache", workers=1, progress=False)
    with pytest.raises(DataError, match="'path'"):
        ImageCache.build(records[["image_id"]], tmp_path / "cache", workers=1, progress=False)
    with pytest.raises(DataError, match="not found"):
        ImageCache.build(
            records.assign(path=str(tmp_path / "gone.png")).iloc[:1],
            tmp_path / "c2",
            workers=1,
            progress=False,
        )


def test_cache_pickles_without_its_pixels(tmp_path):
    records = _write_images(tmp_path / "img")
    cache = ImageCache.build(records, tmp_path / "cache", size=64, workers=1, progress=False)
    cache.get("img000.png")  # opens the memmap
    blob = pickle.dumps(cache)
    assert len(blob) < 64 * 64  # not the array
    assert np.array_equal(pickle.loads(blob).get_array("img005.png"), cache.get_array("img005.png"))


def test_sixteen_bit_images_are_stretched_not_clipped(tmp_path):
    values = np.linspace(0, 4095, 32 * 32).reshape(32, 32).astype(np.uint16)  # 12-bit data in 16 bits
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    gray = np.asarray(load_gray(path))
    assert gray.min() == 0 and gray.max() == 255
    assert (gray == 255).mean() < 0.01  # a plain convert("L") would saturate almost everything


# -- CXRDataset ----------------------------------------------------------------------------------------
def _with_labels(records: pd.DataFrame) -> pd.DataFrame:
    labels = [1.0, 0.0, np.nan, -1.0, 1.0, np.nan]
    return records.assign(
        Effusion=labels[: len(records)], Pneumonia=[0.0, np.nan, 1.0, 0.0, np.nan, 1.0][: len(records)]
    )


def test_dataset_targets_keep_nan_masks_and_values_as_given(tmp_path):
    records = _with_labels(_write_images(tmp_path / "img"))
    dataset = CXRDataset(records, build_transform("eval", 32), tasks=["Effusion", "Pneumonia"])
    assert len(dataset) == 6
    image, target = dataset[2]
    assert image.shape == (3, 32, 32) and target.dtype == torch.float32 and target.shape == (2,)
    assert torch.isnan(target[0]) and target[1] == 1.0
    assert dataset[3][1][0] == -1.0  # no policy applied here
    expected = torch.tensor(records[["Effusion", "Pneumonia"]].to_numpy(np.float32))
    stacked = torch.stack([dataset[i][1] for i in range(len(dataset))])
    assert torch.equal(torch.isnan(stacked), torch.isnan(expected))
    assert torch.equal(torch.nan_to_num(stacked, 9.0), torch.nan_to_num(expected, 9.0))


def test_dataset_without_tasks_returns_empty_targets_and_two_crops(tmp_path):
    records = _write_images(tmp_path / "img", n=4)
    dataset = CXRDataset(records, TwoCrops(build_transform("cxr", 32)))
    views, target = dataset[1]
    assert len(views) == 2 and views[0].shape == (3, 32, 32)
    assert target.shape == (0,)
    batch_views, batch_targets = next(iter(DataLoader(dataset, batch_size=4, **_loader_kwargs(0))))
    assert batch_views[0].shape == (4, 3, 32, 32) and batch_targets.shape == (4, 0)


def test_dataset_reads_from_the_cache_when_given(tmp_path):
    records = _with_labels(_write_images(tmp_path / "img"))
    cache = ImageCache.build(records, tmp_path / "cache", size=32, workers=1, progress=False)
    for path in records["path"]:
        Path(path).unlink()  # only the cache is left
    dataset = CXRDataset(records, build_transform("eval", 32, normalize="none"), ["Effusion"], cache=cache)
    image, _ = dataset[0]
    assert torch.allclose(
        image[0] * 255, torch.tensor(cache.get_array("img000.png"), dtype=torch.float32), atol=1e-3
    )
    with pytest.raises(DataError, match="not in the image cache"):
        CXRDataset(records.assign(image_id="other"), None, cache=cache)


def test_dataset_unreadable_image_names_path_and_row(tmp_path):
    records = _write_images(tmp_path / "img", n=3)
    _truncate(Path(records.loc[1, "path"]))
    dataset = CXRDataset(records, build_transform("eval", 32))
    dataset[0]
    with pytest.raises(DataError, match=r"img001\.png.*records row 1"):
        dataset[1]


def test_dataset_rejects_missing_task_columns(tmp_path):
    records = _write_images(tmp_path / "img", n=2)
    with pytest.raises(DataError, match="Cardiomegaly"):
        CXRDataset(records, None, tasks=["Cardiomegaly"])


@pytest.mark.realdata
def test_cache_of_real_nih_images(tmp_path, nih_sample):
    files = sorted((nih_sample / "images").glob("*.png"))[:8]
    records = pd.DataFrame({"image_id": [f.name for f in files], "path": [str(f) for f in files]})
    cache = ImageCache.build(records, tmp_path / "cache", size=128, workers=1, progress=False)
    for row in records.itertuples():
        assert np.abs(np.asarray(cache.get(row.image_id), dtype=int) - _direct(row.path, 128)).max() <= 1
