"""The ``mococxr`` command: parses arguments and calls the modules below; no logic of its own.

User errors print one line without a traceback and exit 2 (see :func:`main`).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from mococxr.config import STAGES
from mococxr.console import mococxr
from mococxr.errors import ConfigError, InterruptedBySignal, user_message

REGISTRY_STAGES = (*STAGES, "archived")


# -- data ---------------------------------------------------------------------------------------------
def cmd_data_synth(args: argparse.Namespace) -> int:
    import time

    from mococxr.data.phantom import synthesize

    t0 = time.perf_counter()
    root = synthesize(args.out, args.n, size=args.size, seed=args.seed, layout=args.layout, n_valid=args.n_valid)
    print(f"wrote {args.n} phantom images ({args.layout} layout, {args.size} px) under {root} "
          f"in {time.perf_counter() - t0:.1f} s")
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
# Config flags are generated from the config fields (mococxr.config.add_flags): a field is spelled once.
LINEAR_EVAL_FIELDS = ("data.*", "backbone", "init", "image_size", "workers", "seed")
GRID_FIELDS = ("data.*", "epochs_scale", "image_size", "workers")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from mococxr.config import PretrainConfig, from_flags
    from mococxr.train.pretrain import pretrain

    cfg = from_flags(PretrainConfig, args, yaml_path=args.config)
    result = pretrain(cfg, resume=args.resume, resume_epochs=args.epochs if args.resume else None,
                      resume_from=args.resume_from,
                      store=_store(args))
    if result.run_id:
        print(f"pretraining run {result.run_id}: {len(result.history)} epoch(s) logged")
        print(f"register a checkpoint: {mococxr('registry', 'register')} --name mococxr-{cfg.backbone} "
              f"--run-id {result.run_id} --epoch {max(result.history) if result.history else 1}")
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from mococxr.tracking import registry

    _store(args)
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
    from mococxr.config import FinetuneConfig, from_flags
    from mococxr.train.finetune import finetune

    cfg = from_flags(FinetuneConfig, args, yaml_path=args.config)
    result = finetune(cfg, store=_store(args))
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in sorted(result.test.items()))
    chosen = f", linear lr {result.lr_chosen:g} chosen on validation" if result.lr_chosen is not None else ""
    print(f"fine-tune run {result.run_id}: best epoch {result.best_epoch} (val AUC {result.val_auc:.4f}{chosen}); "
          f"{metrics}")
    return 0


def cmd_linear_eval(args: argparse.Namespace) -> int:
    from mococxr.config import FinetuneConfig, from_flags
    from mococxr.train.linear_eval import evaluate

    cfg = from_flags(FinetuneConfig, args, yaml_path=args.config, only=LINEAR_EVAL_FIELDS)
    result = evaluate(cfg, store=_store(args))
    for task, auc in result.per_task.items():
        print(f"{task}: val AUC {auc:.4f} (C={result.C[task]:g})")
    print(f"linear evaluation of {cfg.init}: mean val AUC {result.auc:.4f} "
          f"({result.n_train} train / {result.n_val} val images, {result.seconds:.1f} s)")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from mococxr.config import FinetuneConfig, flag_fields
    from mococxr.sweep.grid import load_grid, run_grid

    overrides = {key: getattr(args, key) for key, _, _ in flag_fields(FinetuneConfig, GRID_FIELDS)}
    spec = load_grid(args.spec, overrides)
    result = run_grid(spec, dry_run=args.dry_run, store=_store(args))
    if args.dry_run:
        return 0  # run_grid printed what would run
    print(f"grid {spec.name}: {result.started} run(s) started, {result.skipped} skipped as finished, "
          f"{result.elsewhere} left to other processes, {len(result.failed)} failed (parent run {result.parent_run_id})")
    for line in result.failed:
        print(f"  failed: {line}", file=sys.stderr)
    return 1 if result.failed else 0


# -- sweeps, reports and the demo -----------------------------------------------------------------------
def cmd_sweep(args: argparse.Namespace) -> int:
    from mococxr.sweep.study import run_sweep

    promote = ("production" if args.production else "staging") if args.promote else None
    result = run_sweep(args.spec, n_trials=args.n_trials, storage=args.storage, study_name=args.study_name,
                       promote=promote, registered_model=args.registered_model, store=_store(args))
    print(f"study {result.study_name}: {result.n_complete} complete, {result.n_pruned} pruned, "
          f"{result.n_failed} failed (MLflow parent run {result.parent_run_id})")
    if result.best_trial is not None:
        print(f"best trial {result.best_trial}: {result.best_value:.4f} at epoch {result.best_epoch} "
              f"(run {result.best_run_id}) {result.best_params}")
    if result.promoted_uri:
        print(f"promoted: {result.promoted_uri}  ->  {mococxr('finetune', '--init', result.promoted_uri)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mococxr.report.tables import build_report, format_report

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"report --out {args.out} is a file, not a folder; name a folder (it is created)")
    report = build_report(
        args.experiment, out=args.out, dataset=args.dataset, task=args.task, backbone=args.backbone,
        n_replicates=args.replicates, seed=args.seed, groups="patient" if args.by_patient else "image",
        baseline=tuple(b.strip() for b in args.baseline.split(",")), log_to_mlflow=not args.no_mlflow,
        treatment=None if args.treatment.lower() == "none" else args.treatment,
        store=_store(args),
    )
    print(format_report(report))
    print(f"\ntables and plots in {args.out} (report.md, tables/, plots/)"
          + (f"; MLflow report run {report.run_id}" if report.run_id else ""))
    return 0


def _store(args: argparse.Namespace):
    """The tracking store, opened once for the command (``--tracking-uri``, $MLFLOW_TRACKING_URI or
    the embedded sqlite:///mlruns/mlflow.db) and passed down."""
    from mococxr.tracking.mlflow import open_store

    if getattr(args, "store", None) is None:
        args.store = open_store(args.tracking_uri)
    return args.store


def cmd_paper(args: argparse.Namespace) -> int:
    from mococxr.report.paper_plan import run_paper

    if args.plan:
        return cmd_paper_plan(args)
    run_paper(args.spec, only=args.only, chexpert_root=args.chexpert_root, shenzhen_root=args.shenzhen_root,
              out=args.out, store=_store(args))
    return 0


def cmd_paper_plan(args: argparse.Namespace) -> int:
    """``paper --plan``: the cost estimate (sweep floor) with the report floor's test-set power as its hook;
    the store is only read (never created or opened for writing)."""
    from mococxr.report.power import power_lines
    from mococxr.sweep.cost import estimate
    from mococxr.sweep.plan import load_plan

    plan = load_plan(args.spec, roots={"chexpert": args.chexpert_root, "shenzhen": args.shenzhen_root})
    print(estimate(plan, args.only, power=power_lines, tracking_uri=args.tracking_uri), flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mococxr.demo import run_demo

    run_demo(quick=args.quick, dataset=args.dataset, root=args.root, task=args.task, store=_store(args))
    return 0


# -- the parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mococxr",
        description="MoCo-CXR pretraining, fine-tuning and paired-bootstrap reports for chest X-ray encoders, "
        "tracked in MLflow and searched with Optuna. Start with `mococxr demo`.",
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                        "sqlite:///mlruns/mlflow.db)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True)
    _data_parsers(sub)
    _training_parsers(sub)
    _study_and_report_parsers(sub)
    return parser


def _data_parsers(sub) -> None:
    from mococxr.config import DATASETS

    data = sub.add_parser("data", help="synthesize, check and describe datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("synth", help="write a phantom chest X-ray dataset in a real layout")
    p.add_argument("--out", required=True, help="folder to write the dataset into")
    p.add_argument("--n", type=int, default=1000, help="training images (default: 1000)")
    p.add_argument("--size", type=int, default=256, help="image size in pixels (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantom (default: 0)")
    p.add_argument("--layout", choices=("chexpert", "shenzhen"), default="chexpert",
                   help="folder and CSV layout to imitate (default: chexpert)")
    p.add_argument("--n-valid", type=int, help="images in valid.csv, the test set (default max(20, n/10))")
    p.set_defaults(func=cmd_data_synth)
    for name, func, helptext in (
        ("check", cmd_data_check, "scan every row and image; report all problems; exit 1 if any"),
        ("stats", cmd_data_stats, "counts per task, label value, view and patient"),
    ):
        p = dsub.add_parser(name, help=helptext)
        p.add_argument("--dataset", choices=DATASETS, required=True, help="dataset reader")
        p.add_argument("--root", required=True, help="dataset root folder")
        p.add_argument("--csv", help="label CSV (default: the dataset's usual file under --root)")
        if name == "stats":
            p.add_argument("--task", help="task set or comma-separated columns")
        p.set_defaults(func=func)


def _training_parsers(sub) -> None:
    from mococxr.config import FinetuneConfig, PretrainConfig, add_flags

    p = sub.add_parser("pretrain", help="MoCo v2 pretraining, every epoch logged to MLflow")
    p.add_argument("--config", help="YAML file with the job's config (flags override it)")
    add_flags(p, PretrainConfig)
    p.add_argument("--resume", metavar="RUN_ID", help="continue this interrupted run (its logged config is used)")
    p.add_argument("--resume-from", type=int, metavar="EPOCH", help="with --resume: continue from this epoch's "
                   "resume point (default: the newest), e.g. when the newest is damaged")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="linear or end-to-end fine-tuning at a label fraction, logged to MLflow")
    p.add_argument("--config", help="YAML file with the job's config (flags override it)")
    add_flags(p, FinetuneConfig)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("linear-eval", help="fast linear evaluation (frozen features + logistic regression)")
    p.add_argument("--config", help="YAML file with the job's config (flags override it)")
    add_flags(p, FinetuneConfig, LINEAR_EVAL_FIELDS)
    p.set_defaults(func=cmd_linear_eval)

    p = sub.add_parser("grid", help="the fine-tune grid: inits x protocols x fractions x draws (idempotent)")
    p.add_argument("spec", help="grid YAML, e.g. sweeps/finetune_grid.yaml")
    add_flags(p, FinetuneConfig, GRID_FIELDS, show_defaults=False)  # override the grid's base config
    p.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    p.set_defaults(func=cmd_grid)


def _study_and_report_parsers(sub) -> None:
    from mococxr.config import DATASETS

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
    p.add_argument("--experiment", required=True, help="MLflow experiment holding the fine-tune runs")
    p.add_argument("--dataset", help="only runs on this dataset")
    p.add_argument("--task", help="only runs on this task")
    p.add_argument("--backbone", help="only runs of this backbone")
    p.add_argument("--out", required=True, help="folder for report.md, tables/ and plots/")
    p.add_argument("--replicates", type=int, default=500, help="bootstrap replicates (default: 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    p.add_argument("--by-patient", action="store_true", help="resample whole patients")
    p.add_argument("--treatment", default="moco", help="init label compared against the baselines "
                   "(default: moco; none: absolute numbers only)")
    p.add_argument("--baseline", default="random,imagenet", help="init labels the treatment is compared "
                   "against (default: random,imagenet)")
    p.add_argument("--no-mlflow", action="store_true", help="write files only, log no report run")
    p.set_defaults(func=cmd_report)

    from mococxr.sweep.plan import STAGE_NAMES

    p = sub.add_parser("paper", help="the paper as one plan: studies, registry, grids and every table and figure")
    p.add_argument("spec", help="plan YAML: sweeps/paper.yaml (real data) or sweeps/paper_phantom.yaml")
    p.add_argument("--plan", action="store_true", help="list every run with its images and cost; run nothing")
    p.add_argument("--only", nargs="+", metavar="STAGE", help=f"run these stages only ({', '.join(STAGE_NAMES)})")
    p.add_argument("--chexpert-root", help="the folder holding CheXpert-v1.0-small/ (overrides the plan)")
    p.add_argument("--shenzhen-root", help="the folder holding Shenzhen's CXR_png/ (overrides the plan)")
    p.add_argument("--out", default="reports", help="folder for the report files (default: reports/<plan name>)")
    p.set_defaults(func=cmd_paper)

    p = sub.add_parser("demo", help="the whole flow on the embedded phantom dataset")
    p.add_argument("--quick", action="store_true", help="a ~2-minute version")
    p.add_argument("--dataset", default="phantom", choices=("phantom", *DATASETS))
    p.add_argument("--root", help="dataset root (for a real dataset)")
    p.add_argument("--task", help="task (default pleural_effusion; pneumonia for nih)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("registry", help="list, register and promote checkpoints")
    p.add_argument("action", choices=("list", "register", "promote"))
    p.add_argument("--name", help="registered model name, e.g. mococxr-resnet18")
    p.add_argument("--run-id", help="the pretraining run whose checkpoint to register")
    p.add_argument("--epoch", type=int, help="the epoch of that run's checkpoint")
    p.add_argument("--model-id", help="a LoggedModel id (m-...) instead of --run-id/--epoch")
    p.add_argument("--version", help="registered version to promote")
    p.add_argument("--stage", type=str.lower, choices=REGISTRY_STAGES, help=" | ".join(REGISTRY_STAGES))
    p.set_defaults(func=cmd_registry)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line ``mococxr: error: ...`` and exit 2, no usage dump."""

    def error(self, message: str):
        self.exit(2, f"mococxr: error: {message} (see `{self.prog} --help`)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. The one boundary for errors: a user's error (bad flag, file, URI, id, corrupt
    store, unreachable server, full or read-only disk) is one line and exit 2; anything else is a bug:
    one line, exit 1, the traceback with ``--debug``. Ctrl-C exits 130 and SIGTERM 143, after the
    runs in flight are marked KILLED."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "registry":
        _check_registry_args(parser, args)
    previous = _on_sigterm()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        sigterm = isinstance(exc, InterruptedBySignal)
        print(f"mococxr: {'terminated (SIGTERM)' if sigterm else 'interrupted (Ctrl-C)'}; an MLflow run in flight "
              "is marked KILLED", file=sys.stderr)
        return 143 if sigterm else 130
    except Exception as exc:
        if args.debug:
            raise
        message = user_message(exc, _tracking_uri_in_force(args))
        if message is not None:
            print(f"mococxr: error: {message}", file=sys.stderr)
            return 2
        first = " ".join(str(exc).split())[:300]
        print(f"mococxr: internal error: {type(exc).__name__}: {first} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _tracking_uri_in_force(args: argparse.Namespace) -> str | None:
    """The store an error may concern: the one opened, else the one that was being opened (the flag,
    ``MLFLOW_TRACKING_URI`` or the embedded default), so a damaged store is named however it was chosen."""
    store = getattr(args, "store", None)
    if store is not None:
        return store.tracking_uri
    tracking = sys.modules.get("mococxr.tracking.mlflow")  # not imported: no store was being opened
    if tracking is None:
        return args.tracking_uri
    try:
        return tracking.resolve_tracking_uri(args.tracking_uri)
    except Exception:  # noqa: BLE001 - a refused URI: its own error is the one being reported
        return args.tracking_uri


def _on_sigterm():
    """Make SIGTERM behave like Ctrl-C (the tracking code marks the run KILLED); returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise InterruptedBySignal(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def _check_registry_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Argument combinations argparse cannot express, refused before any work is done."""
    if args.action != "list" and not args.name:
        parser.error(f"registry {args.action} needs --name")
    if args.action == "promote" and (not args.version or not args.stage):
        parser.error("registry promote needs --version and --stage (" + " | ".join(REGISTRY_STAGES) + ")")
    if args.action == "register" and not (args.model_id or (args.run_id and args.epoch is not None)):
        parser.error("registry register needs --model-id, or --run-id and --epoch")


if __name__ == "__main__":
    raise SystemExit(main())
