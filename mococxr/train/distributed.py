"""torchrun for the pretraining loop: the process group, this process's device, and rank 0's answers.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the loop runs DDP: nccl on CUDA, gloo on CPU. Only rank 0 talks
to MLflow; :func:`from_rank0` hands what it learns (a run id, a resume point, or the error it met) to
every rank, so no rank waits forever on one that failed. Without torchrun both are plain calls.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def setup() -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call started the process group) under torchrun.

    A group the caller started is left to the caller; one started here is the caller's to destroy.
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


def from_rank0(fn: Callable[[], Any], rank: int) -> Any:
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
