"""Grid specs: the paper's fine-tune table in one YAML file (the format is in :mod:`mococxr.sweep.grid`).

A grid's cells are the items of a work queue in Optuna's storage (:mod:`mococxr.sweep.queue`): ``storage``
names it (default: the Optuna database of the MLflow store in force) and ``heartbeat`` says how soon a
dead worker's cell is handed to another.
"""

from __future__ import annotations

import itertools
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mococxr.config import FinetuneConfig, Protocol, build, coerce, load_yaml, override
from mococxr.errors import ConfigError
from mococxr.sweep.spec_common import (
    Heartbeat,
    _check_keys,
    _fractions,
    _mapping,
    _per_fraction,
    experiment_name,
    refuse_keys,
    shown,
    storage_url,
    study_name,
    text,
)

# The base config's keys that every cell sets itself (GridSpec.configs), so a grid may not set them.
CELL_KEYS = ("init", "protocol", "fraction", "draw", "experiment", "run_name")
_CELL_WHY = "each cell sets it (inits, protocols, fractions, draws, experiment; run names are per cell)"

_GRID_KEYS = frozenset(
    {
        "experiment",
        "base",
        "inits",
        "protocols",
        "fractions",
        "draws",
        "name",
        "epochs",
        "protocol_overrides",
        "heartbeat",
        "storage",
    }
)


@dataclass(frozen=True)
class GridSpec:
    """A fine-tune grid: every init x protocol x label fraction x draw of one base config."""

    name: str
    experiment: str
    base: FinetuneConfig
    inits: dict[str, str]  # label (what the report groups by) -> init
    protocols: list[str]
    fractions: list[float]
    draws: dict[float, int]
    epochs: dict[float, int] = field(default_factory=dict)  # fraction -> epochs; absent: the paper's rule
    protocol_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {linear: {lr: 1e-3}}
    heartbeat: Heartbeat = field(default_factory=Heartbeat)  # the cells' leases (see sweep/queue.py)
    storage: str | None = None  # the queue's Optuna storage; None: the store's (tracking/mlflow.Store)

    def configs(self) -> list[tuple[str, FinetuneConfig]]:
        """Every (init label, config) of the grid, small fractions first."""
        out = []
        for fraction, (label, init), protocol in itertools.product(
            self.fractions, self.inits.items(), self.protocols
        ):
            for draw in range(self.draws[fraction]):
                values = {
                    "init": init,
                    "protocol": protocol,
                    "fraction": fraction,
                    "draw": draw,
                    "experiment": self.experiment,
                    "epochs": self.epochs.get(fraction),
                    **self.protocol_overrides.get(protocol, {}),
                }
                out.append((label, override(self.base, values)))
        return out


def load_grid(path: str | Path, overrides: dict[str, Any] | None = None) -> GridSpec:
    """Read and validate a grid YAML; ``overrides`` are dotted FinetuneConfig keys (``data.root``). Every
    key, and every cell's config, is checked here: a bad grid fails before any run or queue exists."""
    raw = load_yaml(path)
    where = str(path)
    _check_keys(raw, _GRID_KEYS, ("experiment", "inits", "protocols", "fractions"), where)
    base_raw = _mapping(raw, "base", where)
    refuse_keys(base_raw, CELL_KEYS, f"{where}: base", _CELL_WHY)
    base = build(FinetuneConfig, base_raw, where=f"{where}: base")
    base = override(base, overrides or {}, where="overrides")
    fractions = _fractions(raw["fractions"], where)
    named = raw.get("name") is not None
    spec = GridSpec(
        name=study_name(
            raw["name"] if named else Path(path).stem, f"{where}: name{'' if named else ' (the file name)'}"
        ),
        experiment=experiment_name(raw["experiment"], f"{where}: experiment"),
        base=base,
        inits=_inits(raw["inits"], f"{where}: inits"),
        protocols=_protocols(raw["protocols"], f"{where}: protocols"),
        fractions=fractions,
        draws=_per_fraction(raw.get("draws", 1), fractions, f"{where}: draws", complete=True),
        epochs=_per_fraction(_or_empty(raw.get("epochs")), fractions, f"{where}: epochs", complete=False),
        protocol_overrides=protocol_overrides(
            _mapping(raw, "protocol_overrides", where), base, f"{where}: protocol_overrides", CELL_KEYS
        ),
        heartbeat=build(Heartbeat, _mapping(raw, "heartbeat", where), where=f"{where}: heartbeat"),
        storage=None if raw.get("storage") is None else storage_url(raw["storage"], f"{where}: storage"),
    )
    spec.configs()  # every cell's config made once now, not halfway through the grid
    return spec


def protocol_overrides(
    raw: Mapping[str, Any], base: FinetuneConfig, where: str, fixed: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    """``{linear: {lr: 1e-3}, e2e: {...}}``, each checked against ``base`` now; keys in ``fixed`` (the ones
    each cell sets) are refused, dotted (``data.root``) or not."""
    out = {}
    for protocol, values in raw.items():
        at = f"{where}.{protocol}"
        if protocol not in typing.get_args(Protocol):
            raise ConfigError(f"{at}: expected linear or e2e as the key (the protocol the values apply to)")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{at}={shown(values)}: expected a mapping of fine-tune config values")
        refuse_keys(values, fixed, at, _CELL_WHY)
        override(base, dict(values), where=at)  # keys, types and ranges checked now
        out[str(protocol)] = dict(values)
    return out


def _inits(raw: Any, where: str) -> dict[str, str]:
    if isinstance(raw, list):
        raw = {i if isinstance(i, (str, int, float)) else shown(i): i for i in raw}
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(
            f"{where}={shown(raw)}: expected a mapping label -> init (random, imagenet, auto, a checkpoint "
            "path, a models:/ or runs:/ URI)"
        )
    out = {
        text(k, f"{where}.{k}", what="a label"): text(v, f"{where}.{k}", what="an init")
        for k, v in raw.items()
    }
    if len(out) < len(raw):
        raise ConfigError(f"{where}: two labels read the same: {shown(list(raw))}")
    return out


def _protocols(raw: Any, where: str) -> list[str]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}={shown(raw)}: expected a list of linear and/or e2e")
    protocols = [coerce(p, Protocol, where) for p in raw]
    if len(set(protocols)) < len(protocols):
        raise ConfigError(f"{where}={shown(raw)}: a protocol is listed twice")
    return protocols


def _or_empty(value: Any) -> Any:
    """An absent (null) per-fraction table: none; 0 or [] is a value, checked as one."""
    return {} if value is None else value


__all__ = ["CELL_KEYS", "GridSpec", "load_grid", "protocol_overrides"]
