"""The ``mococxr`` command: parses arguments and calls the modules below; no logic of its own.

User errors (``MococxrError``) print one line without a traceback and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mococxr.errors import MococxrError

DATASETS = ("chexpert", "nih", "shenzhen", "montgomery", "tb", "csv")


# -- data ---------------------------------------------------------------------------------------------
def cmd_data_synth(args: argparse.Namespace) -> int:
    import time

    from mococxr.data.phantom import synthesize

    t0 = time.perf_counter()
    root = synthesize(args.out, args.n, size=args.size, seed=args.seed, layout=args.layout, n_valid=args.n_valid)
    print(f"wrote {args.n} phantom images ({args.layout} layout, {args.size} px) under {root} "
          f"in {time.perf_counter() - t0:.1f} s")
    dataset = "chexpert" if args.layout == "chexpert" else "shenzhen"
    print(f"check it: mococxr data check --dataset {dataset} --root {root}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from mococxr.data.records import check_dataset

    problems = check_dataset(args.dataset, args.root, args.csv)
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"no problems found in {args.dataset} data under {args.root}")
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from mococxr.data.labels import resolve_tasks
    from mococxr.data.records import read_records, summarize

    records = read_records(args.dataset, args.root, args.csv)
    tasks = resolve_tasks(args.task, records) if args.task else None
    print(summarize(records, tasks))
    return 0


# -- config flags -------------------------------------------------------------------------------------
# flag dest -> config key; flags left unset keep the YAML's or the dataclass's value.
DATA_FLAGS = {
    "dataset": "data.dataset", "root": "data.root", "csv": "data.csv", "test_csv": "data.test_csv",
    "task": "data.task", "policy": "data.policy", "cache": "data.cache", "split_seed": "data.split_seed",
    "val": "data.val", "test": "data.test",
}
COMMON_FLAGS = {
    "backbone": "backbone", "init": "init", "image_size": "image_size", "batch_size": "batch_size",
    "epochs": "epochs", "lr": "lr", "weight_decay": "weight_decay", "preset": "preset",
    "workers": "workers", "seed": "seed", "experiment": "experiment", "run_name": "run_name",
}
PRETRAIN_FLAGS = {
    **DATA_FLAGS, **COMMON_FLAGS, "optimizer": "optimizer", "scheduler": "scheduler",
    "warmup_epochs": "warmup_epochs", "moco_dim": "moco_dim", "moco_k": "moco_k", "moco_m": "moco_m",
    "moco_t": "moco_t", "shuffle": "shuffle", "keep": "keep", "monitor": "monitor",
}
FINETUNE_FLAGS = {
    **DATA_FLAGS, **COMMON_FLAGS, "protocol": "protocol", "fraction": "fraction", "draw": "draw",
    "epochs_scale": "epochs_scale",
}


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with the job's config (flags override it)")
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--root", help="dataset root folder")
    p.add_argument("--csv", help="label CSV (default: the dataset's usual file under --root)")
    p.add_argument("--test-csv", help="a CSV whose images form the test set (CheXpert: valid.csv)")
    p.add_argument("--task", help="task set (pleural_effusion, competition5, tb, pneumonia, ...) or columns")
    p.add_argument("--policy", help="CheXpert uncertainty policy: ignore | ones | zeros")
    p.add_argument("--cache", help="folder for the pre-resized uint8 image cache (built on first use)")
    p.add_argument("--split-seed", type=int, help="seed of the patient-level train/val/test split")
    p.add_argument("--val", type=float, help="fraction of patients for validation")
    p.add_argument("--test", type=float, help="fraction of patients for test (without --test-csv)")


def _add_common_flags(p: argparse.ArgumentParser, init_help: str) -> None:
    p.add_argument("--backbone", choices=("resnet18", "resnet34", "resnet50", "densenet121"))
    p.add_argument("--init", help=init_help)
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--preset", help="augmentation preset: cxr | mocov2")
    p.add_argument("--workers", type=int, help="DataLoader workers (0-1 recommended on CPU)")
    p.add_argument("--seed", type=int)
    p.add_argument("--experiment", help="MLflow experiment name")
    p.add_argument("--run-name")


def _add_pretrain_flags(p: argparse.ArgumentParser) -> None:
    _add_data_flags(p)
    _add_common_flags(p, "auto | random | imagenet | checkpoint path | models:/ or runs:/ URI")
    p.add_argument("--optimizer", choices=("sgd", "adam"))
    p.add_argument("--scheduler", choices=("cosine", "milestone", "constant"))
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--moco-dim", type=int)
    p.add_argument("--moco-k", type=int, help="queue length K (a multiple of the batch size)")
    p.add_argument("--moco-m", type=float)
    p.add_argument("--moco-t", type=float)
    p.add_argument("--shuffle", choices=("auto", "split_bn", "ddp", "none"))
    p.add_argument("--keep", help="checkpoint retention: all | every:K | best:K:metric")
    p.add_argument("--monitor", action="store_const", const=True,
                   help="log val/linear_auc (fast linear evaluation on --task) after every epoch")


def _config(cls, args: argparse.Namespace, flags: dict[str, str]):
    from mococxr.config import from_dict, load_yaml, override

    cfg = from_dict(cls, load_yaml(args.config), where=args.config) if args.config else cls()
    return override(cfg, {key: getattr(args, flag, None) for flag, key in flags.items()})


def _pretrain_config(args: argparse.Namespace):
    from mococxr.config import PretrainConfig

    return _config(PretrainConfig, args, PRETRAIN_FLAGS)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from mococxr.train.pretrain import pretrain

    cfg = _pretrain_config(args)
    result = pretrain(cfg, resume=args.resume, resume_epochs=args.epochs if args.resume else None)
    if result.run_id:
        print(f"pretraining run {result.run_id}: {len(result.history)} epoch(s) logged")
        print(f"register a checkpoint: mococxr registry register --name mococxr-{cfg.backbone} "
              f"--run-id {result.run_id} --epoch {max(result.history) if result.history else 1}")
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from mococxr.tracking import registry
    from mococxr.tracking.mlflow import configure

    configure()
    if args.action == "list":
        table = registry.list_versions(args.name)
        print(table.to_string(index=False) if len(table) else "no registered models")
    elif args.action == "register":
        version = registry.register(args.name, model_id=args.model_id, run_id=args.run_id, epoch=args.epoch)
        print(f"registered {args.name} version {version}")
        if args.stage:
            registry.promote(args.name, version, args.stage)
            print(f"{args.name} version {version} -> {args.stage} (models:/{args.name}@{args.stage})")
    elif args.action == "promote":
        registry.promote(args.name, args.version, args.stage)
        print(f"{args.name} version {args.version} -> {args.stage} (models:/{args.name}@{args.stage.lower()})")
    return 0


# -- fine-tuning and linear evaluation ------------------------------------------------------------------
def cmd_finetune(args: argparse.Namespace) -> int:
    from mococxr.config import FinetuneConfig
    from mococxr.train.finetune import finetune

    cfg = _config(FinetuneConfig, args, FINETUNE_FLAGS)
    result = finetune(cfg)
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in sorted(result.test.items()))
    print(f"fine-tune run {result.run_id}: best epoch {result.best_epoch} (val AUC {result.val_auc:.4f}); {metrics}")
    return 0


def cmd_linear_eval(args: argparse.Namespace) -> int:
    import pandas as pd

    from mococxr.config import FinetuneConfig
    from mococxr.data.labels import resolve_tasks
    from mococxr.models.backbones import build_encoder
    from mococxr.tracking.mlflow import configure
    from mococxr.train.data import load_cache, split_records
    from mococxr.train.linear_eval import linear_eval
    from mococxr.train.pretrain import resolve_init

    cfg = _config(FinetuneConfig, args, FINETUNE_FLAGS)
    if cfg.init.startswith(("models:/", "runs:/")):
        configure()
    splits = split_records(cfg.data)
    tasks = resolve_tasks(cfg.data.task, splits["train"])
    kind, state, origin = resolve_init(cfg.init, cfg.backbone)
    encoder = build_encoder(cfg.backbone, init=kind, state_dict=state)
    cache = load_cache(cfg.data, pd.concat([splits["train"], splits["val"]], ignore_index=True), cfg.image_size)
    result = linear_eval(encoder, splits["train"], splits["val"], tasks, image_size=cfg.image_size, cache=cache)
    for task, auc in result.per_task.items():
        print(f"{task}: val AUC {auc:.4f} (C={result.C[task]:g})")
    print(f"linear evaluation of {cfg.init}: mean val AUC {result.auc:.4f} "
          f"({result.n_train} train / {result.n_val} val images, {result.seconds:.1f} s)")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from mococxr.sweep.grid import load_grid, run_grid

    overrides = {key: getattr(args, flag, None) for flag, key in DATA_FLAGS.items()}
    overrides.update({"epochs_scale": args.epochs_scale, "image_size": args.image_size, "workers": args.workers})
    spec = load_grid(args.spec, overrides)
    result = run_grid(spec, dry_run=args.dry_run)
    print(f"grid {spec.name}: {result.started} run(s) started, {result.skipped} skipped as finished, "
          f"{len(result.failed)} failed (parent run {result.parent_run_id})")
    for line in result.failed:
        print(f"  failed: {line}", file=sys.stderr)
    return 1 if result.failed else 0


# -- sweeps, reports and the demo -----------------------------------------------------------------------
def cmd_sweep(args: argparse.Namespace) -> int:
    from mococxr.sweep.study import run_sweep

    promote = ("production" if args.production else "staging") if args.promote else None
    result = run_sweep(args.spec, n_trials=args.n_trials, storage=args.storage, study_name=args.study_name,
                       promote=promote, registered_model=args.registered_model)
    print(f"study {result.study_name}: {result.n_complete} complete, {result.n_pruned} pruned, "
          f"{result.n_failed} failed (MLflow parent run {result.parent_run_id})")
    if result.best_trial is not None:
        print(f"best trial {result.best_trial}: {result.best_value:.4f} at epoch {result.best_epoch} "
              f"(run {result.best_run_id}) {result.best_params}")
    if result.promoted_uri:
        print(f"promoted: {result.promoted_uri}  ->  mococxr finetune --init {result.promoted_uri}")
    return 0


def print_report(report) -> None:
    """The paper-style tables of a report, in the terminal."""
    from mococxr.report.tables import to_markdown, wide_table

    for title, tidy in (("AUC (95% CI)", report.absolute), ("AUC difference, paired (95% CI)", report.improvement)):
        if len(tidy):
            print(f"\n{title}\n")
            print(to_markdown(wide_table(tidy, "auc")))


def cmd_report(args: argparse.Namespace) -> int:
    from mococxr.report.tables import build_report

    report = build_report(
        args.experiment, out=args.out, dataset=args.dataset, task=args.task, backbone=args.backbone,
        n_replicates=args.replicates, seed=args.seed, groups="patient" if args.by_patient else "image",
        baseline=tuple(b.strip() for b in args.baseline.split(",")), log_to_mlflow=not args.no_mlflow,
    )
    print_report(report)
    print(f"\ntables and plots in {args.out} (report.md, tables/, plots/)"
          + (f"; MLflow report run {report.run_id}" if report.run_id else ""))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mococxr.demo import run_demo

    run_demo(quick=args.quick, dataset=args.dataset, root=args.root, task=args.task)
    return 0


# -- the parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mococxr",
        description="MoCo-CXR pretraining, fine-tuning and paired-bootstrap reports for chest X-ray encoders, "
        "tracked in MLflow and searched with Optuna. Start with `mococxr demo`.",
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                        "sqlite:///mlruns/mlflow.db)")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="synthesize, check and describe datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("synth", help="write a phantom chest X-ray dataset in a real layout")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=("chexpert", "shenzhen"), default="chexpert")
    p.add_argument("--n-valid", type=int, help="images in valid.csv, the test set (default max(20, n/10))")
    p.set_defaults(func=cmd_data_synth)
    for name, func, helptext in (
        ("check", cmd_data_check, "scan every row and image; report all problems; exit 1 if any"),
        ("stats", cmd_data_stats, "counts per task, label value, view and patient"),
    ):
        p = dsub.add_parser(name, help=helptext)
        p.add_argument("--dataset", choices=DATASETS, required=True)
        p.add_argument("--root", required=True)
        p.add_argument("--csv")
        if name == "stats":
            p.add_argument("--task", help="task set or comma-separated columns")
        p.set_defaults(func=func)

    p = sub.add_parser("pretrain", help="MoCo v2 pretraining, every epoch logged to MLflow")
    _add_pretrain_flags(p)
    p.add_argument("--resume", metavar="RUN_ID", help="continue this interrupted run (its logged config is used)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="linear or end-to-end fine-tuning at a label fraction, logged to MLflow")
    _add_data_flags(p)
    _add_common_flags(p, "random | imagenet | checkpoint path | models:/NAME/Production | runs:/ URI")
    p.add_argument("--protocol", choices=("linear", "e2e"))
    p.add_argument("--fraction", type=float, help="label fraction of the train split (0-1]")
    p.add_argument("--draw", type=int, help="index of the random label-fraction draw")
    p.add_argument("--epochs-scale", type=float, help="multiplies the label-fraction epoch rule")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("linear-eval", help="fast linear evaluation (frozen features + logistic regression)")
    _add_data_flags(p)
    _add_common_flags(p, "random | imagenet | checkpoint path | models:/ or runs:/ URI")
    p.set_defaults(func=cmd_linear_eval)

    p = sub.add_parser("grid", help="the fine-tune grid: inits x protocols x fractions x draws (idempotent)")
    p.add_argument("spec", help="grid YAML, e.g. sweeps/finetune_grid.yaml")
    for flag in ("--dataset", "--root", "--csv", "--test-csv", "--task", "--policy", "--cache"):
        p.add_argument(flag, help="override the grid's base data config")
    p.add_argument("--split-seed", type=int)
    p.add_argument("--val", type=float)
    p.add_argument("--test", type=float)
    p.add_argument("--epochs-scale", type=float, help="multiply every run's epochs (quick looks)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("sweep", help="an Optuna study over pretraining hyperparameters (joins/resumes)")
    p.add_argument("spec", help="study YAML, e.g. sweeps/pretrain_lr.yaml")
    p.add_argument("--n-trials", type=int, help="total trial budget of the study (overrides the spec)")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///mlruns/optuna.db; postgresql://...)")
    p.add_argument("--study-name", help="join or create this study (default: the spec's name)")
    p.add_argument("--promote", action="store_true", help="register the best checkpoint and move it to staging")
    p.add_argument("--production", action="store_true", help="with --promote: move it to production instead")
    p.add_argument("--registered-model", help="registered model name (default mococxr-<backbone>)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="paired bootstrap tables and plots from the fine-tune runs in MLflow")
    p.add_argument("--experiment", required=True)
    p.add_argument("--dataset")
    p.add_argument("--task")
    p.add_argument("--backbone")
    p.add_argument("--out", required=True, help="folder for report.md, tables/ and plots/")
    p.add_argument("--replicates", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--by-patient", action="store_true", help="resample whole patients")
    p.add_argument("--baseline", default="random,imagenet", help="inits MoCo is compared against")
    p.add_argument("--no-mlflow", action="store_true", help="write files only, log no report run")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the whole flow on the embedded phantom dataset")
    p.add_argument("--quick", action="store_true", help="a ~2-minute version")
    p.add_argument("--dataset", default="phantom", choices=("phantom", *DATASETS))
    p.add_argument("--root", help="dataset root (for a real dataset)")
    p.add_argument("--task", help="task (default pleural_effusion; pneumonia for nih)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("registry", help="list, register and promote checkpoints")
    p.add_argument("action", choices=("list", "register", "promote"))
    p.add_argument("--name", help="registered model name, e.g. mococxr-resnet18")
    p.add_argument("--run-id")
    p.add_argument("--epoch", type=int)
    p.add_argument("--model-id", help="a LoggedModel id (m-...) instead of --run-id/--epoch")
    p.add_argument("--version")
    p.add_argument("--stage", help="staging | production | archived")
    p.set_defaults(func=cmd_registry)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    if args.command == "registry" and args.action != "list" and not args.name:
        parser.error("registry register/promote need --name")
    try:
        return int(args.func(args) or 0)
    except MococxrError as exc:
        print(f"mococxr: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mococxr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
