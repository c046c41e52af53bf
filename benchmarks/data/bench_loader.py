"""How fast can the data pipeline feed a CPU training step? Loader images/s against ResNet18 images/s.

Measures, on this machine:
  * the DataLoader rate (CXR preset at 224 px, batch 16, 0 and 1 workers) reading
    (a) PNG files: the NIH sample (256 px) and the same images upscaled to ~2000 px (original size),
    (b) the pre-resized uint8 ImageCache (256 px memmap);
  * the ImageCache build rate (decode + resize, one process) from both PNG sets;
  * the ResNet18 training consumption rate (torchvision, random init, channels_last, SGD, batch 16)
    at 224 and 128 px;
and prints the ratio loader / consumption (above 1: the loader keeps up).

    .venv/bin/python benchmarks/data/bench_loader.py [--nih DIR] [--n 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

from mococxr.data.cache import ImageCache
from mococxr.data.dataset import CXRDataset
from mococxr.data.transforms import build_transform

REPO = Path(__file__).resolve().parents[2]
DEFAULT_NIH = (
    Path(os.environ.get("MOCOCXR_NIH_SAMPLE", REPO.parent / "shared" / "data" / "nih-cxr14-sample"))
    / "images"
)
BATCH = 16


def nih_records(folder: Path, n: int) -> pd.DataFrame:
    """A minimal records table (image_id, path) over the first ``n`` PNGs of ``folder``."""
    files = sorted(folder.glob("*.png"))[:n]
    if not files:
        sys.exit(f"no PNG images in {folder}; pass the NIH sample's images folder with --nih DIR")
    return pd.DataFrame({"image_id": [f.name for f in files], "path": [str(f.resolve()) for f in files]})


def make_large(records: pd.DataFrame, out: Path, size: int, seed: int = 0) -> pd.DataFrame:
    """Upscale each image to ``size`` px and add mild noise, so the PNG compresses (and decodes) like a real
    radiograph rather than like a smooth upscale. Saved with zlib level 1 to keep this setup short: inflate
    speed barely depends on the level (44 vs 40 ms for level 1 vs 6 at 2000 px here)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for row in records.itertuples():
        path = out / row.image_id
        if not path.exists():
            big = Image.open(row.path).convert("L").resize((size, size), Image.Resampling.BICUBIC)
            noisy = np.asarray(big, dtype=np.int16) + rng.integers(-3, 4, (size, size), dtype=np.int16)
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, compress_level=1)
        paths.append(str(path))
    return records.assign(path=paths)


def loader_rate(dataset: CXRDataset, workers: int, seconds: float) -> tuple[float, float]:
    """(seconds to the first batch, steady images/s after 2 warm-up batches, timed for >= ``seconds``)."""
    sampler = RandomSampler(
        dataset, num_samples=len(dataset) * 50, generator=torch.Generator().manual_seed(0)
    )
    loader = DataLoader(
        dataset,
        batch_size=BATCH,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
    )
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    first = time.perf_counter() - start
    next(batches)
    images, t0 = 0, time.perf_counter()
    for x, _ in batches:
        images += x.shape[0]
        if time.perf_counter() - t0 >= seconds and images >= 3 * BATCH:
            break
    rate = images / (time.perf_counter() - t0)
    del batches, loader
    return first, rate


def cpu_rate(dataset: CXRDataset, n: int) -> float:
    """Images per CPU-second of this thread for ``dataset[i]`` (load + augment, no DataLoader).

    Unlike wall-clock rates this barely moves when other processes share the cores, so it is the
    figure to compare across runs; on an idle core the wall rate of 1 worker approaches it.
    """
    torch.manual_seed(0)
    t0 = time.thread_time()
    for i in range(n):
        dataset[i % len(dataset)]
    return n / (time.thread_time() - t0)


def train_rate(size: int, seconds: float) -> float:
    """ResNet18 SGD training steps on random tensors, images/s after 2 warm-up steps."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(BATCH, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (BATCH,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()
    step()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or steps < 3:
        step()
        steps += 1
    return steps * BATCH / (time.perf_counter() - t0)


def build_rate(records: pd.DataFrame, path: Path) -> tuple[float, float]:
    """ImageCache build at 256 px in this process (decode + grayscale + resize): (img/s, img/CPU-s)."""
    t0, c0 = time.perf_counter(), time.thread_time()
    ImageCache.build(records, path, size=256, workers=1, progress=False)
    return len(records) / (time.perf_counter() - t0), len(records) / (time.thread_time() - c0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nih", type=Path, default=DEFAULT_NIH, help="folder of NIH sample PNGs")
    parser.add_argument("--n", type=int, default=200, help="images per set (default 200)")
    parser.add_argument("--large-size", type=int, default=2000, help="side of the upscaled originals")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per measurement")
    parser.add_argument("--workdir", type=Path, default=None, help="keep generated images/caches here")
    parser.add_argument(
        "--json", type=Path, default=REPO / "benchmarks" / "data" / "results" / "bench_loader.json"
    )
    args = parser.parse_args(argv)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        work = args.workdir or Path(tmp)
        small = nih_records(args.nih, args.n)
        t0 = time.perf_counter()
        large = make_large(small, work / f"large{args.large_size}", args.large_size)
        print(
            f"{len(small)} NIH images; {args.large_size} px copies ready in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )

        builds = {
            "PNG 256 px": build_rate(small, work / "cache_small"),
            f"PNG {args.large_size} px": build_rate(large, work / "cache_large"),
        }
        cache = ImageCache.open(work / "cache_small")
        transform = build_transform("cxr", 224)
        sources = {
            "PNG 256 px (NIH sample)": CXRDataset(small, transform),
            f"PNG {args.large_size} px (upscaled)": CXRDataset(large, transform),
            "ImageCache 256 px memmap": CXRDataset(small, transform, cache=cache),
        }
        loaders = []
        threads_default = torch.get_num_threads()
        for name, dataset in sources.items():
            per_cpu_s = cpu_rate(dataset, min(len(dataset), 100))
            # "0 (1 thr)": the main process with 1 torch thread, to show what OpenMP costs in the collate.
            for workers, label, threads in (
                (0, "0", threads_default),
                (0, "0 (1 thr)", 1),
                (1, "1", threads_default),
            ):
                torch.set_num_threads(threads)
                first, rate = loader_rate(dataset, workers, args.seconds)
                torch.set_num_threads(threads_default)
                loaders.append(
                    {
                        "source": name,
                        "workers": label,
                        "first_batch_s": first,
                        "img_s": rate,
                        "img_cpu_s": per_cpu_s,
                    }
                )
                print(f"  loader {name}, {label} workers: {rate:.0f} img/s", flush=True)
        train = {size: train_rate(size, args.seconds) for size in (224, 128)}

    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), batch {BATCH}, {args.n} images, "
        "CXR preset at 224 px"
    )
    print(
        "load average (1, 5, 15 min) before: {:.1f} {:.1f} {:.1f}, after: {:.1f} {:.1f} {:.1f}".format(
            *load_before, *os.getloadavg()
        )
    )
    print("\nImageCache build (decode + resize to 256 px, 1 process):")
    for name, (rate, per_cpu_s) in builds.items():
        print(f"  from {name:<14} {rate:8.1f} img/s {per_cpu_s:8.1f} img/CPU-s")
    print("\nResNet18 training (channels_last, SGD, batch 16):")
    for size, rate in train.items():
        print(f"  {size} px {rate:8.1f} img/s")
    print(
        f"\n{'loader source':<30} {'workers':>9} {'1st batch s':>11} {'img/s':>8} {'/train224':>9} "
        f"{'/train128':>9} {'img/CPU-s':>9}"
    )
    for row in loaders:
        print(
            f"{row['source']:<30} {row['workers']:>9} {row['first_batch_s']:>11.2f} {row['img_s']:>8.1f} "
            f"{row['img_s'] / train[224]:>9.1f} {row['img_s'] / train[128]:>9.1f} {row['img_cpu_s']:>9.1f}"
        )

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "n": args.n,
                "load_before": load_before,
                "load_after": os.getloadavg(),
                "builds": builds,
                "train": train,
                "loaders": loaders,
            },
            indent=1,
        )
    )
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
