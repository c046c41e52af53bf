"""MoCo v2 (https://arxiv.org/abs/1911.05722, https://arxiv.org/abs/2003.04297) in one small class.

Follows facebookresearch/moco ``moco/builder.py``; the differences, each for a reason:

- The encoders are :class:`~mococxr.models.backbones.Encoder` trunks and the projection head is a
  separate module (``head_q``/``head_k``), so ``encoder_q.trunk.*`` loads straight into a backbone.
- The queue takes any batch size: a short last batch wraps around the end of the queue instead of
  failing an assert. ``K % batch_size`` is checked once, at construction, against the configured batch.
- Shuffle BN also works in one process (``shuffle="split_bn"``), by running the key encoder on
  sub-batches; DDP uses FAIR's cross-process shuffle.
- Logits are computed in float32 even under autocast: with 65,536 negatives divided by T, float16
  logits lose the small differences the loss is made of, and the matmul is a tiny part of a step.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mococxr.errors import ConfigError
from mococxr.models.backbones import Encoder

SHUFFLES = ("auto", "ddp", "split_bn", "none")


class MoCo(nn.Module):
    """A query encoder + head, a momentum key encoder + head, and a queue of negative keys.

    ``forward(im_q, im_k)`` returns ``(logits, labels)`` for ``F.cross_entropy``: logits ``[N, 1+K]``
    already divided by ``T``, the positive in column 0, labels all zero.

    Arguments: ``encoder_q`` an :class:`Encoder`; ``encoder_k`` an encoder of the same architecture
    (default: a deep copy; its weights are overwritten with the query's either way); ``dim`` the
    embedding size; ``K`` the queue length; ``m`` the key encoder momentum; ``T`` the softmax
    temperature (0.2 in MoCo v2); ``mlp`` a 2-layer MLP head (MoCo v2) instead of one linear layer;
    ``shuffle`` how keys are shuffled for BatchNorm (see :meth:`shuffle_mode`); ``split_groups`` the
    number of sub-batches ("emulated GPUs") for ``split_bn``; ``batch_size`` the configured global
    batch size (per-process batch x world size), validated against ``K``.
    """

    def __init__(
        self,
        encoder_q: Encoder,
        encoder_k: Encoder | None = None,
        *,
        dim: int = 128,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.2,
        mlp: bool = True,
        shuffle: str = "auto",
        split_groups: int = 2,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if shuffle not in SHUFFLES:
            raise ConfigError(f"shuffle={shuffle!r}; expected one of {', '.join(SHUFFLES)}")
        if K < 1 or dim < 1 or split_groups < 1 or not 0.0 <= m <= 1.0 or T <= 0:
            raise ConfigError(
                f"invalid MoCo setting: need K>=1, dim>=1, split_groups>=1, 0<=m<=1, T>0; "
                f"got K={K}, dim={dim}, split_groups={split_groups}, m={m}, T={T}"
            )
        if batch_size is not None and (batch_size < 1 or K % batch_size):
            raise ConfigError(
                f"K={K} is not a multiple of the batch size {batch_size}; choose K as a multiple of it "
                f"(e.g. K={max(1, K // max(batch_size, 1)) * max(batch_size, 1)}) so every key stays in "
                "the queue for the same number of steps"
            )
        self.K, self.m, self.T = K, m, T
        self.shuffle, self.split_groups = shuffle, split_groups

        # create the encoders; the head maps trunk features to the contrastive embedding
        self.encoder_q = encoder_q
        self.encoder_k = copy.deepcopy(encoder_q) if encoder_k is None else encoder_k
        width = encoder_q.feature_dim
        self.head_q = (
            nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))
            if mlp
            else nn.Linear(width, dim)
        )
        self.head_k = copy.deepcopy(self.head_q)

        # the key encoder starts as the query encoder and then only moves by momentum, never by gradient
        for param_q, param_k in zip(self._params_q(), self._params_k(), strict=True):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False

        # the queue starts as random unit vectors: negatives that carry no information yet
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def _params_q(self) -> list[nn.Parameter]:
        return [*self.encoder_q.parameters(), *self.head_q.parameters()]

    def _params_k(self) -> list[nn.Parameter]:
        return [*self.encoder_k.parameters(), *self.head_k.parameters()]

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """param_k = m * param_k + (1 - m) * param_q: a slowly moving average keeps the queued keys
        consistent with each other although they were encoded at different steps. One fused foreach
        lerp (k + (1 - m) * (q - k)) is ~7x faster than FAIR's per-parameter loop on a CPU resnet18."""
        torch._foreach_lerp_(self._params_k(), self._params_q(), 1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest keys by ``keys`` ``[n, dim]``; writes wrap around the end of the queue, so a
        short last batch (``K % n != 0``) is fine."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            keys = concat_all_gather(keys)  # every process enqueues the global batch: the queues stay equal
        n = keys.shape[0]
        if n > self.K:
            raise ConfigError(
                f"batch of {n} keys is larger than the queue (K={self.K}); choose K >= batch size"
            )
        keys = keys.to(self.queue.dtype)  # under autocast keys arrive as float16/bfloat16
        ptr = int(self.queue_ptr)
        if ptr + n <= self.K:
            self.queue[:, ptr : ptr + n] = keys.T
        else:
            idx = torch.arange(ptr, ptr + n, device=self.queue.device) % self.K
            self.queue[:, idx] = keys.T
        self.queue_ptr[0] = (ptr + n) % self.K

    def shuffle_mode(self) -> str:
        """The shuffle in effect: "auto" means "ddp" when torch.distributed runs with several processes,
        else "split_bn". Resolved at call time because the process group may start after construction."""
        ddp = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.shuffle == "auto":
            return "ddp" if ddp else "split_bn"
        if self.shuffle == "ddp" and not ddp:
            raise ConfigError(
                "shuffle='ddp' needs torch.distributed with more than one process; use 'split_bn'"
            )
        return self.shuffle

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch shuffle across processes, for making use of BatchNorm: each process then computes BN
        statistics over keys drawn from the whole global batch, not over its own query's positives."""
        batch_size_this = x.shape[0]
        x_gather = concat_all_gather(x)
        num_procs = x_gather.shape[0] // batch_size_this

        idx_shuffle = torch.randperm(x_gather.shape[0], device=x.device)
        dist.broadcast(idx_shuffle, src=0)  # every process must use the same permutation
        idx_unshuffle = torch.argsort(idx_shuffle)

        idx_this = idx_shuffle.view(num_procs, -1)[dist.get_rank()]
        return x_gather[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`_batch_shuffle_ddp`: gather all keys and take back this process's own."""
        batch_size_this = x.shape[0]
        x_gather = concat_all_gather(x)
        num_procs = x_gather.shape[0] // batch_size_this
        idx_this = idx_unshuffle.view(num_procs, -1)[dist.get_rank()]
        return x_gather[idx_this]

    @torch.no_grad()
    def _split_bn_keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """Shuffle BN emulated in one process: shuffle the key batch, encode it as ``split_groups``
        sub-batches so each BN layer normalises with per-sub-batch statistics, as on that many GPUs, then
        undo the shuffle.

        Why: with BN statistics over the whole batch, a query and its positive key share them, and the
        model can "cheat" the pretext task through this leak instead of learning good features. Sub-batches
        hold at least 2 images, as train-mode BN needs more than one value per channel.
        """
        n = im_k.shape[0]
        groups = max(1, min(self.split_groups, n // 2))
        idx_shuffle = torch.randperm(n, device=im_k.device)
        chunks = im_k[idx_shuffle].tensor_split(groups)  # x[idx] keeps channels_last, index_select does not
        k = torch.cat([self._encode_k(chunk) for chunk in chunks])
        return k[torch.argsort(idx_shuffle)]

    def _encode_k(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head_k(self.encoder_k(x)), dim=1)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries ``im_q`` and keys ``im_k`` (two augmentations of the same N images) -> (logits, labels)."""
        # compute query features
        q = F.normalize(self.head_q(self.encoder_q(im_q)), dim=1)  # queries: NxC

        # compute key features
        with torch.no_grad():  # no gradient to keys
            self._momentum_update_key_encoder()
            mode = self.shuffle_mode()
            if mode == "ddp":
                im_k, idx_unshuffle = self._batch_shuffle_ddp(im_k)
                k = self._batch_unshuffle_ddp(self._encode_k(im_k), idx_unshuffle)
            elif mode == "split_bn":
                k = self._split_bn_keys(im_k)
            else:
                k = self._encode_k(im_k)

        with torch.autocast(device_type=q.device.type, enabled=False):
            q32, k32 = q.float(), k.float()
            # positive logits: Nx1
            l_pos = torch.einsum("nc,nc->n", q32, k32).unsqueeze(-1)
            # negative logits: NxK; the queue is cloned because the enqueue below overwrites it in place
            # while backward still needs the values used here
            l_neg = torch.einsum("nc,ck->nk", q32, self.queue.clone().detach().float())
            # logits: Nx(1+K), temperature applied
            logits = torch.cat([l_pos, l_neg], dim=1) / self.T

        # labels: the positive key is column 0
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)

        self._dequeue_and_enqueue(k)
        return logits, labels


def _pretext_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of the instance discrimination task: the fraction of queries whose positive key
    scores above every negative. Loss is ``F.cross_entropy(logits, labels)``. The training loop sums the
    same comparison over an epoch; this per-batch form is what the tests check against hand-made logits."""
    return (logits.argmax(dim=1) == labels).float().mean()


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather ``tensor`` from every process and concatenate along dim 0. Carries no gradient, and
    needs the same shape on every process (use drop_last=True in the DistributedSampler's loader)."""
    tensors_gather = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(tensors_gather, tensor.contiguous(), async_op=False)
    return torch.cat(tensors_gather, dim=0)
