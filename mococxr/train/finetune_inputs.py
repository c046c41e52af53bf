"""What a fine-tune run's model reads: the shuffled training batches (images, or a frozen encoder's
cached features) and the scoring of val or test images (:func:`model_inputs`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mococxr.config import FinetuneConfig
from mococxr.data.dataset import CXRDataset
from mococxr.data.transforms import build_transform
from mococxr.train.features import FeatureCache, cache_root
from mococxr.train.head import Classifier
from mococxr.train.precision import Precision


@torch.no_grad()
def predict(
    model: nn.Module,
    records: pd.DataFrame,
    cfg: FinetuneConfig,
    cache,
    device,
    precision: Precision | None = None,
) -> np.ndarray:
    """Probabilities for ``records`` (eval transform, batches of 64), under ``precision``'s autocast if
    any."""
    precision = precision or Precision()
    model.eval()
    # its own generator: scoring never draws from the global RNG that training's augmentation uses, so
    # the validation cadence (or cached features, which need no loader) cannot change a run's training
    loader = DataLoader(
        CXRDataset(records, build_transform("eval", cfg.image_size), cache=cache),
        batch_size=64,
        shuffle=False,
        num_workers=cfg.workers,
        generator=torch.Generator(),
    )
    out = []
    for x, _ in loader:
        with precision.autocast():
            out.append(torch.sigmoid(model(precision.batch(x, device)).float()).cpu())
    return torch.cat(out).numpy().astype(np.float64)


@torch.no_grad()
def predict_features(model: Classifier, feats: np.ndarray, device, chunk: int = 4096) -> np.ndarray:
    """:func:`predict` from a frozen encoder's cached features: the head alone, in eval mode."""
    model.eval()
    out = [
        torch.sigmoid(model(torch.from_numpy(np.array(feats[i : i + chunk])).to(device)).float()).cpu()
        for i in range(0, len(feats), chunk)
    ]
    return torch.cat(out).numpy().astype(np.float64)


@dataclass
class Inputs:
    """What a run's model reads: ``train`` batches (images, or cached features with preset none) and
    ``score(records)``, the probabilities of val or test images; ``features`` is the cache, if used."""

    train: DataLoader
    score: Callable[[pd.DataFrame], np.ndarray]
    features: FeatureCache | None = None


def model_inputs(
    cfg: FinetuneConfig,
    model: Classifier,
    train: pd.DataFrame,
    tasks: list[str],
    cache,
    device,
    precision: Precision | None = None,
) -> Inputs:
    """Images through the encoder (end-to-end, or ``feature_cache: false``), or for a linear run the frozen
    encoder's features computed once per image set (train too when there is no augmentation)."""
    if cfg.protocol != "linear" or not cfg.feature_cache:
        return Inputs(
            train_loader(cfg, train, tasks, cache),
            lambda records: predict(model, records, cfg, cache, device, precision),
        )
    features = FeatureCache(
        model.encoder,
        cfg.image_size,
        cache_root(cfg.data.cache),
        images=cache,
        workers=cfg.workers,
        device=device,
    )
    loader = (
        feature_loader(cfg, features.features(train), train, tasks)
        if cfg.preset == "none"
        else train_loader(cfg, train, tasks, cache)
    )
    return Inputs(
        loader, lambda records: predict_features(model, features.features(records), device), features
    )


def feature_loader(
    cfg: FinetuneConfig, feats: np.ndarray, train: pd.DataFrame, tasks: list[str]
) -> DataLoader:
    """:func:`train_loader` over cached features: the same targets, batches, shuffling order and dropped
    last batch, so head-only training sees exactly the batches the image loader would."""
    targets = CXRDataset(train, build_transform("none", cfg.image_size), tasks=tasks).targets
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + cfg.draw)
    return DataLoader(
        TensorDataset(torch.from_numpy(np.array(feats)), targets),
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=generator,
        drop_last=len(train) > cfg.batch_size,
    )


def train_loader(cfg: FinetuneConfig, train: pd.DataFrame, tasks: list[str], cache) -> DataLoader:
    """Shuffled, augmented training batches (seeded by seed and draw); the last partial batch is dropped
    unless the whole draw fits in one batch, so ``len()`` is the optimizer steps of one epoch."""
    train_set = CXRDataset(train, build_transform(cfg.preset, cfg.image_size), tasks=tasks, cache=cache)
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + cfg.draw)
    return DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=cfg.workers,
        drop_last=len(train_set) > cfg.batch_size,
    )
