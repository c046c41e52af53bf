"""What the pretraining loop passes around: the epoch callback's type and :class:`StopTraining`, the
result a caller gets (:class:`PretrainResult`) and everything one step of the loop needs
(:class:`Training`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mococxr.config import PretrainConfig
from mococxr.data.dataset import CXRDataset
from mococxr.models.moco import MoCo
from mococxr.train.precision import Precision

EpochCallback = Callable[[int, torch.nn.Module, dict[str, float]], dict[str, float] | None]


class StopTraining(Exception):
    """Raised by an epoch callback to end training early (e.g. an Optuna pruner); the run is kept."""


@dataclass
class PretrainResult:
    run_id: str
    history: dict[int, dict[str, float]] = field(default_factory=dict)
    model_ids: dict[int, str] = field(default_factory=dict)
    stopped_early: bool = False


@dataclass
class Training:
    """What every step of the loop needs; built once by :func:`_setup`, passed to the helpers."""

    cfg: PretrainConfig
    model: MoCo  # the bare model: what is checkpointed and handed to callbacks
    net: torch.nn.Module  # what trains: ``model``, or ``model`` wrapped in DDP under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    dataset: CXRDataset
    rank: int
    world: int
    device: torch.device
    init: str  # the resolved init kind (random, imagenet, checkpoint)
    origin: dict[str, Any]  # where a checkpoint init came from (run id, epoch, registry version)
    start_epoch: int = 1
    progress: bool = True
    label: str = ""  # names the run in progress lines: its run name, else backbone and run id
    precision: Precision = field(default_factory=Precision)  # amp and channels_last in effect on ``device``
