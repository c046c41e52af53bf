"""Fast linear evaluation against the slow linear protocol, on one train/val split.

Fast: ``linear_eval`` (one no-grad pass over train and val with the eval transform, then a logistic
regression per task with C chosen on val). Slow: ``finetune(protocol="linear")``, a linear head trained
with Adam through the frozen backbone on augmented images for ``--epochs`` epochs, best epoch chosen by
val AUC. Both start from the same encoder weights and see the same train and val images. Prints both
times, both validation AUCs and the speed ratio.

    python benchmarks/linear_eval/bench_linear_eval.py --root /tmp/phantom800 --n 800 --image-size 64
"""

from __future__ import annotations

import argparse
import os
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
from mococxr.train.inits import resolve_init
from mococxr.train.linear_eval import linear_eval


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="chexpert")
    p.add_argument(
        "--root", required=True, help="dataset root; a chexpert phantom is written there if absent"
    )
    p.add_argument("--n", type=int, default=800, help="phantom rows when --root does not exist")
    p.add_argument("--task", default="pleural_effusion")
    p.add_argument("--init", default="random", help="random | imagenet | state dict file | models:/ URI")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--val", type=float, default=0.3)
    p.add_argument("--test", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=40, help="epochs of the slow protocol")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate of the slow protocol's head")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3, help="timings of the fast evaluation (median reported)")
    args = p.parse_args()

    if args.dataset == "chexpert" and not Path(args.root).exists():
        synthesize(args.root, args.n, size=max(args.image_size, 64))
    tmp = tempfile.mkdtemp(prefix="bench-linear-eval-")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    store = mt.open_store()
    data = DataConfig(dataset=args.dataset, root=args.root, task=args.task, val=args.val, test=args.test)
    prepared = prepare(data)
    splits, tasks = prepared.splits, list(prepared.tasks)
    torch.manual_seed(0)
    kind, state, _ = resolve_init(args.init, "resnet18")
    encoder = build_encoder("resnet18", init=kind, state_dict=state)
    weights = Path(tmp) / "encoder.pt"  # both protocols start from exactly these weights
    torch.save(encoder.state_dict(), weights)
    print(
        f"{args.dataset} {args.root}: {len(splits['train'])} train / {len(splits['val'])} val images, "
        f"task {','.join(tasks)}, init {args.init}, {args.image_size} px, "
        f"torch threads {torch.get_num_threads()}"
    )

    # the machine may be shared: time the fast evaluation a few times and keep the median
    runs = [
        linear_eval(encoder, splits["train"], splits["val"], tasks, image_size=args.image_size)
        for _ in range(args.repeat)
    ]
    fast = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
    print(
        f"fast linear_eval:     val AUC {fast.auc:.4f}  {fast.seconds:8.1f} s  (median of {args.repeat}: "
        f"{', '.join(f'{r.seconds:.1f}' for r in runs)} s; C={fast.C})",
        flush=True,
    )

    cfg = FinetuneConfig(
        data=data,
        init=str(weights),
        protocol="linear",
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        image_size=args.image_size,
        experiment="bench-linear-eval",
    )
    t0 = time.perf_counter()
    slow = finetune(cfg, data=prepared, store=store, progress=False)
    slow_s = time.perf_counter() - t0
    print(
        f"slow linear protocol: val AUC {slow.val_auc:.4f}  {slow_s:8.1f} s  "
        f"({args.epochs} epochs, {slow_s / args.epochs:.1f} s/epoch, best epoch {slow.best_epoch}, "
        f"lr {args.lr:g})"
    )
    print(
        f"speed-up {slow_s / fast.seconds:.1f}x; AUC difference (fast - slow) {fast.auc - slow.val_auc:+.4f}"
    )


if __name__ == "__main__":
    main()
