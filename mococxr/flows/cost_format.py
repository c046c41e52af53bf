"""What ``--plan`` prints: the run list (done or to do), hours by stage and kind of work, throughputs."""

from __future__ import annotations

from collections.abc import Mapping

from mococxr.flows.cost import FORWARD, KINDS, Line
from mococxr.flows.cost_rate import Rate
from mococxr.flows.plan import PaperPlan

Rates = tuple[float, float]  # (training img/s, inference img/s)


def gpu_rate(plan: PaperPlan, backbone: str, image_size: int) -> Rates:
    """(training, inference) img/s the plan states for its GPU, scaled from 224 px by pixel count."""
    base = getattr(plan.cost, f"gpu_img_s_{backbone}", plan.cost.gpu_img_s_resnet18)
    rate = base * (224 / image_size) ** 2
    return rate, rate / FORWARD


def span(hours: float) -> str:
    """Wall time of ``hours`` on one machine in words: '36 min', '5.2 hours', '3.4 days' (never rounded up a
    unit: 0.6 hours is not 'about 1 day')."""
    if hours < 1:
        return f"about {max(1, round(hours * 60))} min"
    if hours < 48:
        return f"about {hours:.1f} hours"
    return f"about {hours / 24:.1f} days"


def hours(line: Line, rates: Rates, kind: str | None = None) -> float:
    """Hours of ``line`` (or of one kind of its work) at (training, inference) img/s ``rates``."""
    work = [line.work.get(k, (0.0, 0.0)) for k in (KINDS if kind is None else (kind,))]
    return sum(train / rates[0] + infer / rates[1] for train, infer in work) / 3600


def format_plan(
    plan: PaperPlan, lines: list[Line], rates: Mapping[tuple[str, int], Rate], *, store: str = ""
) -> str:
    """The run list, the to-do hours by stage and kind (GPU, then CPU), what is done, and throughputs."""
    gpu = {key: gpu_rate(plan, *key) for key in rates}
    cpu = {key: r.img_s for key, r in rates.items()}
    todo = [ln for ln in lines if not ln.done]
    out = [
        f"plan {plan.name} ({plan.source}): {len(lines)} training runs, {len(lines) - len(todo)} done, "
        f"{len(todo)} to do; nothing is run by --plan"
    ]
    out += [store] if store else []
    out += [rules(plan, lines), ""]
    out += run_list(lines, gpu, cpu)
    out += ["", f"TO DO by stage and kind of work: GPU hours on {plan.cost.gpu} (the plan's stated img/s)"]
    out += stage_table(todo, gpu, images=True)
    out += ["", "TO DO by stage and kind of work: CPU hours on this machine (the img/s measured below)"]
    out += stage_table(todo, cpu)
    out += ["", done_line(lines, gpu, cpu), ""]
    for (backbone, size), rate in sorted(rates.items()):
        g_tr, g_inf = gpu[(backbone, size)]
        out.append(
            f"throughput {backbone} at {size} px, measured here: {rate.train.rate:.1f} img/s training "
            f"({rate.train.describe()}), {rate.infer.rate:.1f} img/s inference ({rate.infer.describe()}); "
            f"{plan.cost.gpu}, as the plan states it: {g_tr:.0f} / {g_inf:.0f} img/s"
        )
    g = sum(hours(ln, gpu[_key(ln)]) for ln in todo)
    c = sum(hours(ln, cpu[_key(ln)]) for ln in todo)
    out.append(
        f"left to do: {g:.1f} GPU-hours on {plan.cost.gpu} (the plan's stated img/s); {c:,.1f} CPU-hours "
        f"here ({span(c)}); images counted from the real splits and each run's "
        "resolved epochs"
    )
    return "\n".join(out)


def _key(line: Line) -> tuple[str, int]:
    return line.backbone, line.image_size


def rules(plan: PaperPlan, lines: list[Line]) -> str:
    """The counting rules in force, read from the cells' own configs."""
    seen: dict[str, set[str]] = {}
    for ln in lines:
        if ln.key and ln.key[0] == "cell":
            cfg = ln.key[2]
            what = f"preset {cfg.preset}, val_every {cfg.val_every}, epochs_rule {cfg.epochs_rule}" + (
                f", feature_cache {'on' if cfg.feature_cache else 'off'}, {_lr_rule(cfg)}"
                if cfg.protocol == "linear"
                else ""
            )
            seen.setdefault(cfg.protocol, set()).add(what)
    parts = [f"{protocol}: {' | '.join(sorted(values))}" for protocol, values in sorted(seen.items())]
    return "rules: " + "; ".join(parts)


def _lr_rule(cfg) -> str:
    """A linear cell's learning rates: linear_lr paper (one, lr) or select (each of linear_lrs)."""
    if cfg.linear_lr == "select":
        lrs = "/".join(f"{lr:g}" for lr in cfg.linear_lrs)
        return f"linear_lr select: {len(cfg.linear_lrs)} lr candidates per cell ({lrs})"
    return f"linear_lr paper: 1 lr per cell ({cfg.lr:g})"


def run_list(lines: list[Line], gpu: Mapping, cpu: Mapping) -> list[str]:
    """Every run under its study or grid: state, what, images, hours, and the cached passes it makes."""
    out, group = [], None
    for i, ln in enumerate(lines, 1):
        if (ln.stage, ln.group) != group:
            group = (ln.stage, ln.group)
            n = sum((x.stage, x.group) == group for x in lines)
            out.append(f"{ln.stage} / {ln.group} ({n} run{'s' if n != 1 else ''})")
        pays = f"  + cached {', '.join(ln.pays)} features" if ln.pays else ""
        out.append(
            f"  {f'[{i}]':<5} {'done ' if ln.done else 'to do'}  {ln.what:<44} {ln.detail:<30}"
            f"{ln.images():>14,.0f} img  GPU {hours(ln, gpu[_key(ln)]):7.3f} h  "
            f"CPU {hours(ln, cpu[_key(ln)]):8.2f} h{pays}"
        )
    return out


def stage_table(lines: list[Line], rates: Mapping, *, images: bool = False) -> list[str]:
    """Hours by stage (rows) and kind of work (columns), with a total row and column."""
    head = f"{'stage':<12}{'runs':>6}" + "".join(f"{k:>13}" for k in KINDS) + f"{'total':>11}"
    out = [head + (f"{'images':>16}" if images else "")]
    stages = list(dict.fromkeys(ln.stage for ln in lines))
    for name in [*stages, "total"]:
        rows = [ln for ln in lines if name in ("total", ln.stage)]
        per = [sum(hours(ln, rates[_key(ln)], k) for ln in rows) for k in KINDS]
        text = f"{name:<12}{len(rows):>6}" + "".join(f"{h:>13.2f}" for h in per) + f"{sum(per):>11.2f}"
        out.append(text + (f"{sum(ln.images() for ln in rows):>16,.0f}" if images else ""))
    return out


def done_line(lines: list[Line], gpu: Mapping, cpu: Mapping) -> str:
    done = [ln for ln in lines if ln.done]
    if not done:
        return "DONE (finished in the store, not priced above): none"
    stages = ", ".join(
        f"{s} {sum(ln.stage == s for ln in done)}" for s in dict.fromkeys(ln.stage for ln in done)
    )
    g = sum(hours(ln, gpu[_key(ln)]) for ln in done)
    c = sum(hours(ln, cpu[_key(ln)]) for ln in done)
    return (
        f"DONE (finished in the store, not priced above): {len(done)} runs ({stages}), {g:.2f} GPU-hours, "
        f"{c:.1f} CPU-hours"
    )


__all__ = ["done_line", "format_plan", "gpu_rate", "hours", "rules", "run_list", "span", "stage_table"]
