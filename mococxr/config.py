"""One config system: frozen dataclasses whose fields carry their type, default and help text.

A config is the complete description of one job; its ``to_dict()`` is what runs log as parameters, and
its hash is what makes grid runs idempotent. Every config is made by :func:`build` - from CLI flags,
a YAML file, a study's ``base`` or a grid's ``base`` alike - which coerces each value to the field's
type and checks it once, naming the key on error. ``__post_init__`` checks the whole object, so
``dataclasses.replace`` (the only way to change a config) validates too. CLI flags are generated from
the fields (:func:`add_flags`), so a field is spelled once, here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mococxr.errors import ConfigError

T = TypeVar("T")

# -- the enums: single sources for every module and the CLI --------------------------------------------
Dataset = Literal["chexpert", "nih", "shenzhen", "montgomery", "tb", "csv"]
Policy = Literal["ignore", "ones", "zeros"]
Backbone = Literal["resnet18", "resnet34", "resnet50", "densenet121"]
Optimizer = Literal["sgd", "adam"]
Scheduler = Literal["cosine", "milestone", "constant"]
Shuffle = Literal["auto", "split_bn", "ddp", "none"]
Preset = Literal["cxr", "mocov2"]
Protocol = Literal["linear", "e2e"]
Head = Literal["standardized", "plain"]
Stage = Literal["staging", "production"]
ResumeState = Literal["until_done", "keep"]

DATASETS: tuple[str, ...] = typing.get_args(Dataset)
POLICIES: tuple[str, ...] = typing.get_args(Policy)
BACKBONES: tuple[str, ...] = typing.get_args(Backbone)
OPTIMIZERS: tuple[str, ...] = typing.get_args(Optimizer)
SCHEDULERS: tuple[str, ...] = typing.get_args(Scheduler)
PRESETS: tuple[str, ...] = typing.get_args(Preset)
PROTOCOLS: tuple[str, ...] = typing.get_args(Protocol)
HEADS: tuple[str, ...] = typing.get_args(Head)
STAGES: tuple[str, ...] = typing.get_args(Stage)


def opt(default: Any, help: str, *, check: str | None = None, flag: bool = True, hash_default: bool = True) -> Any:
    """A config field: its default, the help text its CLI flag shows, and a range ``check``.

    ``check`` is one of ``positive``, ``nonnegative``, ``fraction`` (0 <= x < 1), ``label_fraction``
    (0 < x <= 1), ``keep``. ``flag=False`` keeps a field out of the CLI; ``hash_default=False`` keeps it
    out of :func:`config_hash` while it holds its default (a field added after configs were hashed).
    """
    meta = {"help": help, "check": check, "flag": flag, "hash_default": hash_default}
    if isinstance(default, (list, dict)):
        raise TypeError("mutable defaults are not allowed in a frozen config")
    return field(default=default, metadata=meta)


_KEEP = re.compile(r"^(all|every:[1-9]\d*|best:[1-9]\d*:\S+)$")


def parse_keep(keep: str) -> tuple[str, int, str | None]:
    """``all`` | ``every:K`` | ``best:K:metric`` -> (mode, k, metric)."""
    if not isinstance(keep, str) or not _KEEP.match(keep):
        raise ConfigError(f"keep={keep!r}: use all, every:K (e.g. every:5) or best:K:metric (e.g. best:3:val/auc)")
    parts = keep.split(":", 2)
    if parts[0] == "all":
        return "all", 0, None
    return parts[0], int(parts[1]), (parts[2] if len(parts) == 3 else None)


def _check_range(name: str, value: Any, check: str | None) -> str | None:
    if value is None or check is None:
        return None
    if check == "positive" and not value > 0:
        return "expected a positive number"
    if check == "nonnegative" and not value >= 0:
        return "expected a number >= 0"
    if check == "fraction" and not 0 <= value < 1:
        return "expected a fraction in [0, 1)"
    if check == "label_fraction" and not 0 < value <= 1:
        return "expected a label fraction in (0, 1]"
    if check == "keep":
        try:
            parse_keep(value)
        except ConfigError as exc:
            return str(exc).split(": ", 1)[1]
    return None


class Validated:
    """Checks every field against its annotation and range when an instance is made (or replaced)."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            problem = _type_problem(value, hints[f.name]) or _check_range(f.name, value, f.metadata.get("check"))
            if problem:
                raise ConfigError(f"{f.name}={value!r}: {problem}")
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses override."""


@dataclass(frozen=True)
class DataConfig(Validated):
    """Which images, read how, split how."""

    dataset: Dataset = opt("chexpert", "dataset reader")
    root: str = opt("data/phantom", "dataset root folder")
    csv: str | None = opt(None, "label CSV (default: the dataset's usual file under --root)")
    test_csv: str | None = opt(None, "a CSV whose images form the test set (CheXpert: valid.csv)")
    frontal_only: bool = opt(True, "CheXpert: keep frontal views only")
    task: str = opt("pleural_effusion", "task set (pleural_effusion, competition5, tb, pneumonia, ...) or columns")
    policy: Policy = opt("ignore", "CheXpert uncertainty policy")
    val: float = opt(0.1, "fraction of patients for validation", check="fraction")
    test: float = opt(0.2, "fraction of patients for test (without --test-csv)", check="fraction")
    split_seed: int = opt(0, "seed of the patient-level train/val/test split")
    cache: str | None = opt(None, "folder for the pre-resized uint8 image cache (built on first use)")


@dataclass(frozen=True)
class PretrainConfig(Validated):
    """MoCo v2 pretraining. Defaults follow MoCo-CXR (batch 16, T 0.2, m 0.999, K 65,536, CXR preset)."""

    data: DataConfig = field(default_factory=DataConfig)
    backbone: Backbone = opt("resnet18", "encoder architecture")
    init: str = opt("auto", "auto (imagenet when its weights file is present, else random, said on stderr and in "
                    "tag mococxr.init_fallback) | random | imagenet | checkpoint path | models:/ or runs:/ URI")
    image_size: int = opt(224, "input size in pixels", check="positive")
    batch_size: int = opt(16, "images per step", check="positive")
    epochs: int = opt(20, "pretraining epochs", check="positive")
    optimizer: Optimizer = opt("adam", "optimizer")
    lr: float = opt(1e-4, "learning rate", check="positive")
    weight_decay: float = opt(1e-4, "weight decay", check="nonnegative")
    scheduler: Scheduler = opt("cosine", "learning-rate schedule")
    warmup_epochs: int = opt(0, "linear warm-up epochs", check="nonnegative")
    milestones: tuple[float, ...] = opt((0.6, 0.8), "milestone schedule: fractions of training, e.g. 0.6,0.8")
    moco_dim: int = opt(128, "MoCo projection dimension", check="positive")
    moco_k: int = opt(65536, "queue length K (a multiple of the batch size)", check="positive")
    moco_m: float = opt(0.999, "momentum of the key encoder", check="nonnegative")
    moco_t: float = opt(0.2, "softmax temperature", check="positive")
    mlp: bool = opt(True, "MoCo v2's 2-layer projection head")
    shuffle: Shuffle = opt("auto", "shuffle-BN: auto (ddp under torchrun, else split_bn)")
    preset: Preset = opt("cxr", "augmentation preset")
    workers: int = opt(1, "DataLoader workers (0-1 recommended on CPU)", check="nonnegative")
    seed: int = opt(0, "seed of initialisation, augmentation and shuffling")
    keep: str = opt("all", "checkpoint retention: all | every:K | best:K:metric", check="keep")
    resume_state: ResumeState = opt("until_done", "resume state (~4x the encoder's size): until_done deletes it "
                                    "when the run finishes or is pruned (it can then not be extended with "
                                    "--resume); keep keeps it. Epoch checkpoints are kept either way")
    experiment: str = opt("mococxr-pretrain", "MLflow experiment name")
    run_name: str | None = opt(None, "MLflow run name")
    monitor: bool = opt(False, "log val/linear_auc (fast linear evaluation on --task) after every epoch")

    def validate(self) -> None:
        if self.moco_k % self.batch_size:
            raise ConfigError(
                f"moco_k={self.moco_k} is not a multiple of batch_size={self.batch_size}: the queue must hold "
                f"whole batches; try moco_k={self.moco_k // self.batch_size * self.batch_size or self.batch_size}"
            )


@dataclass(frozen=True)
class FinetuneConfig(Validated):
    """One fine-tune run. Defaults follow MoCo-CXR: Adam, lr 3e-5, batch 16, epochs by label fraction."""

    data: DataConfig = field(default_factory=DataConfig)
    backbone: Backbone = opt("resnet18", "encoder architecture")
    init: str = opt("random", "random | imagenet | auto (imagenet if its weights file is present, else random, said on "
                    "stderr and in tag mococxr.init_fallback) | checkpoint path | models:/NAME@production | runs:/ URI")
    protocol: Protocol = opt("linear", "linear (frozen backbone in eval mode, new head) | e2e (all layers)")
    head: Head = opt("standardized", "linear protocol's head: standardized (parameter-free BatchNorm, then linear) | "
                     "plain (the paper's: linear on the frozen features)", hash_default=False)
    fraction: float = opt(1.0, "label fraction of the train split (0-1]", check="label_fraction")
    draw: int = opt(0, "index of the random label-fraction draw", check="nonnegative")
    seed: int = opt(0, "seed of the draw, initialisation and shuffling")
    epochs: int | None = opt(None, "epochs (default: the label-fraction rule)", check="positive")
    epochs_scale: float = opt(1.0, "multiplies the label-fraction epoch rule", check="positive")
    min_steps: int = opt(0, "at least this many optimizer steps: raises the epochs (--epochs or the label-fraction rule)"
                         " to ceil(min_steps / steps per epoch)", check="nonnegative", hash_default=False)
    lr: float = opt(3e-5, "learning rate", check="positive")
    weight_decay: float = opt(0.0, "weight decay", check="nonnegative")
    batch_size: int = opt(16, "images per step", check="positive")
    image_size: int = opt(224, "input size in pixels", check="positive")
    preset: Preset = opt("cxr", "augmentation preset")
    workers: int = opt(0, "DataLoader workers (0-1 recommended on CPU)", check="nonnegative")
    experiment: str = opt("mococxr-finetune", "MLflow experiment name")
    run_name: str | None = opt(None, "MLflow run name")


# -- building ---------------------------------------------------------------------------------------------
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _options(hint: Any) -> tuple[Any, bool]:
    """(the non-None type of an annotation, whether None is allowed)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def _type_problem(value: Any, hint: Any) -> str | None:
    base, optional = _options(hint)
    if value is None:
        return None if optional else "may not be empty"
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        return None if value in choices else f"expected one of {', '.join(map(str, choices))}"
    if dataclasses.is_dataclass(base):
        return None if isinstance(value, base) else "expected a mapping"
    if base is bool:
        return None if isinstance(value, bool) else "expected true or false"
    if base is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "expected an integer"
    if base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "expected a finite number"
    if typing.get_origin(base) is tuple:
        return None if isinstance(value, tuple) else "expected a list"
    return None if isinstance(value, str) else "expected text"


def coerce(value: Any, hint: Any, where: str) -> Any:
    """A YAML/CLI value as a field's type (``"1e-3"`` -> 1e-3, ``"true"`` -> True, ``"0.6,0.8"`` -> tuple)."""
    base, optional = _options(hint)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        return None
    try:
        if typing.get_origin(base) is Literal:
            choices = typing.get_args(base)
            if str(value) not in choices:
                raise ConfigError(f"{where}={value!r}: expected one of {', '.join(choices)}")
            return str(value)
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return text in ("true", "1", "yes")
        if base is int:
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if not math.isfinite(number) or number != int(number):
                raise ValueError(value)
            return int(number)
        if base is float:
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number
        if typing.get_origin(base) is tuple:
            items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
            return tuple(float(v) for v in items)
        if isinstance(value, (dict, list)):
            raise ValueError(value)
        return str(value)
    except (TypeError, ValueError):
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(base, "a list of numbers"
                                                                                if typing.get_origin(base) is tuple
                                                                                else "text")
        raise ConfigError(f"{where}={value!r}: expected {kind}") from None


def build(cls: type[T], data: Mapping[str, Any] | None = None, *, where: str = "config") -> T:
    """Make config ``cls`` from a (nested) mapping: unknown keys, wrong types and bad values are one
    ``ConfigError`` naming the key (``where.key``). The one way every config is made."""
    data = dict(data or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if isinstance(value, hint):
                kwargs[name] = value
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}.{name}: expected a mapping, got {value!r}")
            kwargs[name] = build(hint, value, where=f"{where}.{name}")
        else:
            kwargs[name] = coerce(value, hint, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc}" if "=" in str(exc).split(":")[0] else f"{where}: {exc}") from None


def override(cfg: T, dotted: Mapping[str, Any], *, where: str = "config") -> T:
    """A copy of ``cfg`` with ``{"lr": "1e-3", "data.root": "x"}`` applied (``None`` values skipped), validated."""
    data = to_dict(cfg)
    for key, value in dotted.items():
        if value is None:
            continue
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"{where}: unknown config key {key!r}")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"{where}: unknown config key {key!r}")
        node[parts[-1]] = value
    return build(type(cfg), data, where=where)


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
    """sha256 of the canonical JSON of a config (key order, formatting, unhashed defaults do not matter)."""
    return hashlib.sha256(json.dumps(_hashed(cfg, to_dict(cfg)), sort_keys=True).encode()).hexdigest()


def _hashed(cfg: Any, data: dict[str, Any]) -> dict[str, Any]:
    """``to_dict(cfg)`` less the ``hash_default=False`` fields at their default: hashed as before they existed."""
    for f in fields(cfg):
        if dataclasses.is_dataclass(value := getattr(cfg, f.name)):
            _hashed(value, data[f.name])
        elif not f.metadata.get("hash_default", True) and value == f.default:
            del data[f.name]
    return data


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


# -- the CLI, generated from the fields --------------------------------------------------------------------
def flag_fields(cls: type, only: tuple[str, ...] | None = None) -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, annotation) of every field that has a flag; nested configs flattened.

    ``only`` selects keys: ``"data.*"`` for every field of ``data``, or exact dotted keys.
    """
    out = []
    hints = _hints(cls)
    for f in fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += [(f"{f.name}.{key}", sub, h) for key, sub, h in flag_fields(hint)]
        elif f.metadata.get("flag", True):
            out.append((f.name, f, hint))
    if only is not None:
        out = [row for row in out if row[0] in only or f"{row[0].split('.')[0]}.*" in only]
    return out


def flag_name(key: str) -> str:
    """The CLI flag of a dotted config key: ``data.split_seed`` -> ``--split-seed``."""
    return "--" + key.rsplit(".", 1)[-1].replace("_", "-")


def add_flags(parser: Any, cls: type, only: tuple[str, ...] | None = None, *, show_defaults: bool = True) -> None:
    """One ``--flag`` per config field (``data.root`` -> ``--root``), help and choices from the field.

    ``show_defaults=False`` where the defaults come from elsewhere (a grid's base)."""
    import argparse

    for key, f, hint in flag_fields(cls, only):
        base, _ = _options(hint)
        flag = flag_name(key)
        kwargs: dict[str, Any] = {"dest": key, "default": None}
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is Literal:
            kwargs["choices"] = typing.get_args(base)
        else:
            kwargs["metavar"] = {int: "N", float: "X"}.get(base, key.rsplit(".", 1)[-1].upper())
        parser.add_argument(flag, help=f"{help_text} (default: {default})" if default is not None and show_defaults else help_text,
                            **kwargs)


def from_flags(cls: type[T], args: Any, *, yaml_path: str | None = None,
               only: tuple[str, ...] | None = None) -> T:
    """The config the command line asks for: the YAML (if any), then every flag that was given."""
    flags: dict[str, Any] = {}
    for key, _, _ in flag_fields(cls, only):
        if (value := getattr(args, key, None)) is not None:
            *path, leaf = key.split(".")
            node = flags
            for p in path:
                node = node.setdefault(p, {})
            node[leaf] = value
    data = _merge(load_yaml(yaml_path), flags) if yaml_path else flags
    try:
        return build(cls, data, where=yaml_path or "flags")
    except ConfigError as exc:  # name a flag's value as the user typed it: --batch-size=0, not flags.batch_size
        raise ConfigError(re.sub(r"^flags\.((?:\w+\.)*\w+)=", lambda m: flag_name(m.group(1)) + "=", str(exc))) from None


def _merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out
