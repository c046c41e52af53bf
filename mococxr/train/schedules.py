"""Learning-rate schedules, stepped once per optimizer step so short runs still see the whole curve.

``cosine`` (MoCo v2) and ``milestone`` (MoCo v1 and the MoCo-CXR code: x0.1 at 60 % and 80 % of training
unless milestones are given), each with an optional linear warmup. Built on ``LambdaLR`` so the
scheduler's state dict round-trips through a resume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mococxr.config import Optimizer, Scheduler


def lr_factor(
    step: int,
    total_steps: int,
    *,
    name: Scheduler = "cosine",
    warmup_steps: int = 0,
    milestones: Sequence[float] = (0.6, 0.8),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``.

    ``milestones`` are fractions of training (0.6 = 60 % of the steps). ``name`` is one of
    ``config.SCHEDULERS``, which the config has already checked.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return gamma ** sum(progress >= m for m in milestones)  # milestone


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: Scheduler,
    total_steps: int,
    warmup_steps: int = 0,
    milestones: Sequence[float] = (0.6, 0.8),
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, total_steps, name=name, warmup_steps=warmup_steps, milestones=milestones),
    )


def build_optimizer(params, *, name: Optimizer, lr: float, weight_decay: float = 1e-4, momentum: float = 0.9):
    """SGD (momentum 0.9, wd 1e-4, as MoCo v2) or Adam (what the MoCo-CXR code ran); ``name`` and ``lr``
    were checked by the config."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
