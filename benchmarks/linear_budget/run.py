"""Does a linear fine-tune run converge at Shenzhen's smallest label fraction? Gap to the probe, per rule.

On a Shenzhen-sized phantom (662 images, one per patient, split 70/10/20 % as
``sweeps/finetune_grid_shenzhen.yaml``), at label fraction 6.25 % draw 0 and from one fixed encoder,
runs ``finetune(protocol="linear")`` under each budget rule below and prints, per rule, the run's best
validation AUC, the fast logistic probe's validation AUC on the same draw (``val/probe_auc``), their gap
(``val/probe_gap`` = probe - run), the test AUC, the optimizer steps, the wall time, and the optimizer
steps after which the best validation AUC so far first came within 0.03 of the probe ("steps@0.03",
from the run's ``val/auc`` history; what ``--min-steps`` is chosen from).

    python benchmarks/linear_budget/run.py --root /tmp/linear-budget/sz662 --image-size 64

Rules (``--rules``, default ``today,plain,new``): ``today`` (head standardized, the label-fraction
epochs, lr 3e-5), ``plain`` (the paper's plain head, same budget), ``new`` (plain head, ``--min-steps``
and ``--lr``), ``new-std`` (standardized head, ``--min-steps`` and ``--lr``) and ``plain-long`` (plain
head, ``--min-steps`` at the paper's lr 3e-5: is it the steps or the lr?).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from mococxr.config import DataConfig, FinetuneConfig, PretrainConfig
from mococxr.data.phantom import synthesize
from mococxr.data.prepare import prepare
from mococxr.models.backbones import build_encoder
from mococxr.tracking import mlflow as mt
from mococxr.train.finetune import finetune


def fixed_encoder(args: argparse.Namespace, data: DataConfig, out: Path) -> str:
    """The encoder every rule starts from, saved as a state dict file; returns its path."""
    path = out / f"encoder-{args.encoder}.pt"
    if args.encoder == "random":
        torch.manual_seed(0)
        torch.save(build_encoder("resnet18").state_dict(), path)
        return str(path)
    from mococxr.train.pretrain import pretrain  # a short MoCo pretraining on the phantom's images

    res = pretrain(
        PretrainConfig(
            data=data,
            init="random",
            image_size=args.image_size,
            batch_size=32,
            epochs=args.pretrain_epochs,
            moco_k=4096,
            lr=1e-3,
            workers=0,
            experiment="bench-linear-budget-pretrain",
        ),
        progress=False,
    )
    return f"models:/{res.model_ids[args.pretrain_epochs]}"


RULES = ("today", "plain", "new", "new-std", "plain-long")


def rules(args: argparse.Namespace) -> dict[str, dict]:
    return {
        "today": {"head": "standardized", "min_steps": 0, "lr": 3e-5},
        "plain": {"head": "plain", "min_steps": 0, "lr": 3e-5},
        "new": {"head": "plain", "min_steps": args.min_steps, "lr": args.lr},
        "new-std": {"head": "standardized", "min_steps": args.min_steps, "lr": args.lr},
        "plain-long": {"head": "plain", "min_steps": args.min_steps, "lr": 3e-5},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--root", default="/tmp/linear-budget/sz662", help="Shenzhen phantom root (written if absent)"
    )
    p.add_argument("--n", type=int, default=662, help="phantom images when --root does not exist")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--fraction", type=float, default=0.0625)
    p.add_argument("--draw", type=int, default=0)
    p.add_argument(
        "--encoder",
        choices=("random", "moco"),
        default="random",
        help="random: a seeded random resnet18; moco: a short MoCo pretraining on the phantom",
    )
    p.add_argument("--pretrain-epochs", type=int, default=5)
    p.add_argument("--min-steps", type=int, default=200, help="min_steps of the new rule")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam lr of the new rule")
    p.add_argument("--rules", default="today,plain,new", help="comma-separated, of: " + ", ".join(RULES))
    args = p.parse_args()

    if not Path(args.root).exists():
        synthesize(args.root, args.n, size=max(args.image_size, 64), seed=0, layout="shenzhen")
    out = Path(tempfile.mkdtemp(prefix="bench-linear-budget-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out}/mlflow.db")
    store = mt.open_store()
    data = DataConfig(dataset="shenzhen", root=args.root, task="tb", val=0.1, test=0.2, split_seed=0)
    prepared = prepare(data)
    init = fixed_encoder(args, data, out)
    print(
        f"shenzhen phantom {args.root}: {', '.join(f'{k} {len(v)}' for k, v in prepared.splits.items())} "
        f"images; fraction {args.fraction:g} draw {args.draw}; encoder {args.encoder}; {args.image_size} px; "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    print(
        f"{'rule':10} {'head':12} {'lr':>7} {'min_steps':>9} {'steps':>6} {'epochs':>6} {'val AUC':>8} "
        f"{'probe AUC':>9} {'gap':>7} {'test AUC':>8} {'probe s':>7} {'seconds':>8} {'steps@0.03':>10}"
    )
    client = MlflowClient()
    for name in args.rules.split(","):
        rule = rules(args)[name]
        cfg = FinetuneConfig(
            data=data,
            init=init,
            protocol="linear",
            fraction=args.fraction,
            draw=args.draw,
            image_size=args.image_size,
            batch_size=16,
            experiment="bench-linear-budget",
            run_name=f"{name}-f{args.fraction:g}-d{args.draw}",
            **rule,
        )
        t0 = time.perf_counter()
        res = finetune(cfg, data=prepared, store=store, progress=False)
        seconds = time.perf_counter() - t0
        run = client.get_run(res.run_id)
        m, params = run.data.metrics, run.data.params
        print(
            f"{name:10} {rule['head']:12} {rule['lr']:7.0e} {rule['min_steps']:9d} "
            f"{params['optimizer_steps']:>6} {params['epochs_resolved']:>6} {res.val_auc:8.4f} "
            f"{m['val/probe_auc']:9.4f} "
            f"{m['val/probe_gap']:+7.4f} {res.test['test/auc']:8.4f} {m['val/probe_seconds']:7.2f} "
            f"{seconds:8.1f} {steps_within(client, res.run_id, m['val/probe_auc'], params):>10}",
            flush=True,
        )


def steps_within(client: MlflowClient, run_id: str, probe_auc: float, params: dict, tol: float = 0.03) -> str:
    """Optimizer steps after which the run's best val AUC so far was first within ``tol`` of the probe."""
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val/auc"))
    best = -1.0
    for epoch, auc in history:
        best = max(best, auc)
        if best >= probe_auc - tol:
            return str(epoch * int(params["steps_per_epoch"]))
    return "never"


if __name__ == "__main__":
    main()
