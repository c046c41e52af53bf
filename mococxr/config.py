"""Typed configs: plain dataclasses, loaded from sweeps/*.yaml and overridable on the command line.

A config is the complete description of one job; its ``to_dict()`` is what runs log as parameters, and
its hash is what makes grid runs idempotent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mococxr.errors import ConfigError

T = TypeVar("T")


@dataclass
class DataConfig:
    """Which images, read how. ``dataset`` is a reader name (chexpert, nih, shenzhen, montgomery, csv)."""

    dataset: str = "chexpert"
    root: str = "data/phantom"
    csv: str | None = None
    test_csv: str | None = None  # e.g. CheXpert's valid.csv as the test set
    frontal_only: bool = True
    task: str = "pleural_effusion"
    policy: str = "ignore"  # CheXpert uncertainty policy: ignore | ones | zeros
    val: float = 0.1  # patient-level split fractions when the dataset has no official test set
    test: float = 0.2
    split_seed: int = 0
    cache: str | None = None  # folder of a pre-resized uint8 cache; built on first use


@dataclass
class PretrainConfig:
    """MoCo v2 pretraining. Defaults follow MoCo-CXR (batch 16, T 0.2, m 0.999, K 65,536, CXR preset)."""

    data: DataConfig = field(default_factory=DataConfig)
    backbone: str = "resnet18"
    init: str = "auto"  # auto (imagenet when the weights file is present, else random) | random | imagenet | path | URI
    image_size: int = 224
    batch_size: int = 16
    epochs: int = 20
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    scheduler: str = "cosine"
    warmup_epochs: int = 0
    milestones: tuple[float, ...] = (0.6, 0.8)
    moco_dim: int = 128
    moco_k: int = 65536
    moco_m: float = 0.999
    moco_t: float = 0.2
    mlp: bool = True
    shuffle: str = "auto"  # auto | split_bn | ddp | none
    preset: str = "cxr"
    workers: int = 1
    seed: int = 0
    keep: str = "all"  # checkpoint retention: all | every:K | best:K:metric
    experiment: str = "mococxr-pretrain"
    run_name: str | None = None
    monitor: bool = False  # fast linear-eval AUC on the labeled val split after each epoch


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON-able data (nested dataclasses become dicts, tuples lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def flat_params(cfg: Any) -> dict[str, str]:
    """``{"data.root": ..., "lr": ...}``: what runs log as MLflow parameters."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = str(value)

    walk("", to_dict(cfg))
    return out


def config_hash(cfg: Any) -> str:
    """sha256 of the canonical JSON of a config (key order and formatting do not matter)."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()


def from_dict(cls: type[T], data: dict[str, Any] | None, *, where: str = "config") -> T:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys and wrong types with a clear message."""
    data = dict(data or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for name, value in data.items():
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{name}: expected a mapping, got {value!r}")
            kwargs[name] = from_dict(type(default), value, where=f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, default, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(value: Any, default: Any, where: str) -> Any:
    if value is None or default is None:
        return value
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(type(default[0])(v) if default else v for v in items)
        if isinstance(default, (int, float)):
            out = type(default)(float(value) if isinstance(default, float) else value)
            return out
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {type(default).__name__}, got {value!r}") from None


def override(cfg: T, dotted: dict[str, Any]) -> T:
    """Apply ``{"lr": "1e-3", "data.root": "x"}`` overrides (CLI flags) to a config, validated."""
    data = to_dict(cfg)
    for key, value in dotted.items():
        if value is None:
            continue
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                raise ConfigError(f"unknown config key {key!r}")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key {key!r}")
        node[parts[-1]] = value
    return from_dict(type(cfg), data)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a clear error for a missing file or bad syntax."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return data


@dataclass
class FinetuneConfig:
    """One fine-tune run. Defaults follow MoCo-CXR: Adam, lr 3e-5, batch 16, epochs by label fraction."""

    data: DataConfig = field(default_factory=DataConfig)
    backbone: str = "resnet18"
    init: str = "random"  # random | imagenet | checkpoint path | models:/ or runs:/ URI
    protocol: str = "linear"  # linear (frozen backbone in eval mode, new head) | e2e (all layers)
    fraction: float = 1.0
    draw: int = 0
    seed: int = 0
    epochs: int | None = None  # None: the label-fraction rule (finetune.epochs_for_fraction)
    epochs_scale: float = 1.0  # multiplies the rule's epochs (small demos)
    lr: float = 3e-5
    weight_decay: float = 0.0
    batch_size: int = 16
    image_size: int = 224
    preset: str = "cxr"
    workers: int = 0
    experiment: str = "mococxr-finetune"
    run_name: str | None = None
