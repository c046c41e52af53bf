"""The ``mococxr`` command's arguments: one parser, its subcommands and their flags.

Config flags are generated from the config fields (:func:`mococxr.config.add_flags`): a field is spelled
once. Each subcommand names its handler (``handler="cmd_..."``, a function of
:mod:`mococxr.commands.handlers` or :mod:`mococxr.commands.paper`), which :func:`mococxr.cli.main` calls.
"""

from __future__ import annotations

import argparse

from mococxr.config import ALIASES

REGISTRY_ALIASES = (*ALIASES, "archived")  # what --stage moves a version to: an alias, or archived
LINEAR_EVAL_FIELDS = ("data.*", "backbone", "init", "image_size", "workers", "seed")
GRID_FIELDS = ("data.*", "epochs_scale", "image_size", "workers")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mococxr",
        description="MoCo-CXR pretraining, fine-tuning and paired-bootstrap reports for chest X-ray "
        "encoders, tracked in MLflow and searched with Optuna. Start with `mococxr demo`.",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True)
    _data_parsers(sub)
    _training_parsers(sub)
    _study_and_report_parsers(sub)
    _flow_and_registry_parsers(sub)
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
    p.add_argument(
        "--layout",
        choices=("chexpert", "shenzhen"),
        default="chexpert",
        help="folder and CSV layout to imitate (default: chexpert)",
    )
    p.add_argument("--n-valid", type=int, help="images in valid.csv, the test set (default max(20, n/10))")
    p.set_defaults(handler="cmd_data_synth")
    for name, handler, helptext in (
        ("check", "cmd_data_check", "scan every row and image; report all problems; exit 1 if any"),
        ("stats", "cmd_data_stats", "counts per task, label value, view and patient"),
    ):
        p = dsub.add_parser(name, help=helptext)
        p.add_argument("--dataset", choices=DATASETS, required=True, help="dataset reader")
        p.add_argument("--root", required=True, help="dataset root folder")
        p.add_argument("--csv", help="label CSV (default: the dataset's usual file under --root)")
        if name == "stats":
            p.add_argument("--task", help="task set or comma-separated columns")
        p.set_defaults(handler=handler)


def _training_parsers(sub) -> None:
    from mococxr.config import FinetuneConfig, PretrainConfig, add_flags

    p = sub.add_parser("pretrain", help="MoCo v2 pretraining, every epoch logged to MLflow")
    p.add_argument("--config", help="YAML file with the job's config (flags override it)")
    add_flags(p, PretrainConfig)
    p.add_argument(
        "--resume", metavar="RUN_ID", help="continue this interrupted run (its logged config is used)"
    )
    p.add_argument(
        "--resume-from",
        type=int,
        metavar="EPOCH",
        help="with --resume: continue from this epoch's "
        "resume point (default: the newest), e.g. when the newest is damaged",
    )
    p.set_defaults(handler="cmd_pretrain")

    p = sub.add_parser(
        "finetune", help="linear or end-to-end fine-tuning at a label fraction, logged to MLflow"
    )
    p.add_argument("--config", help="YAML file with the job's config (flags override it)")
    add_flags(p, FinetuneConfig)
    p.set_defaults(handler="cmd_finetune")

    p = sub.add_parser("linear-eval", help="fast linear evaluation (frozen features + logistic regression)")
    p.add_argument("--config", help="YAML file with the job's config (flags override it)")
    add_flags(p, FinetuneConfig, LINEAR_EVAL_FIELDS)
    p.set_defaults(handler="cmd_linear_eval")

    p = sub.add_parser("grid", help="the fine-tune grid: inits x protocols x fractions x draws (idempotent)")
    p.add_argument("spec", help="grid YAML, e.g. sweeps/finetune_grid.yaml")
    add_flags(p, FinetuneConfig, GRID_FIELDS, show_defaults=False)  # override the grid's base config
    p.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    p.set_defaults(handler="cmd_grid")


def _study_and_report_parsers(sub) -> None:
    p = sub.add_parser("sweep", help="an Optuna study over pretraining hyperparameters (joins/resumes)")
    p.add_argument("spec", help="study YAML, e.g. sweeps/pretrain_lr.yaml")
    p.add_argument("--n-trials", type=int, help="total trial budget of the study (overrides the spec)")
    p.add_argument(
        "--storage", help="Optuna storage URL (default sqlite:///mlruns/optuna.db; postgresql://...)"
    )
    p.add_argument("--study-name", help="join or create this study (default: the spec's name)")
    p.add_argument(
        "--promote", action="store_true", help="register the best checkpoint and move it to staging"
    )
    p.add_argument("--production", action="store_true", help="with --promote: move it to production instead")
    p.add_argument("--registered-model", help="registered model name (default mococxr-<backbone>)")
    p.set_defaults(handler="cmd_sweep")

    p = sub.add_parser("report", help="paired bootstrap tables and plots from the fine-tune runs in MLflow")
    p.add_argument("--experiment", required=True, help="MLflow experiment holding the fine-tune runs")
    p.add_argument("--dataset", help="only runs on this dataset")
    p.add_argument("--task", help="only runs on this task")
    p.add_argument("--backbone", help="only runs of this backbone")
    p.add_argument("--out", required=True, help="folder for report.html, report.md, tables/ and plots/")
    p.add_argument("--replicates", type=int, default=500, help="bootstrap replicates (default: 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    p.add_argument("--by-patient", action="store_true", help="resample whole patients")
    p.add_argument(
        "--treatment",
        default="moco",
        help="init label compared against the baselines (default: moco; none: absolute numbers only)",
    )
    p.add_argument(
        "--baseline",
        default="random,imagenet",
        help="init labels the treatment is compared against (default: random,imagenet)",
    )
    p.add_argument("--no-mlflow", action="store_true", help="write files only, log no report run")
    p.set_defaults(handler="cmd_report")


def _flow_and_registry_parsers(sub) -> None:
    from mococxr.config import DATASETS
    from mococxr.flows.plan import STAGE_NAMES

    p = sub.add_parser(
        "paper", help="the paper as one plan: studies, registry, grids and every table and figure"
    )
    p.add_argument("spec", help="plan YAML: sweeps/paper.yaml (real data) or sweeps/paper_phantom.yaml")
    p.add_argument("--plan", action="store_true", help="list every run with its images and cost; run nothing")
    p.add_argument(
        "--only", nargs="+", metavar="STAGE", help=f"run these stages only ({', '.join(STAGE_NAMES)})"
    )
    p.add_argument("--chexpert-root", help="the folder holding CheXpert-v1.0-small/ (overrides the plan)")
    p.add_argument("--shenzhen-root", help="the folder holding Shenzhen's CXR_png/ (overrides the plan)")
    p.add_argument(
        "--out", default="reports", help="folder for the report files (default: reports/<plan name>)"
    )
    p.add_argument(
        "--storage",
        help="Optuna storage every worker of the plan shares (postgresql://USER:PASSWORD@HOST/DB for several "
        "machines); default $MOCOCXR_OPTUNA_STORAGE, else optuna.db beside the MLflow store",
    )
    p.set_defaults(handler="cmd_paper")

    p = sub.add_parser("demo", help="the whole flow on the embedded phantom dataset")
    p.add_argument(
        "--quick", action="store_true", help="a small version with its own names (~40 s on 2 CPU cores)"
    )
    p.add_argument("--dataset", default="phantom", choices=("phantom", *DATASETS))
    p.add_argument("--root", help="dataset root (for a real dataset)")
    p.add_argument("--task", help="task (default pleural_effusion; pneumonia for nih)")
    p.set_defaults(handler="cmd_demo")

    p = sub.add_parser("registry", help="list, register and promote checkpoints")
    p.add_argument("action", choices=("list", "register", "promote"))
    p.add_argument("--name", help="registered model name, e.g. mococxr-resnet18")
    p.add_argument("--run-id", help="the pretraining run whose checkpoint to register")
    p.add_argument("--epoch", type=int, help="the epoch of that run's checkpoint")
    p.add_argument("--model-id", help="a LoggedModel id (m-...) instead of --run-id/--epoch")
    p.add_argument("--version", help="registered version to promote")
    p.add_argument("--stage", type=str.lower, choices=REGISTRY_ALIASES, help=" | ".join(REGISTRY_ALIASES))
    p.set_defaults(handler="cmd_registry")


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line ``mococxr: error: ...`` and exit 2, no usage dump."""

    def error(self, message: str):
        self.exit(2, f"mococxr: error: {message} (see `{self.prog} --help`)\n")


def check_registry_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Argument combinations argparse cannot express, refused before any work is done."""
    if args.action != "list" and not args.name:
        parser.error(f"registry {args.action} needs --name")
    if args.action == "promote" and (not args.version or not args.stage):
        parser.error("registry promote needs --version and --stage (" + " | ".join(REGISTRY_ALIASES) + ")")
    if args.action == "register" and not (args.model_id or (args.run_id and args.epoch is not None)):
        parser.error("registry register needs --model-id, or --run-id and --epoch")


__all__ = ["GRID_FIELDS", "LINEAR_EVAL_FIELDS", "REGISTRY_ALIASES", "build_parser", "check_registry_args"]
