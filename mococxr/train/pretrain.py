"""MoCo v2 pretraining: one training loop a reader can hold in their head.

Every epoch logs loss, pretext top-1 accuracy, learning rate, images/s and seconds to one MLflow run,
the query encoder as a LoggedModel, and the full training state as the resume point. Interrupted runs
continue with ``--resume RUN_ID`` in the same run and reach the same weights (on CPU) as an
uninterrupted run: each epoch reseeds every random source from (seed, epoch), so nothing depends on
how many epochs ran in this process.

Under ``torchrun`` the loop runs DDP (gloo on CPU, nccl on CUDA) with FAIR's cross-process shuffle-BN;
only rank 0 talks to MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlflow
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from mococxr.config import PretrainConfig, build, config_hash, flat_params, to_dict
from mococxr.data.dataset import CXRDataset, seed_worker
from mococxr.data.splits import make_manifest
from mococxr.data.transforms import TwoCrops, build_transform
from mococxr.errors import ConfigError
from mococxr.models.backbones import available_imagenet_weights, build_encoder
from mococxr.models.moco import MoCo
from mococxr.tracking import mlflow as mt
from mococxr.train import checkpoints
from mococxr.train.data import load_cache, pretrain_records
from mococxr.train.schedules import build_optimizer, build_scheduler

EpochCallback = Callable[[int, torch.nn.Module, dict[str, float]], dict[str, float] | None]


class StopTraining(Exception):
    """Raised by an epoch callback to end training early (e.g. an Optuna pruner); the run is kept."""


@dataclass
class PretrainResult:
    run_id: str
    history: dict[int, dict[str, float]] = field(default_factory=dict)
    model_ids: dict[int, str] = field(default_factory=dict)
    stopped_early: bool = False


# -- distributed ------------------------------------------------------------------------------------
def _dist_setup() -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call started the process group) under torchrun.

    A group the caller started is left to the caller; one started here is destroyed by ``pretrain``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    owned = world > 1 and not dist.is_initialized()
    if owned:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if dist.is_initialized():
        world = dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local), owned
    return rank, world, torch.device("cpu"), owned


def _from_rank0(fn: Callable[[], Any], rank: int) -> Any:
    """Run ``fn`` on rank 0 and hand its result (or its exception) to every rank.

    Without this, an error on rank 0 (an unknown run id, a failed MLflow call) would leave the other
    ranks waiting forever in the next collective; instead every rank raises the same error.
    """
    if not dist.is_initialized():
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = (True, fn())
        except Exception as exc:  # re-raised below, on every rank
            box[0] = (False, exc)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _seed_epoch(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """Reseed torch (augmentations, shuffle-BN permutations) for ``epoch``; returns the sampler generator."""
    torch.manual_seed(seed * 100_003 + epoch * 1_009 + rank)
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


# -- the model ----------------------------------------------------------------------------------------
def resolve_init(init: str, backbone: str) -> tuple[str, dict | None, dict[str, Any]]:
    """(init kind, state dict or None, origin info). ``auto`` picks imagenet when its file is present."""
    if init == "auto":
        init = "imagenet" if available_imagenet_weights(backbone) is not None else "random"
    if init in ("random", "imagenet"):
        return init, None, {}
    from mococxr.tracking.registry import resolve

    state, info = resolve(init)
    return "checkpoint", state, info


def build_moco(cfg: PretrainConfig, world: int) -> tuple[MoCo, str, dict[str, Any]]:
    init, state, origin = resolve_init(cfg.init, cfg.backbone)
    encoder = build_encoder(cfg.backbone, init=init if init != "checkpoint" else "checkpoint", state_dict=state)
    shuffle = cfg.shuffle
    if shuffle == "auto":
        shuffle = "ddp" if world > 1 else "split_bn"
    model = MoCo(
        encoder, dim=cfg.moco_dim, K=cfg.moco_k, m=cfg.moco_m, T=cfg.moco_t, mlp=cfg.mlp,
        shuffle=shuffle, batch_size=cfg.batch_size,
    )
    return model, init, origin


# -- the loop -----------------------------------------------------------------------------------------
def pretrain(
    cfg: PretrainConfig,
    *,
    resume: str | None = None,
    resume_epochs: int | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    on_epoch_end: EpochCallback | None = None,
    records: pd.DataFrame | None = None,
    progress: bool = True,
) -> PretrainResult:
    """Pretrain MoCo v2 per ``cfg``; with ``resume=RUN_ID`` continue that run where it stopped.

    A resumed run takes its config from the run itself (``cfg`` is ignored); ``resume_epochs`` extends it.

    ``on_epoch_end(epoch, encoder, metrics)`` runs on rank 0 after each epoch and may return extra
    metrics to log (a monitor AUC) or raise :class:`StopTraining`.
    """
    rank, world, device, owned_group = _dist_setup()
    try:
        return _pretrain(cfg, rank=rank, world=world, device=device, resume=resume, resume_epochs=resume_epochs,
                         parent_run_id=parent_run_id, extra_tags=extra_tags, on_epoch_end=on_epoch_end,
                         records=records, progress=progress)
    finally:
        if owned_group and dist.is_initialized():
            dist.destroy_process_group()


def _check_config(cfg: PretrainConfig, world: int) -> None:
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    if cfg.moco_k % cfg.batch_size:
        raise ConfigError(
            f"moco_k={cfg.moco_k} is not a multiple of batch_size={cfg.batch_size}: the queue must hold whole "
            f"batches; try moco_k={cfg.moco_k // cfg.batch_size * cfg.batch_size or cfg.batch_size}"
        )


def _pretrain(cfg, *, rank, world, device, resume, resume_epochs, parent_run_id, extra_tags, on_epoch_end,
              records, progress) -> PretrainResult:
    state = None
    if resume is not None:
        mt.configure()
        # rank 0 reads the run; every rank then trains from the same config and state
        cfg, state = _from_rank0(
            lambda: (_config_of_run(resume, resume_epochs), checkpoints.load_resume_state(resume)), rank
        )
    _check_config(cfg, world)

    torch.manual_seed(cfg.seed)
    records = pretrain_records(cfg.data) if records is None else records
    if len(records) < cfg.batch_size:
        raise ConfigError(f"only {len(records)} images for batch_size {cfg.batch_size}; lower --batch-size")
    manifest = make_manifest("pretrain", records, seed=cfg.data.split_seed)
    model, init_kind, origin = build_moco(cfg, world)
    # channels_last is faster for convolutions on CUDA (tensor cores) and on CPU (oneDNN: 6-20 % here)
    model.to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(
        [p for p in model.parameters() if p.requires_grad], name=cfg.optimizer, lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    per_rank = cfg.batch_size // world
    cache = load_cache(cfg.data, records, cfg.image_size)
    dataset = CXRDataset(records, TwoCrops(build_transform(cfg.preset, cfg.image_size)), cache=cache)
    steps_per_epoch = len(dataset) // cfg.batch_size
    scheduler = build_scheduler(
        optimizer, name=cfg.scheduler, total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=cfg.warmup_epochs * steps_per_epoch, milestones=cfg.milestones,
    )
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    start_epoch = 1
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"]) + 1
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    callbacks: list[EpochCallback] = []
    if cfg.monitor and rank == 0:
        from mococxr.train.linear_eval import make_monitor

        callbacks.append(make_monitor(cfg.data, cfg.image_size, seed=cfg.seed))
    if on_epoch_end is not None:
        callbacks.append(on_epoch_end)

    result = PretrainResult(run_id="")
    opened: dict[str, Any] = {}

    def open_run() -> str:
        opened["ctx"] = _open_run(cfg, result, resume=resume, state=state, init_kind=init_kind, origin=origin,
                                  manifest=manifest, world=world, parent_run_id=parent_run_id,
                                  extra_tags=extra_tags)
        return result.run_id

    result.run_id = _from_rank0(open_run, rank)  # every rank knows the run it trains for
    run_ctx = opened.get("ctx")
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            metrics = _train_one_epoch(net, model, dataset, optimizer, scheduler, scaler, cfg, epoch,
                                       rank=rank, world=world, device=device, per_rank=per_rank,
                                       progress=progress and rank == 0)
            stop = _from_rank0(
                lambda epoch=epoch, metrics=metrics: _end_epoch(result, cfg, model, optimizer, scheduler,
                                                                scaler, epoch, metrics, callbacks),
                rank,
            )
            if stop:
                result.stopped_early = True
                break
        if dist.is_initialized():
            dist.barrier()  # no rank leaves (and tears down the group) while another still logs
    except BaseException as exc:
        if run_ctx is not None:
            run_ctx.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if run_ctx is not None:
        run_ctx.__exit__(None, None, None)
    return result


def _open_run(cfg, result, *, resume, state, init_kind, origin, manifest, world, parent_run_id, extra_tags):
    """Rank 0: start (or reopen) the MLflow run and log what defines it; returns the entered context."""
    mt.configure()
    if resume is not None:
        run_ctx = mt.start_run(cfg.experiment, run_id=resume)
    else:
        run_tags = mt.tags(
            kind="pretrain", backbone=cfg.backbone, init=init_kind, dataset=cfg.data.dataset,
            manifest_sha256=manifest.sha256, config_hash=config_hash(cfg), preset=cfg.preset,
            image_size=cfg.image_size, pretrain_run_id=origin.get("run_id"),
        )
        run_ctx = mt.start_run(
            cfg.experiment, run_name=cfg.run_name, run_tags={**run_tags, **(extra_tags or {})},
            parent_run_id=parent_run_id,
        )
    run = run_ctx.__enter__()
    result.run_id = run.info.run_id
    try:
        if resume is None:
            mlflow.log_params({**flat_params(cfg), "init_resolved": init_kind, "world_size": world})
            mt.log_json(to_dict(cfg), "config.json")
            mt.log_json(manifest.to_dict(), "manifests/pretrain.json")
        else:
            last = int(state["epoch"]) if state else 0
            checkpoints.reconcile(result.run_id, last, state.get("metrics") if state else None)
            result.history = {int(k): v for k, v in json.loads(state["history"]).items()} if state else {}
    except BaseException as exc:
        run_ctx.__exit__(type(exc), exc, exc.__traceback__)
        raise
    return run_ctx


def _train_one_epoch(net, model, dataset, optimizer, scheduler, scaler, cfg, epoch, *, rank, world,
                     device, per_rank, progress) -> dict[str, float]:
    generator = _seed_epoch(cfg.seed, epoch, rank)
    # the generator seeds shuffling (one process) and the workers' RNGs; seed_worker extends that to
    # random/numpy, so an epoch's augmentations depend only on (seed, epoch, rank)
    kwargs = {"batch_size": per_rank, "drop_last": True, "num_workers": cfg.workers, "generator": generator,
              "worker_init_fn": seed_worker}
    if world > 1:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
        loader = DataLoader(dataset, sampler=sampler, **kwargs)
    else:
        loader = DataLoader(dataset, shuffle=True, **kwargs)
    net.train()
    t0 = time.perf_counter()
    loss_sum = acc_sum = 0.0
    n_seen = 0
    bar = tqdm(loader, desc=f"pretrain epoch {epoch}/{cfg.epochs}", disable=not progress, leave=False)
    for (im_q, im_k), _ in bar:
        im_q = im_q.to(device, non_blocking=True, memory_format=torch.channels_last)
        im_k = im_k.to(device, non_blocking=True, memory_format=torch.channels_last)
        with torch.autocast("cuda", enabled=device.type == "cuda"):
            logits, labels = net(im_q, im_k)
            loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        b = im_q.shape[0]
        loss_sum += loss.item() * b
        acc_sum += (logits.argmax(dim=1) == labels).float().sum().item()
        n_seen += b
        bar.set_postfix(loss=f"{loss_sum / n_seen:.4f}", acc1=f"{100 * acc_sum / n_seen:.1f}")
    seconds = time.perf_counter() - t0
    totals = torch.tensor([loss_sum, acc_sum, float(n_seen)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(totals)
    loss_sum, acc_sum, n_all = totals.tolist()
    if n_all == 0:
        raise ConfigError("no full batch in an epoch: the dataset is smaller than the batch size")
    return {
        "train/loss": loss_sum / n_all,
        "train/acc1": 100.0 * acc_sum / n_all,
        "train/lr": optimizer.param_groups[0]["lr"],
        "train/images": n_all,
        "train/images_per_s": n_all / seconds,
        "train/epoch_seconds": seconds,
    }


def _end_epoch(result, cfg, model, optimizer, scheduler, scaler, epoch, metrics, on_epoch_end) -> bool:
    """Rank 0: checkpoint -> resume state -> metrics, in that order (see checkpoints.reconcile)."""
    if not math.isfinite(metrics["train/loss"]):
        raise FloatingPointError(f"loss became {metrics['train/loss']} at epoch {epoch}; lower the learning rate")
    stop = False
    for callback in on_epoch_end:
        try:
            metrics.update(callback(epoch, model.encoder_q, metrics) or {})
        except StopTraining:
            stop = True
    run = mlflow.active_run()
    encoder_state = {k: v.detach().cpu() for k, v in model.encoder_q.state_dict().items()}
    model_id = mt.log_state_dict_model(
        encoder_state, name=f"{cfg.backbone}-epoch{epoch:03d}", run_id=run.info.run_id,
        experiment_id=run.info.experiment_id, step=epoch,
        info={"backbone": cfg.backbone, "epoch": epoch, "run_id": run.info.run_id,
              "feature_dim": model.encoder_q.feature_dim, "image_size": cfg.image_size},
        model_tags=mt.tags(kind="pretrain", backbone=cfg.backbone, dataset=cfg.data.dataset),
    )
    result.history[epoch] = dict(metrics)
    result.model_ids[epoch] = model_id
    checkpoints.save_resume_state(
        run.info.run_id, epoch,
        {
            "epoch": epoch,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "metrics": dict(metrics),
            "history": json.dumps(result.history),
        },
    )
    mlflow.log_metrics(metrics, step=epoch, model_id=model_id)
    checkpoints.apply_retention(run.info.run_id, cfg.keep, result.history)
    tqdm.write(
        f"epoch {epoch}/{cfg.epochs}  loss {metrics['train/loss']:.4f}  acc1 {metrics['train/acc1']:.1f}%  "
        f"lr {metrics['train/lr']:.2e}  {metrics['train/images_per_s']:.1f} img/s"
        + "".join(f"  {k} {v:.4f}" for k, v in metrics.items() if not k.startswith("train/"))
    )
    return stop


def _config_of_run(run_id: str, epochs: int | None) -> PretrainConfig:
    """The config a run was started with, so ``--resume`` needs nothing else; ``epochs`` may extend it."""
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.json")
    with open(path) as fh:
        logged = build(PretrainConfig, json.load(fh), where=f"config.json of run {run_id}")
    return logged if epochs is None else dataclasses.replace(logged, epochs=epochs)
