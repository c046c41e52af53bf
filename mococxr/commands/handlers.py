"""What each ``mococxr`` subcommand does: call the modules below with the parsed arguments and print
the outcome. No logic of its own; the paper and its ``--plan`` are :mod:`mococxr.commands.paper`."""

from __future__ import annotations

import argparse
import sys

from mococxr.commands.args import GRID_FIELDS, LINEAR_EVAL_FIELDS
from mococxr.console import mococxr
from mococxr.errors import ConfigError


# -- data ---------------------------------------------------------------------------------------------
def cmd_data_synth(args: argparse.Namespace) -> int:
    import time

    from mococxr.data.phantom import synthesize

    t0 = time.perf_counter()
    root = synthesize(
        args.out, args.n, size=args.size, seed=args.seed, layout=args.layout, n_valid=args.n_valid
    )
    print(
        f"wrote {args.n} phantom images ({args.layout} layout, {args.size} px) under {root} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    dataset = "chexpert" if args.layout == "chexpert" else "shenzhen"
    print(f"check it: {mococxr('data', 'check', '--dataset', dataset, '--root', str(root))}")
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


# -- training -------------------------------------------------------------------------------------------


def cmd_pretrain(args: argparse.Namespace) -> int:
    from mococxr.config import PretrainConfig, from_flags
    from mococxr.train.pretrain import pretrain

    cfg = from_flags(PretrainConfig, args, yaml_path=args.config)
    result = pretrain(
        cfg,
        resume=args.resume,
        resume_epochs=args.epochs if args.resume else None,
        resume_from=args.resume_from,
        store=command_store(args),
    )
    if result.run_id:
        print(f"pretraining run {result.run_id}: {len(result.history)} epoch(s) logged")
        print(
            f"register a checkpoint: {mococxr('registry', 'register')} --name mococxr-{cfg.backbone} "
            f"--run-id {result.run_id} --epoch {max(result.history) if result.history else 1}"
        )
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from mococxr.tracking import registry

    command_store(args)
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
        print(
            f"{args.name} version {args.version} -> {args.stage} (models:/{args.name}@{args.stage.lower()})"
        )
    return 0


# -- fine-tuning and linear evaluation ------------------------------------------------------------------
def cmd_finetune(args: argparse.Namespace) -> int:
    from mococxr.config import FinetuneConfig, from_flags
    from mococxr.train.finetune import finetune

    cfg = from_flags(FinetuneConfig, args, yaml_path=args.config)
    result = finetune(cfg, store=command_store(args))
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in sorted(result.test.items()))
    chosen = f", linear lr {result.lr_chosen:g} chosen on validation" if result.lr_chosen is not None else ""
    print(
        f"fine-tune run {result.run_id}: best epoch {result.best_epoch} "
        f"(val AUC {result.val_auc:.4f}{chosen}); {metrics}"
    )
    return 0


def cmd_linear_eval(args: argparse.Namespace) -> int:
    from mococxr.config import FinetuneConfig, from_flags
    from mococxr.train.linear_eval import evaluate

    cfg = from_flags(FinetuneConfig, args, yaml_path=args.config, only=LINEAR_EVAL_FIELDS)
    result = evaluate(cfg, store=command_store(args))
    for task, auc in result.per_task.items():
        print(f"{task}: val AUC {auc:.4f} (C={result.C[task]:g})")
    print(
        f"linear evaluation of {cfg.init}: mean val AUC {result.auc:.4f} "
        f"({result.n_train} train / {result.n_val} val images, {result.seconds:.1f} s)"
    )
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from mococxr.config import FinetuneConfig, flag_fields
    from mococxr.sweep.grid_spec import load_grid

    overrides = {key: getattr(args, key) for key, _, _ in flag_fields(FinetuneConfig, GRID_FIELDS)}
    spec = load_grid(args.spec, overrides)  # checked before torch loads (see cmd_paper)
    from mococxr.sweep.grid import run_grid

    result = run_grid(spec, dry_run=args.dry_run, store=command_store(args))
    if args.dry_run:
        return 0  # run_grid printed what would run
    print(
        f"grid {spec.name}: {result.started} run(s) started, {result.skipped} skipped as finished, "
        f"{result.elsewhere} left to other processes, {len(result.failed)} failed "
        f"(parent run {result.parent_run_id})"
    )
    for line in result.failed:
        print(f"  failed: {line}", file=sys.stderr)
    return 1 if result.failed else 0


# -- sweeps, reports and the demo -----------------------------------------------------------------------
def cmd_sweep(args: argparse.Namespace) -> int:
    from mococxr.sweep.spec import load_spec

    load_spec(args.spec)  # checked before torch loads or a store opens (see cmd_paper)
    from mococxr.sweep.study import run_sweep

    promote = ("production" if args.production else "staging") if args.promote else None
    result = run_sweep(
        args.spec,
        n_trials=args.n_trials,
        storage=args.storage,
        study_name=args.study_name,
        promote=promote,
        registered_model=args.registered_model,
        store=command_store(args),
    )
    print(
        f"study {result.study_name}: {result.n_complete} complete, {result.n_pruned} pruned, "
        f"{result.n_failed} failed (MLflow parent run {result.parent_run_id})"
    )
    if result.best_trial is not None:
        print(
            f"best trial {result.best_trial}: {result.best_value:.4f} at epoch {result.best_epoch} "
            f"(run {result.best_run_id}) {result.best_params}"
        )
    if result.promoted_uri:
        print(f"promoted: {result.promoted_uri}  ->  {mococxr('finetune', '--init', result.promoted_uri)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mococxr.report.tables import build_report, format_report

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"report --out {args.out} is a file, not a folder; name a folder (it is created)")
    report = build_report(
        args.experiment,
        out=args.out,
        dataset=args.dataset,
        task=args.task,
        backbone=args.backbone,
        n_replicates=args.replicates,
        seed=args.seed,
        groups="patient" if args.by_patient else "image",
        baseline=tuple(b.strip() for b in args.baseline.split(",")),
        log_to_mlflow=not args.no_mlflow,
        treatment=None if args.treatment.lower() == "none" else args.treatment,
        store=command_store(args),
    )
    print(format_report(report))
    print(
        f"\ntables and plots in {args.out} (report.html to open in a browser; report.md, tables/, plots/)"
        + (f"; MLflow report run {report.run_id}" if report.run_id else "")
    )
    return 0


def command_store(args: argparse.Namespace):
    """The tracking store, opened once for the command (``--tracking-uri``, $MLFLOW_TRACKING_URI or
    the embedded sqlite:///mlruns/mlflow.db) and passed down."""
    from mococxr.tracking.mlflow import open_store

    if getattr(args, "store", None) is None:
        args.store = open_store(args.tracking_uri)
    return args.store


def cmd_demo(args: argparse.Namespace) -> int:
    from mococxr.flows.demo import run_demo

    run_demo(
        quick=args.quick, dataset=args.dataset, root=args.root, task=args.task, store=command_store(args)
    )
    return 0


__all__ = [
    "cmd_data_check",
    "cmd_data_stats",
    "cmd_data_synth",
    "cmd_demo",
    "cmd_finetune",
    "cmd_grid",
    "cmd_linear_eval",
    "cmd_pretrain",
    "cmd_registry",
    "cmd_report",
    "cmd_sweep",
    "command_store",
]
