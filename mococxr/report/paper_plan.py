"""``mococxr paper PLAN.yaml``: run a plan (:mod:`mococxr.sweep.stages`) and build the paper's reports.

The plan's stages sit a floor below the reports, so the report stage is this module's hook: one report
run per table/figure family (:mod:`mococxr.report.paper`), in the experiment that holds its runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mococxr.errors import ConfigError
from mococxr.sweep.plan import PaperPlan, load_plan
from mococxr.tracking import mlflow as mt


def run_paper(
    path: str | Path,
    *,
    only: Sequence[str] | None = None,
    chexpert_root: str | None = None,
    shenzhen_root: str | None = None,
    out: str | Path = "reports",
    store: mt.Store | None = None,
):
    """Run the plan at ``path`` (its cost without running it: :func:`mococxr.sweep.cost.estimate`, which
    ``paper --plan`` calls); returns the PlanResult."""
    from mococxr.sweep.stages import run_plan

    plan = load_plan(path, roots={"chexpert": chexpert_root, "shenzhen": shenzhen_root})
    return run_plan(
        plan, only=only, store=store, report=lambda p, ctx: paper_reports(p, ctx, Path(out) / p.name)
    )


def notes(plan: PaperPlan, *extra: str):
    """The caption facts that come from the plan rather than from the runs."""
    from mococxr.report.paper import PaperNotes

    study = plan.study_spec(plan.backbones[0])
    lines = [
        f"MoCo pretraining: {study.epochs} epochs per trial, {study.base.image_size} px, batch "
        f"{study.base.batch_size}, {len(study.search_space)}-way search over "
        f"{', '.join(study.search_space)} ({study.budget.n_trials} trials, pruner {study.pruner.name}); "
        f"the best trial by {study.metric} is the MoCo checkpoint."
    ]
    pre = study.base.data
    if pre.dataset == "chexpert":
        lines.append(
            "MoCo pretraining data: "
            + (
                "frontal images only (the paper pretrains on CheXpert, whose 224k images include laterals, and does not "
                "say it left them out)."
                if pre.frontal_only
                else "every training image, laterals included."
            )
        )
    if plan.phantom is not None:
        lines.append("Data: synthetic phantom radiographs made by the plan, not real images.")
    return PaperNotes(baseline=plan.baseline, moco_start=plan.moco_start, extra=tuple(lines) + tuple(extra))


def paper_reports(plan: PaperPlan, ctx: dict[str, Any], out: Path) -> dict[str, str]:
    """Every family whose runs the plan made: {family: report run id}."""
    from mococxr.report import paper
    from mococxr.sweep.stages import table2_label

    store, made = ctx["store"], {}
    kw = {"notes": notes(plan), "n_replicates": plan.replicates, "store": store}
    if "chexpert" in plan.grids:
        made["chexpert"] = paper.chexpert_family(
            plan.experiment("chexpert"), out=out / "chexpert", task=plan.data["chexpert"].task, **kw
        )
    if "shenzhen" in plan.grids:
        made["shenzhen"] = paper.shenzhen_family(
            plan.experiment("shenzhen"), out=out / "shenzhen", task=plan.data["shenzhen"].task, **kw
        )
    if plan.table2 is not None:
        rows = [
            paper.Table2Row(
                label=table2_label(c),
                lr=c.lr,
                scheduler=c.scheduler,
                trial=c.trial,
                pretrain_run_id=c.pretrain_run_id,
                registered_model=c.registered_model,
                version=c.version,
                epoch=c.epoch,
                val_objective=c.value,
            )
            for c in ctx["checkpoints"].get(plan.table2.backbone, [])
        ]
        if not rows:
            raise ConfigError(
                f"table2: no registered {plan.table2.backbone} trial checkpoints; run the pretrain stage"
            )
        made["table2"] = paper.table2_report(plan.experiment("table2"), rows, out=out / "table2", **kw)
    if "competition" in plan.grids:
        stage = plan.grids["competition"]
        made["competition"] = paper.competition_family(
            plan.experiment("competition"),
            list(stage.tasks),
            out=out / "competition",
            backbone=stage.backbones[0] if len(stage.backbones) == 1 else None,
            **kw,
        )
    for family, run_id in made.items():
        print(f"report {family}: run {run_id}", flush=True)
    return made


__all__ = ["notes", "paper_reports", "run_paper"]
