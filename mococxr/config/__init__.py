"""One config system: frozen dataclasses whose fields carry their type, default and help text.

A config is the complete description of one job; its ``to_dict()`` is what runs log as parameters, and
its hash is what makes grid runs idempotent. Every config is made by :func:`build` - from CLI flags,
a YAML file, a study's ``base`` or a grid's ``base`` alike - which coerces each value to the field's
type and checks it once, naming the key on error. ``__post_init__`` checks the whole object, so
``dataclasses.replace`` (the only way to change a config) validates too. CLI flags are generated from
the fields (:func:`add_flags`), so a field is spelled once, here. The machinery is in ``schema.py``
(building, checking, hashing) and ``flags.py`` (the CLI); this module holds the configs themselves.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Literal

from mococxr.config.flags import add_flags, flag_fields, flag_name, from_flags
from mococxr.config.schema import (
    Validated,
    build,
    coerce,
    config_hash,
    flat_params,
    load_yaml,
    opt,
    override,
    parse_keep,
    to_dict,
)
from mococxr.errors import ConfigError

# -- the enums: single sources for every module and the CLI --------------------------------------------
Dataset = Literal["chexpert", "nih", "shenzhen", "montgomery", "tb", "csv"]
Policy = Literal["ignore", "ones", "zeros"]
Backbone = Literal["resnet18", "resnet34", "resnet50", "densenet121"]
Optimizer = Literal["sgd", "adam"]
Scheduler = Literal["cosine", "milestone", "constant"]
Shuffle = Literal["auto", "split_bn", "ddp", "none"]
Preset = Literal["cxr", "mocov2", "none"]
Protocol = Literal["linear", "e2e"]
Head = Literal["standardized", "plain"]
Alias = Literal["staging", "production"]  # a registered model's aliases (a plan's steps are stages)
ResumeState = Literal["until_done", "keep"]
Amp = Literal["off", "bf16", "fp16"]
LinearLr = Literal["paper", "select"]
EpochsRule = Literal["fraction", "size"]
KeepModel = Literal["none", "e2e", "all"]  # which fine-tune runs log their trained model

DATASETS: tuple[str, ...] = typing.get_args(Dataset)
POLICIES: tuple[str, ...] = typing.get_args(Policy)
BACKBONES: tuple[str, ...] = typing.get_args(Backbone)
OPTIMIZERS: tuple[str, ...] = typing.get_args(Optimizer)
SCHEDULERS: tuple[str, ...] = typing.get_args(Scheduler)
PRESETS: tuple[str, ...] = typing.get_args(Preset)
PROTOCOLS: tuple[str, ...] = typing.get_args(Protocol)
HEADS: tuple[str, ...] = typing.get_args(Head)
ALIASES: tuple[str, ...] = typing.get_args(Alias)
AMPS: tuple[str, ...] = typing.get_args(Amp)
LINEAR_LRS: tuple[str, ...] = typing.get_args(LinearLr)
KEEP_MODELS: tuple[str, ...] = typing.get_args(KeepModel)
EPOCHS_RULES: tuple[str, ...] = typing.get_args(EpochsRule)


@dataclass(frozen=True)
class DataConfig(Validated):
    """Which images, read how, split how."""

    dataset: Dataset = opt("chexpert", "dataset reader")
    root: str = opt("data/phantom", "dataset root folder")
    csv: str | None = opt(None, "label CSV (default: the dataset's usual file under --root)")
    test_csv: str | None = opt(None, "a CSV whose images form the test set (CheXpert: valid.csv)")
    frontal_only: bool = opt(True, "CheXpert: keep frontal views only")
    task: str = opt(
        "pleural_effusion", "task set (pleural_effusion, competition5, tb, pneumonia, ...) or columns"
    )
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
    init: str = opt(
        "auto",
        "auto (imagenet when its weights file is present, else random, said on stderr and in "
        "tag mococxr.init_fallback) | random | imagenet | checkpoint path | models:/ or runs:/ URI",
    )
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
    preset: Preset = opt("cxr", "augmentation preset (MoCo needs one: cxr or mocov2)")
    amp: Amp = opt(
        "off",
        "mixed precision on CUDA: bf16 | fp16 autocast (fp16 with a gradient scaler); off on CPU, "
        "where it is ignored",
        hash_default=False,
    )
    channels_last: bool = opt(
        True,
        "channels_last memory format (6-20 %% faster ResNet18 steps on CPU, and with amp on CUDA)",
        hash_default=False,
    )
    workers: int = opt(1, "DataLoader workers (0-1 recommended on CPU)", check="nonnegative")
    seed: int = opt(0, "seed of initialisation, augmentation and shuffling")
    keep: str = opt("all", "checkpoint retention: all | every:K | best:K:metric", check="keep")
    resume_state: ResumeState = opt(
        "until_done",
        "resume state (~4x the encoder's size): until_done deletes it "
        "when the run finishes or is pruned (it can then not be extended with "
        "--resume); keep keeps it. Epoch checkpoints are kept either way",
    )
    experiment: str = opt("mococxr-pretrain", "MLflow experiment name")
    run_name: str | None = opt(None, "MLflow run name")
    monitor: bool = opt(False, "log val/linear_auc (fast linear evaluation on --task) after every epoch")

    def validate(self) -> None:
        if self.moco_k % self.batch_size:
            raise ConfigError(
                f"moco_k={self.moco_k} is not a multiple of batch_size={self.batch_size}: the queue must "
                "hold whole batches; try "
                f"moco_k={self.moco_k // self.batch_size * self.batch_size or self.batch_size}"
            )
        if self.preset == "none":
            raise ConfigError(
                "preset='none': MoCo learns from two augmented views of an image; use cxr or mocov2"
            )


@dataclass(frozen=True)
class FinetuneConfig(Validated):
    """One fine-tune run. Defaults follow MoCo-CXR: Adam, lr 3e-5, batch 16, epochs by label fraction."""

    data: DataConfig = field(default_factory=DataConfig)
    backbone: Backbone = opt("resnet18", "encoder architecture")
    init: str = opt(
        "random",
        "random | imagenet | auto (imagenet if its weights file is present, else random, said on "
        "stderr and in tag mococxr.init_fallback) | checkpoint path | models:/NAME@production | runs:/ URI",
    )
    protocol: Protocol = opt("linear", "linear (frozen backbone in eval mode, new head) | e2e (all layers)")
    head: Head = opt(
        "standardized",
        "linear protocol's head: standardized (parameter-free BatchNorm, then linear) | "
        "plain (the paper's: linear on the frozen features)",
        hash_default=False,
    )
    fraction: float = opt(1.0, "label fraction of the train split (0-1]", check="label_fraction")
    draw: int = opt(0, "index of the random label-fraction draw", check="nonnegative")
    seed: int = opt(0, "seed of the draw, initialisation and shuffling")
    epochs: int | None = opt(None, "epochs (default: the label-fraction rule)", check="positive")
    epochs_rule: EpochsRule = opt(
        "fraction",
        "epochs without --epochs: fraction (MoCo-CXR's CheXpert epochs by label "
        "fraction) | size (the same schedule keyed to the number of labelled training "
        "images, so a small dataset trains as long as CheXpert at that many labels)",
        hash_default=False,
    )
    epochs_scale: float = opt(1.0, "multiplies the epoch rule (fraction or size)", check="positive")
    min_steps: int = opt(
        0,
        "at least this many optimizer steps: raises the epochs (--epochs or the label-fraction rule)"
        " to ceil(min_steps / steps per epoch)",
        check="nonnegative",
        hash_default=False,
    )
    lr: float = opt(3e-5, "learning rate", check="positive")
    linear_lr: LinearLr = opt(
        "paper",
        "linear protocol's learning rate: paper (the head trains once at --lr) | "
        "select (the head trains at each of --linear-lrs from one initialisation, the best "
        "validation AUC is kept and only it is scored on test); ignored by e2e",
        hash_default=False,
    )
    linear_lrs: tuple[float, ...] = opt(
        (3e-5, 1e-4, 1e-3),
        "the learning rates linear_lr select tries, e.g. 3e-5,1e-4,1e-3 (the paper's 3e-5 among them)",
        hash_default=False,
    )
    weight_decay: float = opt(0.0, "weight decay", check="nonnegative")
    batch_size: int = opt(16, "images per step", check="positive")
    image_size: int = opt(224, "input size in pixels", check="positive")
    preset: Preset = opt(
        "cxr",
        "fine-tune augmentation preset: cxr (rotation + flip) | mocov2 | none (the eval "
        "resize only; a linear run then trains its head on cached features)",
    )
    amp: Amp = opt(
        "off",
        "mixed precision on CUDA: bf16 | fp16 autocast (fp16 with a gradient scaler); off on CPU, "
        "where it is ignored",
        hash_default=False,
    )
    channels_last: bool = opt(
        False, "channels_last memory format (faster convolutions on CUDA with amp)", hash_default=False
    )
    val_every: int = opt(
        1,
        "validate every K epochs (and always after the last); the best epoch is the best of "
        "the validated ones",
        check="positive",
        hash_default=False,
    )
    feature_cache: bool = opt(
        True,
        "linear protocol: compute the frozen encoder's val/test features (and, with "
        "preset none, its training features) once per checkpoint and image set and reuse them "
        "in every epoch and run; false recomputes them every epoch",
        hash=False,
    )
    workers: int = opt(0, "DataLoader workers (0-1 recommended on CPU)", check="nonnegative")
    # Default e2e: an end-to-end run's weights are the only copy of what it learned, while a linear run's
    # head is one small layer over a checkpoint the store already holds, refit from cached features in
    # seconds; keeping it would store the whole frozen encoder again. Not hashed: it changes what a run
    # keeps, not its result, so grid cells stay the same cells.
    keep_model: KeepModel = opt(
        "e2e",
        "log the trained model (encoder and head at the chosen epoch) as a LoggedModel, an output of the "
        "run with its test metrics: e2e (end-to-end runs only) | all | none. Measured disk per kept "
        "model: 44.8 MB for resnet18, 28.4 MB for densenet121",
        hash=False,
    )
    experiment: str = opt("mococxr-finetune", "MLflow experiment name")
    run_name: str | None = opt(None, "MLflow run name")

    def validate(self) -> None:
        if not self.linear_lrs:
            raise ConfigError("linear_lrs is empty: linear_lr select needs at least one learning rate")
        bad = [
            lr
            for lr in self.linear_lrs
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0)
        ]
        if bad:
            raise ConfigError(
                f"linear_lrs={self.linear_lrs!r}: every learning rate must be positive, not {bad}"
            )
        if len(set(self.linear_lrs)) < len(self.linear_lrs):
            raise ConfigError(f"linear_lrs={self.linear_lrs!r}: a learning rate is listed twice")


__all__ = [
    "ALIASES",
    "BACKBONES",
    "DATASETS",
    "EPOCHS_RULES",
    "HEADS",
    "KEEP_MODELS",
    "LINEAR_LRS",
    "OPTIMIZERS",
    "POLICIES",
    "PRESETS",
    "PROTOCOLS",
    "SCHEDULERS",
    "DataConfig",
    "FinetuneConfig",
    "PretrainConfig",
    "Validated",
    "add_flags",
    "build",
    "coerce",
    "config_hash",
    "flag_fields",
    "flag_name",
    "flat_params",
    "from_flags",
    "load_yaml",
    "opt",
    "override",
    "parse_keep",
    "to_dict",
]
