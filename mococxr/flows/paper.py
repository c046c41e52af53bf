"""``mococxr paper PLAN.yaml``: the whole paper as one plan, its stages in order, then its reports.

:func:`run_plan` runs the stages of :mod:`mococxr.flows.stages` (studies, registration, fine-tune grids)
and ends with the report stage: one report run per table/figure family (:mod:`mococxr.report.paper`),
in the experiment that holds its runs. report/ only reads MLflow, so the report stage calls it as plain
functions. ``paper --plan`` prices the same stages without running them (:mod:`mococxr.flows.cost`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from mococxr.errors import ConfigError
from mococxr.flows import stages as st
from mococxr.flows.plan import PaperPlan, load_plan, select_stages
from mococxr.tracking import mlflow as mt


def run_paper(
    path: str | Path | PaperPlan,
    *,
    only: Sequence[str] | None = None,
    chexpert_root: str | None = None,
    shenzhen_root: str | None = None,
    out: str | Path = "reports",
    store: mt.Store | None = None,
    storage: str | None = None,
) -> st.PlanResult:
    """Run the plan at ``path`` (or the plan loaded from it) as one worker (its cost without running it:
    :func:`mococxr.flows.cost.estimate`, which ``paper --plan`` calls); returns the PlanResult. Reports go
    under ``out/<plan name>``. ``storage`` is the Optuna storage the workers share (default: the store's,
    see tracking/mlflow.py)."""
    plan = (
        path
        if isinstance(path, PaperPlan)
        else load_plan(path, roots={"chexpert": chexpert_root, "shenzhen": shenzhen_root})
    )
    store = mt.current_store(store)
    if storage:
        store = replace(store, optuna_storage=storage)
    return run_plan(plan, only=only, out=Path(out) / plan.name, store=store)


def run_plan(
    plan: PaperPlan,
    *,
    only: Sequence[str] | None = None,
    out: str | Path | None = None,
    store: mt.Store | None = None,
) -> st.PlanResult:
    """Run the plan's stages in order (all, or ``only``); returns what each made or found. The report
    stage writes its files under ``out`` (default ``reports/<plan name>``)."""
    store = mt.current_store(store)
    stages = select_stages(only)
    result = st.PlanResult(stages=stages)
    t0 = time.perf_counter()
    st.check_weights(plan)
    prepared: dict[str, Any] = {}
    for n, stage in enumerate(stages, 1):
        st.say(f"\n=== plan {plan.name}: stage {n}/{len(stages)} {stage} ===")
        if stage == "data":
            st.stage_data(plan)
        elif stage == "pretrain":
            st.stage_pretrain(plan, result, store, prepared)
        elif stage in plan.grids:
            for grid in plan.grid_specs(stage):
                st.run_one_grid(plan, grid, result, store, prepared)
        elif stage == "table2" and plan.table2 is not None:
            st.stage_table2(plan, result, store, prepared)
        elif stage == "report":
            st.collect_checkpoints(plan, result, store)
            folder = Path(out) if out is not None else Path("reports") / plan.name
            result.reports = paper_reports(plan, result.checkpoints, folder, store)
        else:
            st.say(f"stage {stage}: not in {plan.source}, skipped")
    result.seconds = time.perf_counter() - t0
    st.say(
        f"\nplan {plan.name}: {', '.join(stages)} done in {result.seconds:.0f} s; {result.started} training "
        "run(s) started by this call"
    )
    return result


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
                "frontal images only (the paper pretrains on CheXpert, whose 224k images include laterals, "
                "and does not say it left them out)."
                if pre.frontal_only
                else "every training image, laterals included."
            )
        )
    if plan.phantom is not None:
        lines.append("Data: synthetic phantom radiographs made by the plan, not real images.")
    return PaperNotes(baseline=plan.baseline, moco_start=plan.moco_start, extra=tuple(lines) + tuple(extra))


def paper_reports(
    plan: PaperPlan, checkpoints: dict[str, list[st.Checkpoint]], out: Path, store: mt.Store
) -> dict[str, str]:
    """The report stage: every family whose runs the plan made, {family: report run id}.
    ``checkpoints`` (backbone -> registered trial checkpoints) are Table 2's rows."""
    from mococxr.report import paper

    kw = {"notes": notes(plan), "n_replicates": plan.replicates, "store": store}
    build: dict[str, Any] = {}
    if "chexpert" in plan.grids:
        build["chexpert"] = lambda: paper.chexpert_family(
            plan.experiment("chexpert"), out=out / "chexpert", task=plan.data["chexpert"].task, **kw
        )
    if "shenzhen" in plan.grids:
        build["shenzhen"] = lambda: paper.shenzhen_family(
            plan.experiment("shenzhen"), out=out / "shenzhen", task=plan.data["shenzhen"].task, **kw
        )
    if plan.table2 is not None:
        rows = _table2_rows(checkpoints.get(plan.table2.backbone, []))
        if not rows:
            raise ConfigError(
                f"table2: no registered {plan.table2.backbone} trial checkpoints; run the pretrain stage"
            )
        build["table2"] = lambda: paper.table2_report(
            plan.experiment("table2"), rows, out=out / "table2", **kw
        )
    if "competition" in plan.grids:
        stage = plan.grids["competition"]
        build["competition"] = lambda: paper.competition_family(
            plan.experiment("competition"),
            list(stage.tasks),
            out=out / "competition",
            backbone=stage.backbones[0] if len(stage.backbones) == 1 else None,
            **kw,
        )
    made = _reports_once(plan, build, kw["notes"], checkpoints, store)
    for family, run_id in made.items():
        print(f"report {family}: run {run_id}", flush=True)
    return made


def _reports_once(
    plan: PaperPlan, build: dict[str, Any], notes_, checkpoints, store: mt.Store
) -> dict[str, str]:
    """Build each family's report once among the workers (spread over them), and again only when its
    inputs changed: the finished runs of the plan's experiments, the checkpoints (Table 2), the plan's
    caption facts and settings."""
    from mococxr.sweep.queue import run_each
    from mococxr.tracking.runs import finished_hashes

    runs = sorted(r for family in build for r in finished_hashes(plan.experiment(family)).values())
    versions = sorted(c.version for cs in checkpoints.values() for c in cs)
    key = st.digest([*runs, *versions, repr(notes_), plan.replicates, plan.source, *build])
    works = {family: (lambda make=make: {"run_id": make()}) for family, make in build.items()}
    done = run_each(
        f"{plan.name}.reports.{key}", store.optuna_storage, works, heartbeat=plan.heartbeat, say=st.say
    )
    return {family: done[family]["run_id"] for family in build}


def _table2_rows(checkpoints: list[st.Checkpoint]) -> list:
    from mococxr.report import paper

    return [
        paper.Table2Row(
            label=st.table2_label(c),
            lr=c.lr,
            scheduler=c.scheduler,
            trial=c.trial,
            pretrain_run_id=c.pretrain_run_id,
            registered_model=c.registered_model,
            version=c.version,
            epoch=c.epoch,
            val_objective=c.value,
        )
        for c in checkpoints
    ]


__all__ = ["notes", "paper_reports", "run_paper", "run_plan"]
