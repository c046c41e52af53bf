"""A config's ``init`` -> what ``build_encoder`` needs: an init kind and, for a checkpoint, its state dict.

The registry (:mod:`mococxr.tracking.uris`) turns a checkpoint reference into a local file; this module
loads it with the one checkpoint loader (:func:`mococxr.models.backbones.load_state_dict_file`) and
decides what ``auto`` means, so tracking never imports models and models never talks to MLflow.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from mococxr.models.backbones import (
    available_imagenet_weights,
    imagenet_candidates,
    imagenet_weights_filename,
    load_state_dict_file,
)
from mococxr.tracking.registry import INIT_FALLBACK_TAG, fallback_tags
from mococxr.tracking.uris import resolve_path

_FALLBACKS_SAID: set[str] = set()  # backbones whose init auto fallback this process has announced


def load_checkpoint(ref: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Any checkpoint reference -> (state dict, info).

    ``ref`` is ``models:/NAME@alias``, ``models:/NAME/Alias``, ``models:/NAME/3``, ``models:/m-<id>``,
    ``runs:/<run_id>/<path to a .pt file or a folder holding state_dict.pt>``, or a local file.
    ``info`` holds what is known of its origin (run id, epoch, registry version, backbone).
    """
    local, info = resolve_path(ref)
    return load_state_dict_file(local, what=f"checkpoint {ref!r}"), info


def resolve_init(init: str, backbone: str) -> tuple[str, dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(init kind, state dict or None, origin info) for a config's ``init``, ready for ``build_encoder``.

    ``auto`` picks imagenet when its weights file is present, else random: never silently, the fallback
    is one line on stderr (once per process and backbone) and ``origin["init_fallback"]`` holds the
    reason, which :func:`fallback_tags` turns into the run's ``mococxr.init_fallback`` tag. Anything
    other than ``random``/``imagenet`` is a checkpoint reference loaded by :func:`load_checkpoint` (kind
    ``checkpoint``).
    """
    origin: dict[str, Any] = {}
    if init == "auto":
        init = "imagenet" if available_imagenet_weights(backbone) is not None else "random"
        if init == "random":
            origin["init_fallback"] = _say_fallback(backbone)
    if init in ("random", "imagenet"):
        return init, None, origin
    state, info = load_checkpoint(init)
    return "checkpoint", state, info


def _say_fallback(backbone: str) -> str:
    """The reason init auto fell back to random; printed on stderr the first time per backbone."""
    looked = " or ".join(str(p) for p in imagenet_candidates(backbone))
    reason = f"init auto: no ImageNet weights for {backbone} at {looked}; started from random init"
    if backbone not in _FALLBACKS_SAID:
        _FALLBACKS_SAID.add(backbone)
        print(
            f"mococxr: {reason} (put torchvision's {imagenet_weights_filename(backbone)} there, or pass "
            "--init random to silence this)",
            file=sys.stderr,
            flush=True,
        )
    return reason


__all__ = ["INIT_FALLBACK_TAG", "fallback_tags", "load_checkpoint", "resolve_init"]
