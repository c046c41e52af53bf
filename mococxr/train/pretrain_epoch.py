"""One pretraining epoch: reseeding from (seed, epoch), the pass over the data on each rank, and on
rank 0 its end (callbacks, the encoder as a logged model, the resume point, metrics, retention)."""

from __future__ import annotations

import json
import math
import time

import mlflow
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from mococxr.console import progress as progress_bar
from mococxr.console import working, write
from mococxr.data.dataset import seed_worker
from mococxr.errors import ConfigError
from mococxr.tracking import artifacts as ma
from mococxr.tracking import mlflow as mt
from mococxr.train import checkpoints
from mococxr.train.pretrain_state import EpochCallback, PretrainResult, StopTraining, Training


# -- seeding -------------------------------------------------------------------------------------------
def _seed_epoch(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """Reseed torch (augmentations, shuffle-BN permutations) for ``epoch``; returns the sampler generator."""
    torch.manual_seed(seed * 100_003 + epoch * 1_009 + rank)
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def _train_one_epoch(t: Training, epoch: int) -> dict[str, float]:
    """One pass over the data on this rank; returns the epoch's metrics summed over every rank."""
    cfg, device = t.cfg, t.device
    generator = _seed_epoch(cfg.seed, epoch, t.rank)
    # the generator seeds shuffling (one process) and the workers' RNGs; seed_worker extends that to
    # random/numpy, so an epoch's augmentations depend only on (seed, epoch, rank)
    kwargs = {
        "batch_size": cfg.batch_size // t.world,
        "drop_last": True,
        "num_workers": cfg.workers,
        "generator": generator,
        "worker_init_fn": seed_worker,
    }
    if t.world > 1:
        sampler = DistributedSampler(
            t.dataset, num_replicas=t.world, rank=t.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
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
        acc_sum += (
            (logits.argmax(dim=1) == labels).float().sum().item()
        )  # pretext top-1: the positive key wins
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


def _end_epoch(
    t: Training, result: PretrainResult, epoch: int, metrics: dict[str, float], callbacks: list[EpochCallback]
) -> bool:
    """Rank 0: callbacks, then checkpoint -> resume state -> metrics, in that order (see
    checkpoints.reconcile). Returns whether a callback asked to stop. With progress on, a line every 10 s
    while this runs long (a monitor's linear evaluation, a slow artifact store)."""
    if not math.isfinite(metrics["train/loss"]):
        raise FloatingPointError(
            f"loss became {metrics['train/loss']} at epoch {epoch}; lower the learning rate"
        )
    what = "linear monitor and checkpoint" if t.cfg.monitor else "checkpoint"
    with working(f"[{t.label}] epoch {epoch}/{t.cfg.epochs}: {what}", enabled=t.progress):
        stop = _finish_epoch(t, result, epoch, metrics, callbacks)
    write(  # tqdm.write on a terminal, a flushed line in a log
        f"[{t.label}] epoch {epoch}/{t.cfg.epochs}  loss {metrics['train/loss']:.4f}  "
        f"acc1 {metrics['train/acc1']:.1f}%  "
        f"lr {metrics['train/lr']:.2e}  {metrics['train/images_per_s']:.1f} img/s"
        + "".join(f"  {k} {v:.4f}" for k, v in metrics.items() if not k.startswith("train/"))
    )
    return stop


def _finish_epoch(
    t: Training, result: PretrainResult, epoch: int, metrics: dict[str, float], callbacks: list[EpochCallback]
) -> bool:
    """The work of :func:`_end_epoch`: callbacks (they add to ``metrics``), the encoder as a logged model,
    the resume point, the metrics, retention."""
    cfg, model = t.cfg, t.model
    stop = False
    for callback in callbacks:
        try:
            metrics.update(callback(epoch, model.encoder_q, metrics) or {})
        except StopTraining:
            stop = True
    run = mlflow.active_run()
    encoder_state = {k: v.detach().cpu() for k, v in model.encoder_q.state_dict().items()}
    model_id = ma.log_state_dict_model(
        encoder_state,
        name=t.label,  # named e03-<label> (see artifacts.checkpoint_name)
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        step=epoch,
        info={
            "backbone": cfg.backbone,
            "epoch": epoch,
            "run_id": run.info.run_id,
            "feature_dim": model.encoder_q.feature_dim,
            "image_size": cfg.image_size,
        },
        model_tags=mt.tags(kind="pretrain", backbone=cfg.backbone, dataset=cfg.data.dataset),
    )
    result.history[epoch] = dict(metrics)
    result.model_ids[epoch] = model_id
    checkpoints.save_resume_state(
        run.info.run_id,
        epoch,
        {
            "epoch": epoch,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(),
            "scaler": t.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "metrics": dict(metrics),
            "history": json.dumps(result.history),
        },
    )
    checkpoints.supersede(run.info.run_id, epoch, model_id)  # an older checkpoint of a retrained epoch
    mlflow.log_metrics(metrics, step=epoch, model_id=model_id)
    _log_best(result.history)
    checkpoints.apply_retention(run.info.run_id, cfg.keep, result.history)
    return stop


def _log_best(history: dict[int, dict[str, float]], metric: str = "val/linear_auc") -> None:
    """The best epoch so far as summary metrics (no step), so the run's overview shows the selected
    epoch rather than the last; the earliest epoch wins a tie, as in the study's selection."""
    scored = {e: h[metric] for e, h in history.items() if metric in h and math.isfinite(h[metric])}
    if scored:
        best = max(scored, key=lambda e: (scored[e], -e))
        mlflow.log_metrics({"best/" + metric.replace("/", "_"): scored[best], "best/epoch": best})
