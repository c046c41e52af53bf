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
``cfg.channels_last`` take effect as ``precision.py`` rules (amp on CUDA only); the run's ``amp_effective`` and
``channels_last_effective`` params say what was in effect.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import mlflow
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from mococxr.config import PretrainConfig, config_hash, flat_params, to_dict
from mococxr.console import progress as progress_bar
from mococxr.data.dataset import CXRDataset, seed_worker
from mococxr.data.prepare import Prepared, open_cache, prepare
from mococxr.data.splits import Manifest
from mococxr.data.transforms import TwoCrops, build_transform
from mococxr.errors import ConfigError
from mococxr.models.backbones import build_encoder
from mococxr.models.moco import MoCo
from mococxr.tracking import artifacts as ma
from mococxr.tracking import mlflow as mt
from mococxr.tracking.registry import INIT_FALLBACK_TAG, fallback_tags, resolve_init
from mococxr.train import checkpoints
from mococxr.train.distributed import from_rank0
from mococxr.train.distributed import setup as setup_processes
from mococxr.train.precision import Precision, load_scaler_state, resolve
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


# -- seeding -------------------------------------------------------------------------------------------
def _seed_epoch(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """Reseed torch (augmentations, shuffle-BN permutations) for ``epoch``; returns the sampler generator."""
    torch.manual_seed(seed * 100_003 + epoch * 1_009 + rank)
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


# -- the model ----------------------------------------------------------------------------------------
def build_moco(cfg: PretrainConfig, world: int) -> tuple[MoCo, str, dict[str, Any]]:
    """MoCo around a ``cfg.backbone`` encoder initialised per ``cfg.init``; returns (model, init kind, origin)."""
    init, state, origin = resolve_init(cfg.init, cfg.backbone)
    encoder = build_encoder(cfg.backbone, init=init, state_dict=state)
    shuffle = cfg.shuffle
    if shuffle == "auto":
        shuffle = "ddp" if world > 1 else "split_bn"
    model = MoCo(
        encoder, dim=cfg.moco_dim, K=cfg.moco_k, m=cfg.moco_m, T=cfg.moco_t, mlp=cfg.mlp,
        shuffle=shuffle, batch_size=cfg.batch_size,
    )
    return model, init, origin


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
        state = None
        if resume_from is not None and resume is None:
            raise ConfigError("--resume-from needs --resume RUN_ID: the run whose epoch to continue from")
        if resume is not None:
            # rank 0 reads the run; every rank then trains from the same config and state
            cfg, state = from_rank0(partial(checkpoints.resume_point, resume, resume_epochs, resume_from), rank)
        if cfg.batch_size % world:  # the config checked the rest; only here is the world size known
            raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
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


def _callbacks(cfg: PretrainConfig, data: Prepared, rank: int,
               on_epoch_end: EpochCallback | None) -> list[EpochCallback]:
    """Rank 0's epoch-end callbacks: the monitor (with ``cfg.monitor``), then the caller's."""
    callbacks: list[EpochCallback] = []
    if cfg.monitor and rank == 0:
        from mococxr.train.linear_eval import make_monitor  # scikit-learn loads only when monitoring

        callbacks.append(make_monitor(data, cfg.image_size, seed=cfg.seed))
    if on_epoch_end is not None:
        callbacks.append(on_epoch_end)
    return callbacks


def _setup(cfg: PretrainConfig, data: Prepared, state: dict[str, Any] | None, *, rank: int, world: int,
           device: torch.device, progress: bool) -> Training:
    """Model, optimizer, schedule and dataset for ``cfg``, at the resume point ``state`` when given."""
    torch.manual_seed(cfg.seed)
    records = data.pretrain
    if len(records) < cfg.batch_size:
        raise ConfigError(f"only {len(records)} images for batch_size {cfg.batch_size}; lower --batch-size")
    model, init, origin = build_moco(cfg, world)
    precision = resolve(cfg.amp, cfg.channels_last, device)  # amp off on CPU
    precision.model(model, device)
    optimizer = build_optimizer(
        [p for p in model.parameters() if p.requires_grad], name=cfg.optimizer, lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    cache = open_cache(cfg.data, records, cfg.image_size)
    dataset = CXRDataset(records, TwoCrops(build_transform(cfg.preset, cfg.image_size)), cache=cache)
    steps_per_epoch = len(dataset) // cfg.batch_size
    scheduler = build_scheduler(
        optimizer, name=cfg.scheduler, total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=cfg.warmup_epochs * steps_per_epoch, milestones=cfg.milestones,
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
    return Training(cfg, model, net, optimizer, scheduler, scaler, dataset, rank, world, device, init, origin,
                    start_epoch, progress, precision=precision)


def _start_run(run_scope: contextlib.ExitStack, t: Training, data: Prepared, parent_run_id: str | None,
               extra_tags: dict[str, str] | None) -> str:
    """Rank 0: start a new MLflow run inside ``run_scope`` and log what defines it; returns its id."""
    cfg, manifest = t.cfg, data.manifests["pretrain"]
    run_tags = mt.tags(
        kind="pretrain", backbone=cfg.backbone, init=t.init, dataset=cfg.data.dataset,
        manifest_sha256=manifest.sha256, config_hash=config_hash(cfg), preset=cfg.preset,
        image_size=cfg.image_size, pretrain_run_id=t.origin.get("run_id"),
    )
    run_tags = {**run_tags, **fallback_tags(t.origin), **(extra_tags or {})}
    run_tags[_NOTE] = describe(cfg, t.init, len(manifest.image_ids), run_tags)
    run = run_scope.enter_context(mt.start_run(
        cfg.experiment, run_name=cfg.run_name, run_tags=run_tags, parent_run_id=parent_run_id,
    ))
    t.label = run_label(cfg, run.info.run_id)
    mlflow.log_params({**flat_params(cfg), "init_resolved": t.init, "world_size": t.world})
    _log_precision(t, {})
    ma.log_json(to_dict(cfg), "config.json")
    ma.log_json(manifest.to_dict(), "manifests/pretrain.json")
    _log_dataset(cfg, data.pretrain, manifest)
    return run.info.run_id


_NOTE = "mlflow.note.content"  # the run's description in the MLflow UI


def _log_precision(t: Training, logged: dict[str, str]) -> None:
    """Rank 0: the precision in effect as params (``amp_effective``, ``channels_last_effective``), and on
    stderr why a requested switch is not in effect. ``logged``: the params a reopened run already has; a
    resume that runs under another precision (on another device) adds ``<param>_from_epoch_<N>``."""
    if t.precision.reason:
        checkpoints.say(t.precision.reason)
    new = {}
    for key, value in t.precision.params().items():
        began = logged.get(key, value)
        if began != value:
            checkpoints.say(f"this resume trains from epoch {t.start_epoch} with {key}={value}; the run began "
                            f"with {began}")
            key = f"{key}_from_epoch_{t.start_epoch}"
        if logged.get(key, value) == value:  # params are immutable: a value logged once stays
            new[key] = value
    mlflow.log_params(new)


def run_label(cfg: PretrainConfig, run_id: str) -> str:
    """What names a run in checkpoint names and progress lines: its run name (a sweep trial's is
    ``<study>-trialNNN``), else backbone and run id."""
    return cfg.run_name or f"{cfg.backbone}-{run_id[:8]}"


def describe(cfg: PretrainConfig, init: str, n_images: int, run_tags: dict[str, str]) -> str:
    """The run's description: what was trained on what, how, and for which study trial."""
    origin = f"from {cfg.init}" if init == "checkpoint" else f"{init} init"
    if INIT_FALLBACK_TAG in run_tags:
        origin += f"; {run_tags[INIT_FALLBACK_TAG]}"
    text = (f"MoCo v2 pretraining of {cfg.backbone} ({origin}) on {cfg.data.dataset}/{cfg.data.task}: "
            f"{cfg.epochs} epochs over {n_images} images at {cfg.image_size} px, batch {cfg.batch_size}, "
            f"{cfg.optimizer} lr {cfg.lr:g} with a {cfg.scheduler} schedule, queue K={cfg.moco_k}, "
            f"m={cfg.moco_m:g}, T={cfg.moco_t:g}. Each epoch's encoder is a logged model.")
    if cfg.monitor:
        text += (" A linear evaluation on the validation split scores every epoch (val/linear_auc); "
                 "best/val_linear_auc and best/epoch name the best epoch so far.")
    study, trial = run_tags.get(mt.tag("optuna_study")), run_tags.get(mt.tag("optuna_trial"))
    if study is not None:
        text += f" Trial {trial} of the Optuna study {study!r}; the study's parent run compares its trials."
    return text


def _log_dataset(cfg: PretrainConfig, records: pd.DataFrame, manifest: Manifest) -> None:
    """The pretraining images as the run's dataset input (the UI's Dataset column)."""
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.pandas_dataset import from_pandas

    # a source built from its JSON: resolving a bare path warns that two registered classes match it
    source = get_dataset_source_from_json(json.dumps({"uri": cfg.data.root}), "local")
    frame = records[["image_id", "patient_id"]].reset_index(drop=True)
    # MLflow stores at most 36 characters of a digest; the full hash is the manifest_sha256 tag
    dataset = from_pandas(frame, source=source, name="pretrain", digest=manifest.sha256[:32])
    ma.log_inputs([dataset], contexts=["pretrain"])


def _reopen_run(run_scope: contextlib.ExitStack, t: Training, run_id: str, state: dict[str, Any] | None,
                result: PretrainResult) -> str:
    """Rank 0: reopen run ``run_id`` inside ``run_scope`` and repair what a crash left behind."""
    # the budget first (the run's config.json is what the next --resume reads); it is also the resume's
    # first write, so a read-only or full artifact store stops it here, before the run is touched
    checkpoints.record_budget(run_id, to_dict(t.cfg))
    run = run_scope.enter_context(mt.start_run(t.cfg.experiment, run_id=run_id))
    t.label = run_label(t.cfg, run_id)
    if t.cfg.epochs != int(run.data.params.get("epochs", t.cfg.epochs)):  # extended: say so in the description
        mlflow.set_tag(_NOTE, describe(t.cfg, t.init, len(t.dataset), run.data.tags)
                       + f" Extended by a resume from the {run.data.params['epochs']} epochs of its params to "
                       f"{t.cfg.epochs} (config.json holds the current budget).")
    last = int(state["epoch"]) if state else 0
    _log_precision(t, run.data.params)
    checkpoints.reconcile(run_id, last, state.get("metrics") if state else None)
    result.history = {int(k): v for k, v in json.loads(state["history"]).items()} if state else {}
    if last >= t.cfg.epochs:
        checkpoints.say(f"run {run_id} already has epoch {last} of its {t.cfg.epochs}; nothing to train (to train "
                        f"longer: mococxr pretrain --resume {run_id} --epochs N, with N > {last})")
    return run.info.run_id


def _train_one_epoch(t: Training, epoch: int) -> dict[str, float]:
    """One pass over the data on this rank; returns the epoch's metrics summed over every rank."""
    cfg, device = t.cfg, t.device
    generator = _seed_epoch(cfg.seed, epoch, t.rank)
    # the generator seeds shuffling (one process) and the workers' RNGs; seed_worker extends that to
    # random/numpy, so an epoch's augmentations depend only on (seed, epoch, rank)
    kwargs = {"batch_size": cfg.batch_size // t.world, "drop_last": True, "num_workers": cfg.workers,
              "generator": generator, "worker_init_fn": seed_worker}
    if t.world > 1:
        sampler = DistributedSampler(t.dataset, num_replicas=t.world, rank=t.rank, shuffle=True, seed=cfg.seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
        loader = DataLoader(t.dataset, sampler=sampler, **kwargs)
    else:
        loader = DataLoader(t.dataset, shuffle=True, **kwargs)
    t.net.train()
    t0 = time.perf_counter()
    loss_sum = acc_sum = 0.0
    n_seen = 0
    bar = progress_bar(loader, f"[{t.label}] pretrain epoch {epoch}/{cfg.epochs}", enabled=t.progress)
    for (im_q, im_k), _ in bar:
        im_q, im_k = t.precision.batch(im_q, device), t.precision.batch(im_k, device)
        with t.precision.autocast():
            logits, labels = t.net(im_q, im_k)
            loss = F.cross_entropy(logits.float(), labels)
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(loss).backward()
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.scheduler.step()
        b = im_q.shape[0]
        loss_sum += loss.item() * b
        acc_sum += (logits.argmax(dim=1) == labels).float().sum().item()  # pretext top-1: the positive key wins
        n_seen += b
        bar.set_postfix(loss=f"{loss_sum / n_seen:.4f}", acc1=f"{100 * acc_sum / n_seen:.1f}")
    bar.close()
    seconds = time.perf_counter() - t0
    totals = torch.tensor([loss_sum, acc_sum, float(n_seen)], dtype=torch.float64)
    if t.world > 1:
        dist.all_reduce(totals)
    loss_sum, acc_sum, n_all = totals.tolist()
    if n_all == 0:
        raise ConfigError("no full batch in an epoch: the dataset is smaller than the batch size")
    return {
        "train/loss": loss_sum / n_all,
        "train/acc1": 100.0 * acc_sum / n_all,
        "train/lr": t.optimizer.param_groups[0]["lr"],
        "train/images": n_all,
        "train/images_per_s": n_all / seconds,
        "train/epoch_seconds": seconds,
    }


def _end_epoch(t: Training, result: PretrainResult, epoch: int, metrics: dict[str, float],
               callbacks: list[EpochCallback]) -> bool:
    """Rank 0: callbacks, then checkpoint -> resume state -> metrics, in that order (see
    checkpoints.reconcile). Returns whether a callback asked to stop."""
    cfg, model = t.cfg, t.model
    if not math.isfinite(metrics["train/loss"]):
        raise FloatingPointError(f"loss became {metrics['train/loss']} at epoch {epoch}; lower the learning rate")
    stop = False
    for callback in callbacks:
        try:
            metrics.update(callback(epoch, model.encoder_q, metrics) or {})
        except StopTraining:
            stop = True
    run = mlflow.active_run()
    encoder_state = {k: v.detach().cpu() for k, v in model.encoder_q.state_dict().items()}
    model_id = ma.log_state_dict_model(
        encoder_state, name=f"{t.label}-epoch{epoch:03d}", run_id=run.info.run_id,
        experiment_id=run.info.experiment_id, step=epoch,
        info={"backbone": cfg.backbone, "epoch": epoch, "run_id": run.info.run_id,
              "feature_dim": model.encoder_q.feature_dim, "image_size": cfg.image_size},
        model_tags=mt.tags(kind="pretrain", backbone=cfg.backbone, dataset=cfg.data.dataset),
    )
    result.history[epoch] = dict(metrics)
    result.model_ids[epoch] = model_id
    checkpoints.save_resume_state(run.info.run_id, epoch, {
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "metrics": dict(metrics),
        "history": json.dumps(result.history),
    })
    checkpoints.supersede(run.info.run_id, epoch, model_id)  # an older checkpoint of a retrained epoch
    mlflow.log_metrics(metrics, step=epoch, model_id=model_id)
    _log_best(result.history)
    checkpoints.apply_retention(run.info.run_id, cfg.keep, result.history)
    tqdm.write(
        f"[{t.label}] epoch {epoch}/{cfg.epochs}  loss {metrics['train/loss']:.4f}  acc1 {metrics['train/acc1']:.1f}%  "
        f"lr {metrics['train/lr']:.2e}  {metrics['train/images_per_s']:.1f} img/s"
        + "".join(f"  {k} {v:.4f}" for k, v in metrics.items() if not k.startswith("train/"))
    )
    return stop


def _log_best(history: dict[int, dict[str, float]], metric: str = "val/linear_auc") -> None:
    """The best epoch so far as summary metrics (no step), so the run's overview shows the selected
    epoch rather than the last; the earliest epoch wins a tie, as in the study's selection."""
    scored = {e: h[metric] for e, h in history.items() if metric in h and math.isfinite(h[metric])}
    if scored:
        best = max(scored, key=lambda e: (scored[e], -e))
        mlflow.log_metrics({"best/" + metric.replace("/", "_"): scored[best], "best/epoch": best})
