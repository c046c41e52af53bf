"""What study, grid and plan specs share: key checks, per-fraction counts, the heartbeat, storage URLs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mococxr.config import Validated, coerce, opt
from mococxr.errors import ConfigError


@dataclass(frozen=True)
class Heartbeat(Validated):
    """How a dead worker is noticed: its RUNNING trial stops beating and is retried after the grace period."""

    interval: int = opt(10, "seconds between a running trial's heartbeats", check="positive")
    grace_period: int | None = opt(
        None, "silent seconds before a trial is FAIL (3 x interval)", check="positive"
    )
    max_retry: int = opt(2, "times a dead worker's trial is queued again", check="nonnegative")

    def validate(self) -> None:
        if self.grace_period is not None and self.grace_period <= self.interval:
            raise ConfigError(f"grace_period={self.grace_period} must exceed interval={self.interval}")

    @property
    def grace(self) -> int:
        return self.grace_period if self.grace_period is not None else 3 * self.interval


def mask_password(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``, for logs and params."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _check_keys(
    data: Mapping[str, Any], known: set[str] | frozenset[str], required: tuple, where: str
) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(sorted(known))}"
        )
    for key in required:
        if key not in data:
            raise ConfigError(f"{where}: missing required key `{key}`")


def _mapping(data: Mapping[str, Any], key: str, source: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
    return dict(value)


def _fractions(raw: Any, path: str | Path) -> list[float]:
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: fractions must be a list of numbers in (0, 1], got {raw!r}")
    fractions = sorted(coerce(f, float, f"{path}: fractions") for f in raw)
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ConfigError(f"{path}: fractions must be numbers in (0, 1], got {raw}")
    return fractions


def _per_fraction(raw: Any, fractions: list[float], where: str, *, complete: bool) -> dict[float, int]:
    """One count for every fraction, or a mapping fraction -> count (``complete``: every fraction named)."""
    if isinstance(raw, Mapping):
        out = {coerce(k, float, where): coerce(v, int, f"{where}.{k}") for k, v in raw.items()}
        missing = [f for f in fractions if f not in out]
        if complete and missing:
            raise ConfigError(f"{where} gives no count for fraction(s) {missing}")
    else:
        out = dict.fromkeys(fractions, coerce(raw, int, where))
    if any(v < 1 for v in out.values()):
        raise ConfigError(f"{where} must be at least 1")
    return out


__all__ = ["Heartbeat", "mask_password"]
