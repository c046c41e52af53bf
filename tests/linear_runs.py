"""What the linear-run tests (test_features, test_linear_lr) share: a small CheXpert-layout phantom config
and a metric's history."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from mococxr.config import DataConfig, FinetuneConfig


def linear_cfg(root: str, experiment: str, **kw) -> FinetuneConfig:
    """A linear run on the phantom at ``root`` (25 % val, 20 % test patients), lr 3e-3, batch 16; ``kw``
    override any field."""
    data = DataConfig(dataset="chexpert", root=root, task="pleural_effusion", val=0.25, test=0.2)
    base = {
        "image_size": 32,
        "batch_size": 16,
        "epochs": 3,
        "lr": 3e-3,
        "protocol": "linear",
        "experiment": experiment,
    }
    return FinetuneConfig(data=data, **{**base, **kw})


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of metric ``key`` of run ``run_id``, by step."""
    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))


def curve(run_id: str, lr: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``key`` for the linear lr candidate ``lr`` (as ``:g``) of a ``select`` run."""
    from mlflow.artifacts import load_dict

    from mococxr.train.linear_lr import CURVES

    rows = load_dict(f"{MlflowClient().get_run(run_id).info.artifact_uri}/{CURVES}")[lr]
    return sorted((row["step"], row[key]) for row in rows if key in row)
