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
from mococxr.sweep.spec_common import Heartbeat, _check_keys, _fractions, _mapping, _per_fraction

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
    """Read and validate a grid YAML; ``overrides`` are dotted FinetuneConfig keys (``data.root``)."""
    raw = load_yaml(path)
    _check_keys(raw, _GRID_KEYS, ("experiment", "inits", "protocols", "fractions"), str(path))
    base = build(FinetuneConfig, _mapping(raw, "base", str(path)), where=f"{path}: base")
    base = override(base, overrides or {}, where="overrides")
    inits = raw["inits"]
    if isinstance(inits, list):
        inits = {str(i): str(i) for i in inits}
    if not isinstance(inits, dict) or not inits:
        raise ConfigError(f"{path}: inits must be a mapping label -> init (random, imagenet, a URI)")
    if not isinstance(raw["protocols"], list):
        raise ConfigError(f"{path}: protocols: expected a list of linear and/or e2e")
    protocols = [coerce(p, Protocol, f"{path}: protocols") for p in raw["protocols"]]
    fractions = _fractions(raw["fractions"], path)
    draws = _per_fraction(raw.get("draws", 1), fractions, f"{path}: draws", complete=True)
    epochs = _per_fraction(raw.get("epochs") or {}, fractions, f"{path}: epochs", complete=False)
    protocol_overrides = _mapping(raw, "protocol_overrides", str(path))
    for protocol, values in protocol_overrides.items():
        if protocol not in typing.get_args(Protocol) or not isinstance(values, Mapping):
            raise ConfigError(f"{path}: protocol_overrides must map linear/e2e to config values")
        # validates the keys and types now, not halfway through the grid
        override(base, dict(values), where=f"{path}: protocol_overrides.{protocol}")
    return GridSpec(
        name=str(raw.get("name") or Path(path).stem),
        experiment=str(raw["experiment"]),
        base=base,
        inits={str(k): str(v) for k, v in inits.items()},
        protocols=protocols,
        fractions=fractions,
        draws=draws,
        epochs=epochs,
        protocol_overrides={k: dict(v) for k, v in protocol_overrides.items()},
        heartbeat=build(Heartbeat, _mapping(raw, "heartbeat", str(path)), where=f"{path}: heartbeat"),
        storage=str(raw["storage"]) if raw.get("storage") else None,
    )


__all__ = ["GridSpec", "load_grid"]
