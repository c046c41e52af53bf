"""``mococxr paper PLAN --plan``: every run a plan would make, and what it costs, without training.

Images processed are counted from the real split sizes (the datasets are read and split exactly as the
runs will split them) and each run's resolved epochs. Costs divide them by throughput: on this machine
it is measured now (a few timed training and inference steps per backbone at the plan's image size);
for a GPU it is the figure the plan states (``cost:``), scaled by pixel count from 224 px. A MoCo step
costs about 1.3 plain training steps (one extra key-encoder forward); inference about a third of one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from mococxr.sweep.plan import PaperPlan, select_stages

MOCO_STEP = 1.3  # a MoCo v2 step in plain training steps (measured ~0.75-0.79 throughput ratio)
FORWARD = 1 / 3  # an inference image in training-step images
MONITOR_TRAIN = 2000  # images the pretraining monitor's probe trains on at most (train/linear_eval.py)


@dataclass
class Line:
    stage: str
    what: str
    backbone: str
    image_size: int
    train: float = 0.0  # images through a training step (MoCo steps already weighted)
    infer: float = 0.0  # images through inference only (frozen features, val, test, monitor)


def measure(backbone: str, image_size: int, batch: int = 8, steps: int = 3) -> tuple[float, float]:
    """(training img/s, inference img/s) of ``backbone`` here: Adam steps and no-grad forwards on noise."""
    import torch

    from mococxr.models.backbones import build_encoder

    torch.manual_seed(0)
    enc = build_encoder(backbone, init="random")
    head = torch.nn.Linear(enc.feature_dim, 1)
    model = torch.nn.Sequential(enc, head).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, image_size, image_size).to(memory_format=torch.channels_last)

    def step() -> None:
        opt.zero_grad()
        model(x).mean().backward()
        opt.step()

    def timed(fn) -> float:
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return batch * steps / (time.perf_counter() - t0)

    model.train()
    train = timed(step)
    model.eval()
    with torch.no_grad():
        infer = timed(lambda: model(x))
    return train, infer


def plan_lines(plan: PaperPlan, only=None) -> list[Line]:
    """One line per training run the plan makes (studies' trials and grid cells), with image counts."""
    from mococxr.config import config_hash
    from mococxr.data.prepare import prepare

    stages = select_stages(only)
    data = {k: prepare(cfg) for k, cfg in plan.data.items()}
    lines: list[Line] = []
    seen: set[str] = set()  # a cell two stages share (competition's effusion = chexpert's) runs once
    if "pretrain" in stages:
        lines += _pretrain_lines(plan, data["chexpert"])
    for stage in ("chexpert", "shenzhen", "table2", "competition"):
        if stage not in stages:
            continue
        if stage == "table2":
            if plan.table2 is None:
                continue
            n = len(_trial_points(plan, plan.table2.backbone))
            inits = {f"trial checkpoint {i}": f"models:/{plan.registered_model(plan.table2.backbone)}/{i}"
                     for i in range(1, n + 1)}
            grids = [plan.table2_grid(inits)]
        elif stage in plan.grids:
            grids = plan.grid_specs(stage)
        else:
            continue
        for grid in grids:
            prep = data["shenzhen" if grid.base.data.dataset == "shenzhen" else "chexpert"]
            for label, cfg in grid.configs():
                if config_hash(cfg) not in seen:
                    seen.add(config_hash(cfg))
                    lines.append(_cell_line(stage, grid.name, label, cfg, prep))
    return lines


def _trial_points(plan: PaperPlan, backbone: str) -> list:
    """The trials the backbone's study runs: its grid points (as many as the budget allows) or n_trials."""
    import itertools

    from mococxr.sweep.storage import study_budget

    spec = plan.study_spec(backbone)
    choices = [p.choices for p in spec.search_space.values()]
    points = list(itertools.product(*choices)) if all(choices) else [() for _ in range(spec.budget.n_trials)]
    return points[: study_budget(spec)]


def _pretrain_lines(plan: PaperPlan, prep) -> list[Line]:
    out = []
    for backbone in plan.backbones:
        spec = plan.study_spec(backbone)
        names = list(spec.search_space)
        n_train, n_val = len(prep.splits["train"]), len(prep.splits["val"])
        for i, point in enumerate(_trial_points(plan, backbone)):
            what = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in zip(names, point, strict=True)) if point else f"{i} (sampled)"
            out.append(Line("pretrain", f"{spec.name} trial {what}", backbone, spec.base.image_size,
                            train=spec.epochs * len(prep.pretrain) * MOCO_STEP,
                            infer=spec.epochs * (min(MONITOR_TRAIN, n_train) + n_val)))
    return out


def resolved_epochs(cfg, n_train: int) -> int:
    """The epochs a fine-tune run of ``n_train`` images will train: the fine-tune module's own budget rule."""
    from mococxr.train.finetune import training_budget

    steps = n_train // cfg.batch_size if n_train > cfg.batch_size else 1  # the loader drops a last short batch
    return training_budget(cfg, steps).epochs


def _cell_line(stage: str, grid: str, label: str, cfg, prep) -> Line:
    n_train = len(prep.splits["train"]) if cfg.fraction == 1 else max(1, round(cfg.fraction * len(prep.splits["train"])))
    n_val, n_test = len(prep.splits["val"]), len(prep.splits["test"])
    epochs = resolved_epochs(cfg, n_train)
    what = f"{grid} {label} {cfg.protocol} {100 * cfg.fraction:g}% draw {cfg.draw} ({n_train} img x {epochs} ep)"
    line = Line(stage, what, cfg.backbone, cfg.image_size)
    if cfg.protocol == "e2e":
        line.train = n_train * epochs
        line.infer = epochs * n_val + n_test
    else:  # frozen encoder: every image is a forward pass (plus the probe's one pass over train + val)
        line.infer = n_train * epochs + epochs * n_val + n_test + n_train + n_val
    return line


def hours(line: Line, train_ips: float, infer_ips: float) -> float:
    return (line.train / train_ips + line.infer / infer_ips) / 3600


def gpu_rate(plan: PaperPlan, backbone: str, image_size: int) -> tuple[float, float]:
    """(training, inference) img/s the plan states for its GPU, scaled from 224 px by pixel count."""
    base = getattr(plan.cost, f"gpu_img_s_{backbone}", plan.cost.gpu_img_s_resnet18)
    rate = base * (224 / image_size) ** 2
    return rate, rate / FORWARD


def format_plan(plan: PaperPlan, lines: list[Line], rates: dict[tuple[str, int], tuple[float, float]]) -> str:
    """The run list and per-stage totals: runs, images, CPU hours (measured here), GPU hours (stated)."""
    out = [f"plan {plan.name} ({plan.source}): {len(lines)} training runs; nothing is run by --plan"]
    totals: dict[str, list[float]] = {}
    for i, line in enumerate(lines, 1):
        cpu = hours(line, *rates[(line.backbone, line.image_size)])
        gpu = hours(line, *gpu_rate(plan, line.backbone, line.image_size))
        out.append(f"  [{i}] {line.stage:<11} {line.what}: {line.train + line.infer:,.0f} img, "
                   f"CPU {cpu:.2f} h, GPU {gpu:.3f} h")
        t = totals.setdefault(line.stage, [0, 0.0, 0.0, 0.0])
        t[0] += 1
        t[1] += line.train + line.infer
        t[2] += cpu
        t[3] += gpu
    out.append("")
    out.append(f"{'stage':<12}{'runs':>6}{'images':>16}{'CPU hours':>12}{'GPU hours':>12}")
    for stage, (n, img, cpu, gpu) in totals.items():
        out.append(f"{stage:<12}{n:>6}{img:>16,.0f}{cpu:>12.1f}{gpu:>12.2f}")
    n, img, cpu, gpu = (sum(t[k] for t in totals.values()) for k in range(4))
    out.append(f"{'total':<12}{n:>6}{img:>16,.0f}{cpu:>12.1f}{gpu:>12.2f}")
    out.append("")
    for (backbone, size), (tr, inf) in sorted(rates.items()):
        g_tr, g_inf = gpu_rate(plan, backbone, size)
        out.append(f"throughput {backbone} at {size} px: measured here {tr:.1f} img/s training, {inf:.1f} img/s "
                   f"inference; {plan.cost.gpu}, as the plan states it: {g_tr:.0f} / {g_inf:.0f} img/s")
    out.append(f"about {math.ceil(cpu / 24)} day(s) on this machine, {gpu:.1f} GPU-hours on {plan.cost.gpu} (the "
               "plan's stated img/s); images counted from the real splits and each run's resolved epochs")
    return "\n".join(out)


def estimate(plan: PaperPlan, only=None) -> str:
    """Count, measure and format: what ``--plan`` prints."""
    lines = plan_lines(plan, only)
    rates = {}
    for key in sorted({(ln.backbone, ln.image_size) for ln in lines}):
        rates[key] = measure(*key)
    return format_plan(plan, lines, rates)


__all__ = ["Line", "estimate", "format_plan", "measure", "plan_lines", "resolved_epochs"]
