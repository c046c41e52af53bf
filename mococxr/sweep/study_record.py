"""A study's MLflow parent run: made once, then kept current with the study's counts and best trial."""

from __future__ import annotations

import time
from collections.abc import Mapping

import mlflow
import optuna
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from mococxr.config import flat_params
from mococxr.sweep.spec import StudySpec
from mococxr.sweep.storage import study_budget
from mococxr.tracking import artifacts as ma
from mococxr.tracking import mlflow as mt
from mococxr.tracking import runs

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def create_parent(spec: StudySpec, study_name: str) -> str:
    """Create the study's parent run (once: by the worker whose ``create_study`` made the study)."""
    base = spec.base
    parent = runs.create_parent(
        spec.experiment,
        run_name=study_name,
        tags={
            **mt.tags(
                kind="sweep",
                optuna_study=study_name,
                backbone=base.backbone,
                dataset=base.data.dataset,
                task=base.data.task,
            ),
            mt.NOTE_TAG: describe_study(spec, study_name),
        },
    )
    params = {f"search.{k}": p.describe() for k, p in spec.search_space.items()}
    params.update({f"base.{k}": v for k, v in flat_params(base).items() if k not in ("epochs", "keep")})
    params.update(
        {
            "objective": spec.metric,
            "direction": spec.direction,
            "epochs_per_trial": spec.epochs,
            "sampler": spec.sampler.name,
            "pruner": spec.pruner.name,
            "seed": spec.sampler.seed,
        }
    )
    MlflowClient().log_batch(
        parent, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()]
    )
    ma.log_json(spec.to_dict(), "sweep.json", run_id=parent)
    return parent


def record_study(
    study: optuna.Study, parent_run_id: str, metric: str, spec: StudySpec | None = None
) -> FrozenTrial | None:
    """Write the study's counts and best trial (run, epoch, score) on the parent run; returns the best.

    The best checkpoint is named with the same tags a fine-tune run uses for its init:
    ``mococxr.pretrain_run_id`` and ``mococxr.checkpoint_epoch``; ``mococxr.optuna_trial`` is its number.
    With ``spec``, the parent's description (``mlflow.note.content``) is rewritten with the same summary.
    """
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state == s for t in trials) for s in (*FINISHED, TrialState.FAIL)}
    step = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
    now = int(time.time() * 1000)
    metrics = [Metric(f"sweep/n_{s.name.lower()}", counts[s], now, step) for s in counts]
    tags: list[RunTag] = []
    best = _best_trial(study)
    if best is not None:
        metrics += [
            Metric(metric, best.value, now, step),
            Metric("sweep/best_trial", best.number, now, step),
            Metric("sweep/best_epoch", best.user_attrs.get("best_epoch", -1), now, step),
        ]
        tags = [
            RunTag(mt.tag("pretrain_run_id"), str(best.user_attrs.get("mlflow_run_id", ""))),
            RunTag(mt.tag("checkpoint_epoch"), str(best.user_attrs.get("best_epoch", ""))),
            RunTag(mt.tag("optuna_trial"), str(best.number)),
        ]
    if spec is not None:
        tags.append(RunTag(mt.NOTE_TAG, describe_study(spec, study.study_name, counts, best)))
    MlflowClient().log_batch(parent_run_id, metrics=metrics, tags=tags)
    return best


def describe_study(
    spec: StudySpec,
    study_name: str,
    counts: Mapping[TrialState, int] | None = None,
    best: FrozenTrial | None = None,
) -> str:
    """The study parent's description: what is searched, for what, how far it got, how to re-run or join."""
    space = ", ".join(f"{k} {p.describe()}" for k, p in spec.search_space.items())
    text = (
        f"Optuna study **{study_name}** over MoCo v2 pretraining ({spec.source}): {spec.sampler.name} "
        f"sampler, {spec.pruner.name} pruner, budget {study_budget(spec)} trials of {spec.epochs} epochs, "
        f"{spec.direction} {spec.metric}; search space: {space}."
    )
    if counts is not None:
        text += (
            f" So far {counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
            f"{counts[TrialState.FAIL]} failed trials."
        )
    if best is not None:
        epoch = best.user_attrs.get("best_epoch")
        text += f" Best: trial {best.number}, {spec.metric} {best.value:.4f} at epoch {epoch}."
    # a spec read from a YAML file can be run again as is; one made in code (the demo) by its command
    again = (
        f"`mococxr sweep {spec.source}`"
        if spec.source.endswith((".yaml", ".yml"))
        else "the command that started it"
    )
    return text + (
        f"\n\nRe-run or join it (another worker, same storage): {again}; finished trials are never repeated."
    )


def _best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
    return max(complete, key=lambda t: (sign * t.value, -t.number))


__all__ = ["create_parent", "describe_study", "record_study"]
