"""A linear fine-tune grid with and without the frozen-feature cache: wall time, and the same results.

On a CheXpert-like phantom (val and test ~10 % of the training images each, as CheXpert's 18.7k val
patients against 190k training images), from one fixed encoder, runs the grid fractions x draws x
learning rates of ``finetune(protocol="linear")`` twice in one process: ``feature_cache: false`` (every
epoch recomputes the val features through the encoder, as before the cache) and ``feature_cache: true``.
It prints each arm's wall time, the ratio, and per cell the chosen epoch and test AUC of both (they
must be equal: the same epoch, test AUC within ``--tol``).

    python benchmarks/linear_grid/run.py --root /tmp/linear-grid/ph --preset none
    python benchmarks/linear_grid/run.py --root /tmp/linear-grid/ph --preset cxr

``--rss`` instead runs one linear cell with cached features at ``--fraction-rss`` and prints the peak RSS
(``ru_maxrss``) of this process: point ``--root`` at a CheXpert-sized phantom for the issue's figure.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from mococxr.config import DataConfig, FinetuneConfig
from mococxr.data.phantom import synthesize
from mococxr.data.prepare import prepare
from mococxr.models.backbones import build_encoder
from mococxr.tracking import mlflow as mt
from mococxr.train.finetune import finetune


def grid(
    args: argparse.Namespace, data_cfg: DataConfig, encoder: str, cached: bool
) -> tuple[float, list[dict]]:
    """(wall seconds, per-cell results) of the whole grid with or without the cache."""
    data = prepare(data_cfg)
    rows, t0 = [], time.perf_counter()
    for fraction in args.fractions:
        for draw in range(args.draws):
            for lr in args.lrs:
                cfg = FinetuneConfig(
                    data=data_cfg,
                    init=encoder,
                    protocol="linear",
                    head="plain",
                    fraction=fraction,
                    draw=draw,
                    lr=lr,
                    image_size=args.image_size,
                    batch_size=16,
                    epochs_scale=args.epochs_scale,
                    preset=args.preset,
                    feature_cache=cached,
                    experiment=f"bench-linear-grid-{'cached' if cached else 'recomputed'}",
                )
                res = finetune(cfg, data=data, progress=False)
                rows.append(
                    {
                        "cell": f"{fraction:g} d{draw} lr {lr:g}",
                        "best_epoch": res.best_epoch,
                        "test_auc": res.test.get("test/auc", float("nan")),
                    }
                )
    return time.perf_counter() - t0, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--root", default="/tmp/linear-grid/ph", help="CheXpert-layout phantom (written if absent)"
    )
    p.add_argument("--n", type=int, default=26500, help="phantom rows when --root is absent (~22k frontal)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-4])
    p.add_argument(
        "--epochs-scale",
        type=float,
        default=0.25,
        help="times the paper's epochs (95 at 1 %%, 41 at "
        "10 %%): the saving grows with epochs, so a scale below 1 understates it",
    )
    p.add_argument("--preset", default="none", choices=("none", "cxr"))
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument(
        "--cache",
        default=None,
        help="pre-resized image cache folder (default: ROOT-cache); the paper "
        "plan caches CheXpert's images too, so validation is not bound by PNG decoding",
    )
    p.add_argument("--rss", action="store_true", help="one cached cell at --fraction-rss; print peak RSS")
    p.add_argument("--fraction-rss", type=float, default=1.0)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    root = Path(args.root)
    if not root.exists():
        synthesize(root, args.n, size=args.image_size, seed=0)
    data_cfg = DataConfig(
        dataset="chexpert",
        root=str(root),
        task="pleural_effusion",
        val=0.0833,
        test=0.0833,
        cache=args.cache or f"{root}-cache",
    )
    tmp = Path(tempfile.mkdtemp(prefix="linear-grid-"))
    os.environ.setdefault("MOCOCXR_FEATURE_CACHE", str(tmp / "features"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    mt.open_store()
    torch.manual_seed(0)
    encoder = str(tmp / "encoder.pt")
    torch.save(build_encoder("resnet18").state_dict(), encoder)
    splits = prepare(data_cfg).splits
    print(
        f"phantom {root}: train {len(splits['train'])}, val {len(splits['val'])}, test {len(splits['test'])} "
        f"images at {args.image_size} px; preset {args.preset}; torch threads {torch.get_num_threads()}"
    )
    if args.rss:
        cfg = FinetuneConfig(
            data=data_cfg,
            init=encoder,
            protocol="linear",
            head="plain",
            fraction=args.fraction_rss,
            image_size=args.image_size,
            epochs=1,
            preset=args.preset,
            experiment="bench-linear-rss",
        )
        t0 = time.perf_counter()
        finetune(cfg, progress=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(
            f"one cached linear cell at {args.fraction_rss:g} ({args.preset}): "
            f"{time.perf_counter() - t0:.0f} s, peak RSS {peak:.2f} GiB"
        )
        return
    before, rows_before = grid(args, data_cfg, encoder, cached=False)
    after, rows_after = grid(args, data_cfg, encoder, cached=True)
    worst = 0.0
    print(f"{'cell':<18}{'epoch before':>14}{'epoch after':>13}{'test AUC before':>17}{'test AUC after':>16}")
    for a, b in zip(rows_before, rows_after, strict=True):
        worst = max(worst, abs(a["test_auc"] - b["test_auc"]))
        print(
            f"{a['cell']:<18}{a['best_epoch']:>14}{b['best_epoch']:>13}{a['test_auc']:>17.7f}{b['test_auc']:>16.7f}"
        )
    same_epochs = all(
        a["best_epoch"] == b["best_epoch"] for a, b in zip(rows_before, rows_after, strict=True)
    )
    print(
        f"{len(rows_before)} cells: recomputed {before:.1f} s, cached {after:.1f} s, "
        f"{before / after:.1f}x faster; chosen epochs {'identical' if same_epochs else 'DIFFER'}; "
        f"largest test AUC difference {worst:.2e} "
        f"({'within' if worst <= args.tol else 'OVER'} {args.tol:g})"
    )


if __name__ == "__main__":
    main()
