"""Throughput of the real MoCo v2 pretraining loop against a plain classifier step, and MLflow's cost.

Three figures, all on in-memory tensors so data loading is not the bound:
- ``loop``: images/s of ``mococxr.train.pretrain._train_one_epoch`` (the loop ``pretrain`` runs: DataLoader,
  MoCo forward with split-BN keys, loss, backward, Adam, scheduler, metrics).
- ``plain``: images/s of forward + backward + Adam step of a torchvision ResNet18 classifier on the same
  batches, in the same process (channels_last, like the loop). ``ratio = loop / plain``; a MoCo step
  does one extra key-encoder forward, so ~0.75 is the ceiling and >= 0.70 the goal.
- ``mlflow``: seconds of the epoch-end calls (LoggedModel + resume state + metrics) into a fresh sqlite
  store, against the time of an epoch of ``--epoch-images`` images at the measured loop speed.

With ``--lightly`` (run under benchmarks/pretrain/.venv-lightly) it times lightly's MoCo v2 training step
instead (same backbone, batch, queue and optimizer) and prints its images/s.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/pretrain/bench_pretrain.py --size 128 --batch 32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from mococxr.train.precision import Precision


def batches(n: int, batch: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]


def plain_step_rate(data: list[torch.Tensor], warmup: int) -> float:
    """images/s of a ResNet18 classifier's forward + backward + Adam step."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=1).to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    t0 = 0.0
    for i, x in enumerate(data):
        if i == warmup:
            t0 = time.perf_counter()
        x = x.contiguous(memory_format=torch.channels_last)
        loss = F.binary_cross_entropy_with_logits(model(x).squeeze(1), torch.ones(x.shape[0]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (len(data) - warmup) * data[0].shape[0] / (time.perf_counter() - t0)


class PairDataset(torch.utils.data.Dataset):
    """Pre-made (query, key) image pairs, as CXRDataset with TwoCrops returns them."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.images[i]
        return [x, x.flip(-1)], torch.empty(0)


def loop_rate(data: list[torch.Tensor], warmup: int, k: int):
    """images/s of the real pretraining loop (one epoch over the batches after ``warmup`` of them)."""
    from mococxr.config import PretrainConfig
    from mococxr.train import pretrain as P
    from mococxr.train.schedules import build_optimizer, build_scheduler

    batch, size = data[0].shape[0], data[0].shape[-1]
    cfg = PretrainConfig(init="random", image_size=size, batch_size=batch, moco_k=k, workers=0, epochs=1)
    model, _, _ = P.build_moco(cfg, 1)
    model.to(memory_format=torch.channels_last)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], name="adam", lr=1e-4)
    sched = build_scheduler(opt, name="cosine", total_steps=len(data))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    warm = PairDataset(torch.cat(data[:warmup]))
    timed = PairDataset(torch.cat(data[warmup:]))
    t = P.Training(
        cfg,
        model,
        model,
        opt,
        sched,
        scaler,
        warm,
        rank=0,
        world=1,
        device=torch.device("cpu"),
        init="random",
        origin={},
        progress=False,
        precision=Precision("off", True, "cpu"),
    )
    P._train_one_epoch(t, 1)
    t = dataclasses.replace(t, dataset=timed)
    metrics = P._train_one_epoch(t, 2)
    return metrics, t


def mlflow_cost(t, metrics, repeats: int = 3) -> float:
    """Median seconds of the epoch-end logging (what ``pretrain`` runs after every epoch)."""
    from mococxr.tracking import mlflow as mt
    from mococxr.train import pretrain as P

    tmp = tempfile.mkdtemp(prefix="bench-mlflow-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    os.environ["MOCOCXR_ARTIFACT_ROOT"] = f"{tmp}/artifacts"
    mt.open_store()
    times = []
    with mt.start_run("bench"):
        result = P.PretrainResult(run_id="")
        for epoch in range(1, repeats + 1):
            t0 = time.perf_counter()
            P._end_epoch(t, result, epoch, dict(metrics), [])
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def lightly_rate(data: list[torch.Tensor], warmup: int, k: int) -> float:
    """images/s of lightly's MoCo v2 training step (its tutorial's model) on the same batches."""
    import copy

    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    class MoCoV2(torch.nn.Module):
        def __init__(self):
            super().__init__()
            resnet = torchvision.models.resnet18()
            self.backbone = torch.nn.Sequential(*list(resnet.children())[:-1])
            self.projection_head = MoCoProjectionHead(512, 512, 128)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x):
            return self.projection_head(self.backbone(x).flatten(start_dim=1))

        def forward_momentum(self, x):
            return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    model = MoCoV2().to(memory_format=torch.channels_last)
    criterion = NTXentLoss(temperature=0.2, memory_bank_size=(k, 128))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    t0 = 0.0
    for i, x in enumerate(data):
        if i == warmup:
            t0 = time.perf_counter()
        x_q = x.contiguous(memory_format=torch.channels_last)
        x_k = x.flip(-1).contiguous(memory_format=torch.channels_last)
        update_momentum(model.backbone, model.backbone_momentum, m=0.999)
        update_momentum(model.projection_head, model.projection_head_momentum, m=0.999)
        loss = criterion(model(x_q), model.forward_momentum(x_k))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (len(data) - warmup) * data[0].shape[0] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--queue", type=int, default=4096)
    ap.add_argument("--epoch-images", type=int, default=1000, help="epoch size for the MLflow overhead")
    ap.add_argument("--lightly", action="store_true", help="time lightly's MoCo v2 step (its own venv)")
    args = ap.parse_args()
    data = batches(args.steps + args.warmup, args.batch, args.size)
    out = {"size": args.size, "batch": args.batch, "threads": torch.get_num_threads(), "steps": args.steps}
    if args.lightly:
        out["lightly_img_s"] = round(lightly_rate(data, args.warmup, args.queue), 2)
    else:
        # interleave plain / loop / plain so drifting CPU contention hits both sides alike
        plain_a = plain_step_rate(data, args.warmup)
        metrics, t = loop_rate(data, args.warmup, args.queue)
        plain_b = plain_step_rate(data, args.warmup)
        plain = (plain_a + plain_b) / 2
        loop = metrics["train/images_per_s"]
        cost = mlflow_cost(t, metrics)
        epoch_s = args.epoch_images / loop
        out.update(
            plain_img_s=round(plain, 2),
            plain_spread=[round(plain_a, 2), round(plain_b, 2)],
            loop_img_s=round(loop, 2),
            ratio=round(loop / plain, 3),
            mlflow_epoch_end_s=round(cost, 3),
            epoch_s_at_epoch_images=round(epoch_s, 1),
            mlflow_overhead_pct=round(100 * cost / epoch_s, 2),
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
