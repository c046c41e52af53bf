"""Training and inference img/s of the project's encoders on one device, per precision setting.

For each backbone (the project's own ``build_encoder`` trunk plus a one-output linear head, as
``mococxr.sweep.cost.measure`` times them) and each setting (amp off | bf16 | fp16 x NCHW |
channels_last), it times:

- training: forward, loss, backward and an Adam step on one fixed random batch, under
  ``Precision.autocast()`` with ``Precision.grad_scaler()`` (fp16), as the training loops run;
- inference: a ``no_grad`` forward in eval mode under the same autocast.

Each figure is the median of ``--repeats`` timed runs of ``--steps`` steps after ``--warmup`` steps,
with ``torch.cuda.synchronize()`` around every timed run on CUDA. Batches live on the device already:
this measures the model, not data loading. It prints a table, and with ``--out`` writes the ``cost:``
section a plan (sweeps/paper.yaml) reads: the training img/s at 224 px of the fastest setting (or
``--cost-setting``), validated by the plan's own ``Cost`` config. ``--json`` writes every row.

    .venv/bin/python benchmarks/device/throughput.py --out cost.yaml        # on a GPU: all six settings
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/device/throughput.py --out cost.yaml   # CPU: fp32 only

Settings run as asked, on any device (``Precision`` is built directly, not through ``resolve``, which
turns amp off on CPU); the defaults follow the device: on CUDA all six, on CPU fp32 with
NCHW and channels_last.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from mococxr.models.backbones import build_encoder  # noqa: E402
from mococxr.train.precision import Precision  # noqa: E402


@dataclass
class Rate:
    img_s: float  # median over the timed runs
    lo: float  # slowest and fastest timed run
    hi: float
    # CPU only: images per CPU-second of this process (all its threads), median; it moves far less than
    # img_s when other processes share the cores (with one thread: the cost of an image on one core)
    img_cpu_s: float | None = None


@dataclass
class Row:
    backbone: str
    setting: str  # e.g. fp32+nchw, bf16+cl
    amp: str
    channels_last: bool
    batch: int
    image_size: int
    train: Rate
    infer: Rate
    peak_mem_gib: float | None = None  # CUDA only: peak allocated over the training and inference runs


def setting_name(amp: str, channels_last: bool) -> str:
    return f"{'fp32' if amp == 'off' else amp}+{'cl' if channels_last else 'nchw'}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _rate(
    fn: Callable[[], None], images: int, warmup: int, steps: int, repeats: int, device: torch.device
) -> Rate:
    """img/s of ``fn`` over ``repeats`` timed runs of ``steps`` calls each, after ``warmup`` calls."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            fn()
        sync()
        wall.append(images * steps / (time.perf_counter() - t0))
        cpu.append(images * steps / max(time.process_time() - c0, 1e-9))
    return Rate(
        round(statistics.median(wall), 2),
        round(min(wall), 2),
        round(max(wall), 2),
        None if cuda else round(statistics.median(cpu), 2),
    )


def measure(
    backbone: str,
    prec: Precision,
    device: torch.device,
    batch: int,
    image_size: int,
    *,
    warmup: int,
    steps: int,
    repeats: int,
) -> Row:
    torch.manual_seed(0)
    enc = build_encoder(backbone, init="random")
    model = prec.model(torch.nn.Sequential(enc, torch.nn.Linear(enc.feature_dim, 1)), device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = prec.grad_scaler()
    x = prec.batch(torch.randn(batch, 3, image_size, image_size), device)
    y = torch.randint(0, 2, (batch, 1), device=device).float()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def train_step() -> None:
        with prec.autocast():
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    @torch.no_grad()
    def infer_step() -> None:
        with prec.autocast():
            model(x)

    model.train()
    train = _rate(train_step, batch, warmup, steps, repeats, device)
    model.eval()
    infer = _rate(infer_step, batch, warmup, steps, repeats, device)
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    name = setting_name(prec.amp, prec.channels_last)
    return Row(backbone, name, prec.amp, prec.channels_last, batch, image_size, train, infer, peak)


def _cell(rate: Rate) -> str:
    return f"{rate.img_s:.1f} ({rate.lo:.1f}-{rate.hi:.1f})"


def table(rows: list[Row]) -> str:
    """A markdown table: CUDA rows end with peak memory, CPU rows with images per CPU-second."""
    cpu = any(r.train.img_cpu_s is not None for r in rows)
    last = "train, inference img/CPU-s" if cpu else "peak GiB"
    lines = [
        f"| backbone | setting | batch | px | train img/s (min-max) | inference img/s (min-max) | {last} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.train.img_cpu_s is not None:
            extra = f"{r.train.img_cpu_s:.2f}, {r.infer.img_cpu_s:.2f}"
        else:
            extra = "-" if r.peak_mem_gib is None else f"{r.peak_mem_gib:.2f}"
        lines.append(
            f"| {r.backbone} | {r.setting} | {r.batch} | {r.image_size} | {_cell(r.train)} | "
            f"{_cell(r.infer)} | {extra} |"
        )
    return "\n".join(lines)


def cost_snippet(rows: list[Row], device: str, setting: str) -> str:
    """The ``cost:`` section for a plan, from ``setting``'s rows (``best``: each backbone's fastest);
    checked by the plan's own ``Cost`` config before it is returned."""
    from mococxr.config import build
    from mococxr.flows.plan import Cost

    chosen: dict[str, Row] = {}
    for backbone in ("resnet18", "densenet121"):
        mine = [r for r in rows if r.backbone == backbone and (setting == "best" or r.setting == setting)]
        if not mine:
            raise SystemExit(
                f"--out needs {backbone} measured with setting {setting!r}: add it to --backbones"
            )
        chosen[backbone] = max(mine, key=lambda r: r.train.img_s)
    used = sorted({r.setting for r in chosen.values()})
    r18, d121 = chosen["resnet18"], chosen["densenet121"]
    gpu = f"{device}, {' / '.join(used)}, batch {r18.batch}"
    values = {"gpu": gpu, "gpu_img_s_resnet18": r18.train.img_s, "gpu_img_s_densenet121": d121.train.img_s}
    build(Cost, values, where="cost")  # the plan accepts these keys and values
    sizes = {r.image_size for r in chosen.values()}
    note = "" if sizes == {224} else f"  # WARNING: measured at {sorted(sizes)} px; cost: means 224 px"
    return (
        f"cost:                           # benchmarks/device/throughput.py, {time.strftime('%Y-%m-%d')}: "
        f"training img/s ({', '.join(f'{r.backbone} {r.setting}' for r in chosen.values())}){note}\n"
        f"  gpu: {json.dumps(gpu)}\n"
        f"  gpu_img_s_resnet18: {r18.train.img_s}\n"
        f"  gpu_img_s_densenet121: {d121.train.img_s}\n"
    )


def _settings(args: argparse.Namespace, device: torch.device) -> list[tuple[str, bool]]:
    cuda = device.type == "cuda"
    amps = args.amp.split(",") if args.amp else (["off", "bf16", "fp16"] if cuda else ["off"])
    layouts = args.channels_last.split(",") if args.channels_last else ["off", "on"]
    bad = [a for a in amps if a not in ("off", "bf16", "fp16")] + [
        c for c in layouts if c not in ("off", "on")
    ]
    if bad:
        raise SystemExit(f"unknown setting(s) {bad}: --amp takes off,bf16,fp16 and --channels-last off,on")
    return [(a, c == "on") for a in amps for c in layouts]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbones", default="resnet18,densenet121")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 64 on CUDA, 8 on CPU)")
    p.add_argument(
        "--amp", default=None, help="comma-separated off,bf16,fp16 (default: all on CUDA, off on CPU)"
    )
    p.add_argument("--channels-last", default=None, help="comma-separated off,on (default: both)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 CUDA, 2 CPU)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed run (default: 20 CUDA, 3 CPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument("--out", type=Path, help="write the cost: YAML section here")
    p.add_argument(
        "--cost-setting", default="best", help="setting the cost: figures come from: best | e.g. bf16+cl"
    )
    p.add_argument("--json", type=Path, help="write every row as JSON here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (64 if cuda else 8)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    steps = args.steps or (20 if cuda else 3)
    name = device_name(device)
    print(
        f"{name}; torch {torch.__version__}; {args.image_size} px, batch {batch}, {warmup} warm-up steps, "
        f"median of {args.repeats} x {steps} steps",
        flush=True,
    )
    rows = []
    for backbone in args.backbones.split(","):
        for amp, channels_last in _settings(args, device):
            prec = Precision(amp, channels_last, device.type)
            rows.append(
                measure(
                    backbone,
                    prec,
                    device,
                    batch,
                    args.image_size,
                    warmup=warmup,
                    steps=steps,
                    repeats=args.repeats,
                )
            )
            r = rows[-1]
            print(
                f"  {backbone} {r.setting}: train {r.train.img_s:.1f} img/s, "
                f"inference {r.infer.img_s:.1f} img/s",
                flush=True,
            )
    print(table(rows))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"device": name, "torch": torch.__version__, "rows": [asdict(r) for r in rows]}, indent=1
            )
        )
    if args.out:
        snippet = cost_snippet(rows, name, args.cost_setting)
        args.out.write_text(snippet)
        print(f"\nwrote {args.out}:\n{snippet}", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
