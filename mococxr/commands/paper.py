"""``mococxr paper PLAN.yaml``: run the whole paper as one plan, or (``--plan``) price it and run nothing."""

from __future__ import annotations

import argparse
import os

from mococxr.commands.handlers import command_store
from mococxr.tracking.mlflow import OPTUNA_ENV


def cmd_paper(args: argparse.Namespace) -> int:
    from mococxr.flows.plan import load_plan

    if args.plan:
        return cmd_paper_plan(args)
    # the plan is read and checked before torch loads or a store opens: a bad spec costs a second, never
    # an empty store, and a hostile one (a YAML alias bomb) never grows the process
    plan = load_plan(args.spec, roots={"chexpert": args.chexpert_root, "shenzhen": args.shenzhen_root})
    from mococxr.flows.paper import run_paper
    from mococxr.flows.stages import check_phantom_roots

    check_phantom_roots(plan)  # a real dataset named as a phantom's root: refused before a store is created
    run_paper(plan, only=args.only, out=args.out, store=command_store(args), storage=args.storage)
    return 0


def cmd_paper_plan(args: argparse.Namespace) -> int:
    """``paper --plan``: every run the plan would make, its cost and what the test sets can resolve; the
    store is only read (never created or opened for writing)."""
    from mococxr.flows.cost import estimate
    from mococxr.flows.plan import load_plan

    if args.storage:  # the studies whose finished trials --plan reads are in the workers' storage
        os.environ[OPTUNA_ENV] = args.storage
    plan = load_plan(args.spec, roots={"chexpert": args.chexpert_root, "shenzhen": args.shenzhen_root})
    print(estimate(plan, args.only, tracking_uri=args.tracking_uri), flush=True)
    return 0


__all__ = ["cmd_paper", "cmd_paper_plan"]
