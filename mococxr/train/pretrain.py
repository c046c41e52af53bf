"""MoCo v2 pretraining: one training loop a reader can hold in their head.

Every epoch logs loss, pretext top-1 accuracy, learning rate, images/s and seconds to one MLflow run,
the query encoder as a LoggedModel, and the full training state as the resume point. Interrupted runs
continue with ``--resume RUN_ID`` in the same run and reach the same weights (on CPU) as an
uninterrupted run: each epoch reseeds every random source from (seed, epoch), so nothing depends on
how many epochs ran in this process. A damaged resume point stops the resume and changes nothing
(``--resume-from EPOCH`` continues from an intact earlier one); by default the resume point is deleted
once the run has finished or was pruned (``resume_state``), its epoch checkpoints never.

Under ``torchrun`` the loop runs DDP (gloo on CPU, nccl on CUDA, see ``distributed.py``) with FAIR's
cross-process shuffle-BN; only rank 0 talks to MLflow. ``cfg.amp`` (bf16/fp16 autocast) and
``cfg.channels_last`` take effect as ``precision.py`` rules (amp on CUDA only); the run's
``amp_effective`` and ``channels_last_effective`` params say what was in effect.

The loop's pieces: its state and result (``pretrain_state.py``), the MLflow run (``pretrain_run.py``)
and one epoch (``pretrain_epoch.py``); this module builds the model and runs them.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from mococxr.config import PretrainConfig
from mococxr.data.dataset import CXRDataset
from mococxr.data.prepare import Prepared, open_cache, prepare
from mococxr.data.transforms import TwoCrops, build_transform
from mococxr.errors import ConfigError
from mococxr.models.backbones import build_encoder
from mococxr.models.moco import MoCo
from mococxr.tracking import mlflow as mt
from mococxr.train import checkpoints
from mococxr.train.distributed import from_rank0
from mococxr.train.distributed import setup as setup_processes
from mococxr.train.inits import resolve_init
from mococxr.train.precision import load_scaler_state, resolve
from mococxr.train.pretrain_epoch import _end_epoch, _train_one_epoch
from mococxr.train.pretrain_run import _reopen_run, _start_run, describe, run_label
from mococxr.train.pretrain_state import EpochCallback, PretrainResult, StopTraining, Training
from mococxr.train.schedules import build_optimizer, build_scheduler

__all__ = [
    "EpochCallback",
    "PretrainResult",
    "StopTraining",
    "Training",
    "build_moco",
    "describe",
    "pretrain",
    "run_label",
]


# -- the model ----------------------------------------------------------------------------------------
def build_moco(cfg: PretrainConfig, world: int) -> tuple[MoCo, str, dict[str, Any]]:
    """MoCo around a ``cfg.backbone`` encoder initialised per ``cfg.init``; returns (model, init kind,
    origin)."""
    init, state, origin = resolve_init(cfg.init, cfg.backbone)
    encoder = build_encoder(cfg.backbone, init=init, state_dict=state)
    shuffle = cfg.shuffle
    if shuffle == "auto":
        shuffle = "ddp" if world > 1 else "split_bn"
    model = MoCo(
        encoder,
        dim=cfg.moco_dim,
        K=cfg.moco_k,
        m=cfg.moco_m,
        T=cfg.moco_t,
        mlp=cfg.mlp,
        shuffle=shuffle,
        batch_size=cfg.batch_size,
    )
    return model, init, origin


# -- the loop -----------------------------------------------------------------------------------------
def pretrain(
    cfg: PretrainConfig,
    *,
    data: Prepared | None = None,
    store: mt.Store | None = None,
    resume: str | None = None,
    resume_epochs: int | None = None,
    resume_from: int | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
) -> PretrainResult:
    """Pretrain MoCo v2 per ``cfg``; with ``resume=RUN_ID`` continue that run where it stopped.

    A resumed run takes its config from the run itself (``cfg`` is ignored); ``resume_epochs`` extends it,
    and ``resume_from`` picks the epoch whose resume point to continue from (default: the newest).
    ``data``: prepared from ``cfg.data`` when not given (images, and the monitor's labeled splits).
    ``store``: the tracking store (the one in force when not given); only rank 0 talks to it.
    ``on_epoch_end(epoch, encoder, metrics)`` runs on rank 0 after each epoch and may return extra
    metrics to log (a monitor AUC) or raise :class:`StopTraining`.
    """
    rank, world, device, owned_group = setup_processes()
    try:
        # rank 0 opens the store (once per URI, with I/O); the others only point MLflow at it, for a
        # models:/ or runs:/ init that every rank resolves
        store = from_rank0(lambda: mt.current_store(store), rank)
        mt.current_store(store)
        cfg, state = _run_config(cfg, resume, resume_epochs, resume_from, rank=rank, world=world)
        data = prepare(cfg.data) if data is None else data
        t = _setup(cfg, data, state, rank=rank, world=world, device=device, progress=progress and rank == 0)
        callbacks = _callbacks(cfg, data, rank, on_epoch_end)

        result = PretrainResult(run_id="")
        with contextlib.ExitStack() as run_scope:  # rank 0 enters the MLflow run into it; it ends the run
            if resume is None:
                open_run = partial(_start_run, run_scope, t, data, parent_run_id, extra_tags)
            else:
                open_run = partial(_reopen_run, run_scope, t, resume, state, result)
            result.run_id = from_rank0(open_run, rank)  # every rank knows the run it trains for
            for epoch in range(t.start_epoch, cfg.epochs + 1):
                metrics = _train_one_epoch(t, epoch)
                if from_rank0(partial(_end_epoch, t, result, epoch, metrics, callbacks), rank):
                    result.stopped_early = True
                    break
            if cfg.resume_state == "until_done":  # finished or pruned: nothing left to resume
                from_rank0(partial(checkpoints.delete_resume_states, result.run_id), rank)
            if dist.is_initialized():
                dist.barrier()  # no rank leaves (and tears down the group) while another still logs
        return result
    finally:
        if owned_group and dist.is_initialized():
            dist.destroy_process_group()


def _run_config(
    cfg: PretrainConfig,
    resume: str | None,
    resume_epochs: int | None,
    resume_from: int | None,
    *,
    rank: int,
    world: int,
) -> tuple[PretrainConfig, dict[str, Any] | None]:
    """The config to train (``cfg``, or a resumed run's own) and the resume point (None: a new run)."""
    state = None
    if resume_from is not None and resume is None:
        raise ConfigError("--resume-from needs --resume RUN_ID: the run whose epoch to continue from")
    if resume is not None:
        # rank 0 reads the run; every rank then trains from the same config and state
        cfg, state = from_rank0(partial(checkpoints.resume_point, resume, resume_epochs, resume_from), rank)
    if cfg.batch_size % world:  # the config checked the rest; only here is the world size known
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    return cfg, state


def _callbacks(
    cfg: PretrainConfig, data: Prepared, rank: int, on_epoch_end: EpochCallback | None
) -> list[EpochCallback]:
    """Rank 0's epoch-end callbacks: the monitor (with ``cfg.monitor``), then the caller's."""
    callbacks: list[EpochCallback] = []
    if cfg.monitor and rank == 0:
        from mococxr.train.linear_eval import make_monitor  # scikit-learn loads only when monitoring

        callbacks.append(make_monitor(data, cfg.image_size, seed=cfg.seed))
    if on_epoch_end is not None:
        callbacks.append(on_epoch_end)
    return callbacks


def _setup(
    cfg: PretrainConfig,
    data: Prepared,
    state: dict[str, Any] | None,
    *,
    rank: int,
    world: int,
    device: torch.device,
    progress: bool,
) -> Training:
    """Model, optimizer, schedule and dataset for ``cfg``, at the resume point ``state`` when given."""
    torch.manual_seed(cfg.seed)
    records = data.pretrain
    if len(records) < cfg.batch_size:
        raise ConfigError(f"only {len(records)} images for batch_size {cfg.batch_size}; lower --batch-size")
    model, init, origin = build_moco(cfg, world)
    precision = resolve(cfg.amp, cfg.channels_last, device)  # amp off on CPU
    precision.model(model, device)
    optimizer = build_optimizer(
        [p for p in model.parameters() if p.requires_grad],
        name=cfg.optimizer,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    cache = open_cache(cfg.data, records, cfg.image_size)
    dataset = CXRDataset(records, TwoCrops(build_transform(cfg.preset, cfg.image_size)), cache=cache)
    steps_per_epoch = len(dataset) // cfg.batch_size
    scheduler = build_scheduler(
        optimizer,
        name=cfg.scheduler,
        total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=cfg.warmup_epochs * steps_per_epoch,
        milestones=cfg.milestones,
    )
    scaler = precision.grad_scaler()  # torch's no-op form unless fp16 on CUDA
    start_epoch = 1
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        load_scaler_state(scaler, state["scaler"])
        start_epoch = int(state["epoch"]) + 1
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    return Training(
        cfg,
        model,
        net,
        optimizer,
        scheduler,
        scaler,
        dataset,
        rank,
        world,
        device,
        init,
        origin,
        start_epoch,
        progress,
        precision=precision,
    )
