"""What a fine-tune run says about itself in the MLflow UI: its description (what was trained, from what,
on what, how the epoch was chosen) and the result line added when it finishes."""

from __future__ import annotations

from mococxr.config import FinetuneConfig
from mococxr.data.splits import percent
from mococxr.train.budget import Budget
from mococxr.train.linear_eval import ProbeGap


def init_label(kind: str) -> str:
    """What the report groups by: random, imagenet, or moco (any pretrained checkpoint)."""
    return "moco" if kind == "checkpoint" else kind


def describe_run(
    cfg: FinetuneConfig,
    init_kind: str,
    origin: dict,
    *,
    budget: Budget,
    phantom: bool,
    sizes: dict[str, int],
    started_from: str = "",
) -> str:
    """The run's description (Markdown) in the MLflow UI: what was trained, from what, on what, how chosen.

    ``started_from`` (links to the checkpoint, its version and its run: ``tracking.lineage.origin_links``)
    comes second, where the UI shows it before "Show more"."""
    heads = {
        "standardized": "on standardized features (parameter-free BatchNorm, head standardized)",
        "plain": "directly on the frozen features (head plain, as in the paper)",
    }
    protocol = {
        "linear": f"linear (frozen backbone, new linear head {heads[cfg.head]})",
        "e2e": "end-to-end (all layers trained)",
    }
    fallback = f" ({origin['init_fallback']})" if origin.get("init_fallback") else ""
    lines = [
        f"**Fine-tune**, protocol {protocol.get(cfg.protocol, cfg.protocol)}, backbone {cfg.backbone}, "
        f"init **{init_label(init_kind)}**{fallback}{_checkpoint_text(cfg.init, origin, started_from)}, Adam "
        f"{lr_text(cfg)}, batch {cfg.batch_size}.",
        *([started_from] if started_from else []),
        f"Label fraction **{percent(cfg.fraction)}** of the training split's labels (draw {cfg.draw}, "
        f"seed {cfg.seed}): {sizes['n_train']} training images; validation {sizes['n_val']}, "
        f"test {sizes['n_test']} images.",
        f"Dataset {cfg.data.dataset}{' (synthetic phantom)' if phantom else ''} at `{cfg.data.root}`, "
        f"task {cfg.data.task}.",
        f"Epochs: {budget.describe()}. The reported epoch "
        "is the one with the best validation AUC (metrics `best/epoch`, `best/val_auc`); the test set is "
        "scored once, with that epoch's weights (`test/*`, per-image scores in `predictions/test.csv`).",
    ]
    return "\n\n".join(lines)


def lr_text(cfg: FinetuneConfig) -> str:
    """The learning rate as the run used it: one lr, or (linear_lr select) the candidates it chose among."""
    if cfg.protocol == "linear" and cfg.linear_lr == "select":
        lrs = ", ".join(f"{lr:g}" for lr in cfg.linear_lrs)
        return f"lr chosen on validation among {lrs} (linear_lr select; each from the same initial head)"
    return f"lr {cfg.lr:g}"


def _checkpoint_text(init: str, origin: dict, started_from: str = "") -> str:
    """Where a checkpoint init came from; with ``started_from`` (the next paragraph, which links to all
    of it) only the reference, so that paragraph shows before the UI's "Show more"."""
    if "uri" not in origin:  # not a checkpoint (resolve() records every checkpoint's uri)
        return ""
    where = f" from `{init}`"
    if started_from:
        return where
    if origin.get("registry_version"):
        where += f": registered model {origin['registered_model']} version {origin['registry_version']}"
    if origin.get("run_id"):
        epoch = f", epoch {origin['epoch']}" if origin.get("epoch") is not None else ""
        where += f" (pretraining run {origin['run_id']}{epoch})"
    return where


def result_line(
    best_epoch: int, epochs: int, best_auc: float, test: dict[str, float], gap: ProbeGap | None = None
) -> str:
    last = (
        ", the last: validation AUC was still rising, the budget may be short" if best_epoch == epochs else ""
    )
    text = f"\n\n**Result**: best epoch {best_epoch} of {epochs}{last} (validation AUC {best_auc:.4f})"
    if "test/auc" in test:
        text += f"; test AUC {test['test/auc']:.4f}, AUPRC {test['test/auprc']:.4f}"
    return text + "." + (f"\n\n{gap.describe()}" if gap else "")
