"""What a paper family is told beside its runs: the caption notes every item must carry
(:class:`PaperNotes`) and the MoCo pretraining trials of Table 2 (:class:`Table2Row`)."""

from __future__ import annotations

from dataclasses import dataclass

from mococxr.errors import ConfigError


@dataclass(frozen=True)
class PaperNotes:
    """What every caption must say beside the runs' own facts."""

    baseline: str  # grid label of the baseline init: "imagenet" or "random"
    moco_start: str  # what MoCo pretraining started from: "imagenet" or "random"
    extra: tuple[str, ...] = ()  # further protocol lines from the plan

    def __post_init__(self):
        for name in ("baseline", "moco_start"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(
                    f"PaperNotes.{name} must name an init (e.g. 'imagenet' or 'random'), "
                    f"got {getattr(self, name)!r}"
                )


@dataclass(frozen=True)
class Table2Row:
    """One MoCo pretraining trial of Table 2 and the init label its fine-tune runs carry."""

    label: str  # the init label of this row's fine-tune run(s) in the table-2 experiment
    lr: float  # pretraining learning rate of the trial
    scheduler: str
    trial: int  # Optuna trial number
    pretrain_run_id: str  # the trial's MLflow pretraining run
    registered_model: str
    version: str
    epoch: int  # the checkpoint epoch
    val_objective: float | None = (
        None  # the trial's validation objective (val/linear_auc of its selected epoch)
    )
