"""Mixed precision and memory format: what a config asks for, and what is in effect on this device.

A config's ``amp`` (off | bf16 | fp16) and ``channels_last`` are requests; :func:`resolve` turns them into
a :class:`Precision` for the device the run trains on, and the training loops ask it for everything
that depends on the answer::

    prec = resolve(cfg.amp, cfg.channels_last, device)
    model = prec.model(model, device)
    scaler = prec.grad_scaler()
    for x, y in loader:
        x = prec.batch(x, device)
        with prec.autocast():
            loss = criterion(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    mlflow.log_params(prec.params())

Mixed precision is CUDA-only. On CPU ``amp`` resolves to off and the run says so (``amp_effective``):
bf16 autocast measured 11-18x slower than fp32 on the CPUs this project runs on. ``channels_last`` is
honoured on every device: on this 2-core CPU a ResNet18 training step is 6-20 % faster in channels_last
(the performance notes of DESIGN.md), which is why pretraining asks for it by default. bf16 on a GPU
without native bf16 (before Ampere) resolves to off rather than to a slow emulation; fp16 then is the
switch to use.

fp16 needs a gradient scaler (small gradients underflow in float16); bf16 has float32's range and does
not. :meth:`Precision.grad_scaler` returns torch's own ``GradScaler``, enabled only for fp16 on CUDA: a
disabled one is torch's no-op (``scale`` returns the loss unchanged, ``step`` calls
``optimizer.step()``, ``update`` does nothing, ``state_dict`` is empty), so one loop serves every case.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AMPS = ("off", *DTYPES)


@dataclass(frozen=True)
class Precision:
    """What is in effect: ``amp`` (off | bf16 | fp16), ``channels_last``, on ``device_type``.

    ``reason`` says why something the config asked for is not in effect ("" when all of it is).
    Build it with :func:`resolve`; constructing one directly bypasses the device policy (the device
    benchmark does, to measure what resolve would refuse).
    """

    amp: str = "off"
    channels_last: bool = False
    device_type: str = "cpu"
    reason: str = ""

    def __post_init__(self) -> None:
        if self.amp not in AMPS:
            raise ValueError(f"amp={self.amp!r}: expected one of {', '.join(AMPS)}")

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None when autocast is off."""
        return DTYPES.get(self.amp)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.preserve_format

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's context: ``torch.autocast`` at ``dtype``, or a no-op when amp is off."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """torch's GradScaler: enabled for fp16 on CUDA, otherwise its disabled (no-op) form."""
        enabled = self.amp == "fp16" and self.device_type == "cuda"
        return torch.amp.GradScaler("cuda", enabled=enabled)

    def model(self, module: torch.nn.Module, device: torch.device | str | None = None) -> torch.nn.Module:
        """``module`` moved to ``device`` (when given) and to channels_last when in effect (in place)."""
        return module.to(device=device, memory_format=self.memory_format)

    def batch(self, x: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """An image batch moved to ``device`` (non-blocking) in the memory format in effect, in one copy."""
        fmt = self.memory_format if x.dim() == 4 else torch.preserve_format
        return x.to(device=device, non_blocking=True, memory_format=fmt)

    def params(self) -> dict[str, str]:
        """MLflow params that say what a run really used, beside the ``amp``/``channels_last`` it asked
        for."""
        return {"amp_effective": self.amp, "channels_last_effective": str(self.channels_last)}


def resolve(amp: str, channels_last: bool, device: torch.device | str) -> Precision:
    """What of ``amp`` and ``channels_last`` takes effect on ``device`` (see the module docstring)."""
    device = torch.device(device)
    if amp not in AMPS:
        raise ValueError(f"amp={amp!r}: expected one of {', '.join(AMPS)}")
    if device.type != "cuda":
        reason = f"amp={amp} ignored on {device.type}: mixed precision is CUDA-only" if amp != "off" else ""
        return Precision("off", bool(channels_last), device.type, reason)
    if amp == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        name = torch.cuda.get_device_name(device)
        return Precision(
            "off", bool(channels_last), "cuda", f"amp=bf16 ignored: {name} has no native bf16; use fp16"
        )
    return Precision(amp, bool(channels_last), "cuda")


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """Restore ``scaler`` from a resume point, whichever precision that point was saved under.

    A resume may run on another device than the run began on: a disabled scaler ignores a saved
    state (torch's own rule), and an enabled one given the empty state of a disabled one starts from
    its initial scale instead of raising.
    """
    if scaler.is_enabled() and not state:
        return
    scaler.load_state_dict(state)
