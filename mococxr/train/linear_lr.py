"""The linear head's learning rate, per arm: the paper's single lr, or the best of several on validation.

``linear_lr: paper`` trains the head once at ``lr`` (3e-5, the paper's), exactly as a run without the
field. ``linear_lr: select`` trains it once per learning rate of ``linear_lrs``, each from the same
start: the head's (and its standardising BatchNorm's) initial state, the global RNG and the train
loader's shuffling generator are restored before every candidate, so a candidate is bit for bit the
``paper`` run at its lr. The frozen encoder's features are cached (``train/features.py``), so a
further candidate costs head steps only (with ``preset: none``, not one encoder forward). The candidate
with the best validation AUC (at its best validated epoch; the first listed on a tie) is kept; the
test set is scored afterwards, once, for it alone. End-to-end runs ignore the field: they train all
layers at ``lr``.

What a run logs (the report reads these names): param ``linear_lr_chosen`` on every linear run; for
``select``, metrics ``lr_select/val_auc/<lr>`` and ``lr_select/best_epoch/<lr>`` per candidate (lr
as ``:g``, e.g. ``3e-05``) and every candidate's per-epoch curves in one artifact, :data:`CURVES`
(``{"<lr>": [{"step": 1, "train/loss": ..., "val/auc": ...}, ...]}``); the standard curves
(``train/loss``, ``val/auc``, ...) are the chosen candidate's, logged after the choice. The candidates'
curves were metrics ``lr_select/<lr>/<metric>`` before: some 30 metric keys per run that crowded the
MLflow runs table's columns (116 in a paper experiment) and that nothing but a reader of one run looks at.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import mlflow
import pandas as pd
import torch
from torch import nn

from mococxr.config import FinetuneConfig
from mococxr.tracking import artifacts as ma

CURVES = "lr_select/curves.json"  # every candidate's per-epoch curves (see the module docstring)
# finetune._fit: (model, cfg, inputs, val, tasks, *, log=..., **kw) -> (best epoch, its val AUC)
Fit = Callable[..., tuple[int, float]]


@dataclass(frozen=True)
class Candidate:
    lr: float
    best_epoch: int
    val_auc: float


@dataclass
class Choice:
    """What trained: the learning rate kept, its best validated epoch and val AUC, and (``select``) every
    candidate tried. ``rule`` is ``paper`` or ``select`` for a linear run, empty for end-to-end."""

    lr: float
    best_epoch: int
    best_auc: float
    rule: str = ""
    candidates: list[Candidate] = field(default_factory=list)

    def params(self) -> dict[str, float]:
        return {"linear_lr_chosen": self.lr} if self.rule else {}

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in self.candidates:
            out[f"lr_select/val_auc/{c.lr:g}"] = c.val_auc
            out[f"lr_select/best_epoch/{c.lr:g}"] = c.best_epoch
        return out

    def describe(self) -> str:
        """The run note's line on the choice (empty unless ``select``)."""
        if self.rule != "select":
            return ""
        tried = "; ".join(
            f"{c.lr:g}: validation AUC {c.val_auc:.4f} (epoch {c.best_epoch})" for c in self.candidates
        )
        return (
            f"\n\n**Linear learning rate chosen on validation: {self.lr:g}** (best validation AUC of "
            f"{tried}). The test set was scored once, for {self.lr:g} only."
        )


def train_arm(
    fit: Fit, model: nn.Module, cfg: FinetuneConfig, inputs, val: pd.DataFrame, tasks: list[str], **kw
) -> Choice:
    """Train ``model`` per ``cfg`` (``kw`` go to ``fit``) and leave it at the chosen lr's best epoch."""
    if cfg.protocol != "linear" or cfg.linear_lr == "paper":
        best_epoch, best_auc = fit(model, cfg, inputs, val, tasks, **kw)
        return Choice(cfg.lr, best_epoch, best_auc, "paper" if cfg.protocol == "linear" else "")
    return select_lr(fit, model, cfg, inputs, val, tasks, **kw)


def select_lr(
    fit: Fit, model: nn.Module, cfg: FinetuneConfig, inputs, val: pd.DataFrame, tasks: list[str], **kw
) -> Choice:
    """One candidate per lr of ``cfg.linear_lrs``, each from the same start; the best on validation kept."""
    start = _Start.capture(model, inputs.train)
    candidates: list[Candidate] = []
    best: tuple[Candidate, dict, list] | None = None
    curves: dict[str, list[dict[str, float]]] = {}
    for lr in cfg.linear_lrs:
        start.restore(model, inputs.train)
        history: list[tuple[int, dict[str, float]]] = []
        epoch, auc = fit(model, replace(cfg, lr=lr), inputs, val, tasks, log=_candidate_log(history), **kw)
        curves[f"{lr:g}"] = [{"step": step, **metrics} for step, metrics in history]
        candidates.append(Candidate(lr, epoch, auc))
        if best is None or auc > best[0].val_auc:  # a tie keeps the first listed
            best = candidates[-1], _head_state(model), history
    chosen, state, history = best
    for name, part in state.items():
        getattr(model, name).load_state_dict(part)
    for step, metrics in history:  # the standard curves are the chosen run's
        mlflow.log_metrics(metrics, step=step)
    ma.log_json(curves, CURVES)
    return Choice(chosen.lr, chosen.best_epoch, chosen.val_auc, "select", candidates)


def _candidate_log(history: list) -> Callable[[dict[str, float], int], None]:
    def log(metrics: dict[str, float], step: int) -> None:
        history.append((step, dict(metrics)))

    return log


def _head_state(model: nn.Module) -> dict[str, dict]:
    """What a linear run trains: the head and the standardising norm's running statistics."""
    return {name: copy.deepcopy(getattr(model, name).state_dict()) for name in ("head", "norm")}


@dataclass
class _Start:
    """Everything a candidate's training depends on besides its lr, as it was before the first one."""

    head: dict
    rng: torch.Tensor
    cuda: list | None
    loader: torch.Tensor | None

    @classmethod
    def capture(cls, model: nn.Module, loader) -> _Start:
        generator = getattr(loader, "generator", None)
        return cls(
            _head_state(model),
            torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            generator.get_state() if generator is not None else None,
        )

    def restore(self, model: nn.Module, loader) -> None:
        for name, part in self.head.items():
            getattr(model, name).load_state_dict(part)
        torch.set_rng_state(self.rng)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        if self.loader is not None:
            loader.generator.set_state(self.loader)
