"""The paper's fine-tune grid in one command: inits x protocols x label fractions x draws.

A grid is a YAML file (see ``sweeps/finetune_grid.yaml``)::

    experiment: mococxr-chexpert-effusion
    base:                      # a FinetuneConfig mapping shared by every run
      data: {dataset: chexpert, root: data/CheXpert, test_csv: CheXpert-v1.0-small/valid.csv}
      backbone: resnet18
    inits: {random: random, imagenet: imagenet, moco: "models:/mococxr-resnet18@production"}
    protocols: [linear, e2e]
    fractions: [0.001, 0.01, 0.1, 1.0]
    draws: {0.001: 5, 0.01: 5, 0.1: 3, 1.0: 1}   # or one number for every fraction

All runs hang under one parent run. Re-running is idempotent: a run whose config hash matches a
FINISHED run of the experiment is skipped, failed ones are redone. Registry references such as
``models:/NAME@production`` are pinned to a version before hashing, so promoting a new checkpoint
makes new runs instead of silently reusing old ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from mococxr.config import FinetuneConfig, build, config_hash, load_yaml, override
from mococxr.errors import ConfigError
from mococxr.tracking import mlflow as mt

GRID_KEYS = {"experiment", "base", "inits", "protocols", "fractions", "draws", "name", "epochs",
             "protocol_overrides"}


@dataclass
class GridSpec:
    name: str
    experiment: str
    base: FinetuneConfig
    inits: dict[str, str]
    protocols: list[str]
    fractions: list[float]
    draws: dict[float, int]
    epochs: dict[float, int] = field(default_factory=dict)  # fraction -> epochs; absent: the paper's rule
    protocol_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {linear: {lr: 1e-3}}

    def configs(self) -> list[tuple[str, FinetuneConfig]]:
        """Every (init label, config) of the grid, small fractions first."""
        out = []
        for fraction, (label, init), protocol in itertools.product(
            self.fractions, self.inits.items(), self.protocols
        ):
            for draw in range(self.draws[fraction]):
                values = {"init": init, "protocol": protocol, "fraction": fraction, "draw": draw,
                          "experiment": self.experiment, "epochs": self.epochs.get(fraction),
                          **self.protocol_overrides.get(protocol, {})}
                out.append((label, override(self.base, values)))
        return out


def load_grid(path: str | Path, overrides: dict[str, Any] | None = None) -> GridSpec:
    """Read and validate a grid YAML; ``overrides`` are dotted FinetuneConfig keys (``data.root``)."""
    raw = load_yaml(path)
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(GRID_KEYS))}")
    for key in ("experiment", "inits", "protocols", "fractions"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key {key!r}")
    base = build(FinetuneConfig, raw.get("base") or {}, where=f"{path}: base")
    base = override(base, overrides or {})
    inits = raw["inits"]
    if isinstance(inits, list):
        inits = {str(i): str(i) for i in inits}
    if not isinstance(inits, dict) or not inits:
        raise ConfigError(f"{path}: inits must be a mapping label -> init (random, imagenet, a URI)")
    protocols = [str(p) for p in raw["protocols"]]
    bad = [p for p in protocols if p not in ("linear", "e2e")]
    if bad:
        raise ConfigError(f"{path}: protocols: unknown {bad}; use linear and/or e2e")
    try:
        fractions = sorted(float(f) for f in raw["fractions"])
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: fractions must be numbers in (0, 1]") from None
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ConfigError(f"{path}: fractions must be numbers in (0, 1], got {raw['fractions']}")
    draws_raw = raw.get("draws", 1)
    if isinstance(draws_raw, dict):
        draws = {float(k): int(v) for k, v in draws_raw.items()}
        missing = [f for f in fractions if f not in draws]
        if missing:
            raise ConfigError(f"{path}: draws gives no count for fraction(s) {missing}")
    else:
        draws = {f: int(draws_raw) for f in fractions}
    if any(v < 1 for v in draws.values()):
        raise ConfigError(f"{path}: draws must be at least 1")
    epochs_raw = raw.get("epochs") or {}
    if not isinstance(epochs_raw, dict):
        epochs_raw = dict.fromkeys(fractions, epochs_raw)
    epochs = {float(k): int(v) for k, v in epochs_raw.items()}
    overrides_raw = raw.get("protocol_overrides") or {}
    if not isinstance(overrides_raw, dict) or any(p not in ("linear", "e2e") for p in overrides_raw):
        raise ConfigError(f"{path}: protocol_overrides must map linear/e2e to config values")
    for values in overrides_raw.values():
        override(base, dict(values))  # validates the keys and types now, not halfway through the grid
    return GridSpec(
        name=str(raw.get("name") or Path(path).stem), experiment=str(raw["experiment"]), base=base,
        inits={str(k): str(v) for k, v in inits.items()}, protocols=protocols, fractions=fractions,
        draws=draws, epochs=epochs, protocol_overrides={k: dict(v) for k, v in overrides_raw.items()},
    )


def pin_init(init: str) -> str:
    """``models:/NAME@alias`` (or ``/Stage``) -> ``models:/NAME/<version>`` it points to now."""
    if not init.startswith("models:/"):
        return init
    from mococxr.tracking.registry import canonical_uri, version_info

    info = version_info(canonical_uri(init))
    if info.get("registry_version"):
        return f"models:/{info['registered_model']}/{info['registry_version']}"
    return init


@dataclass
class GridResult:
    parent_run_id: str
    run_ids: list[str] = field(default_factory=list)
    started: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)


def finished_hashes(experiment: str) -> dict[str, str]:
    """config hash -> run id of the FINISHED fine-tune runs of an experiment."""
    exp = MlflowClient().get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = mlflow.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{mt.tag('kind')}` = 'finetune' and attributes.status = 'FINISHED'",
        output_format="list",
    )
    return {r.data.tags.get(mt.tag("config_hash"), ""): r.info.run_id for r in runs}


def _parent_run(spec: GridSpec, spec_hash: str) -> str:
    """Find or create the grid's parent run (one per grid name and spec)."""
    exp_id = mt.ensure_experiment(spec.experiment)
    found = mlflow.search_runs(
        [exp_id], filter_string=f"tags.`{mt.tag('kind')}` = 'grid' and tags.`{mt.tag('config_hash')}` = '{spec_hash}'",
        output_format="list",
    )
    if found:
        return found[0].info.run_id
    client = MlflowClient()
    run = client.create_run(exp_id, run_name=f"grid-{spec.name}",
                            tags={**mt.tags(kind="grid", config_hash=spec_hash, dataset=spec.base.data.dataset,
                                            task=spec.base.data.task, backbone=spec.base.backbone)})
    client.log_dict(run.info.run_id, {"inits": spec.inits, "protocols": spec.protocols,
                                      "fractions": spec.fractions, "draws": spec.draws}, "grid.json")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def run_grid(spec: GridSpec, *, dry_run: bool = False, progress: bool = True) -> GridResult:
    """Run every missing cell of the grid; returns what ran, what was skipped and what failed."""
    from mococxr.train.data import split_records
    from mococxr.train.finetune import finetune

    mt.configure()
    pinned = {label: pin_init(init) for label, init in spec.inits.items()}
    spec = dataclasses.replace(spec, inits=pinned)
    jobs = spec.configs()
    parent = _parent_run(spec, _sha(spec.name + ":" + ",".join(config_hash(c) for _, c in jobs)))
    done = finished_hashes(spec.experiment)
    result = GridResult(parent_run_id=parent)
    splits = None
    for i, (label, cfg) in enumerate(jobs, 1):
        h = config_hash(cfg)
        head = f"[{i}/{len(jobs)}] {label:>8} {cfg.protocol:>6} fraction {cfg.fraction:g} draw {cfg.draw}"
        if h in done:
            result.skipped += 1
            result.run_ids.append(done[h])
            print(f"{head}: finished before (run {done[h][:8]}), skipped", flush=True)
            continue
        if dry_run:
            print(f"{head}: would run", flush=True)
            continue
        if splits is None:
            splits = split_records(spec.base.data)  # one split for the whole grid: one test set
        t0 = time.perf_counter()
        try:
            # the grid's own label (random, imagenet, moco, ...) is what the report groups by
            res = finetune(cfg, splits=splits, parent_run_id=parent, progress=progress,
                           extra_tags=mt.tags(grid=spec.name, init=label))
        except Exception as exc:  # one failed cell must not lose the others; re-running redoes it
            result.failed.append(f"{head}: {exc.__class__.__name__}: {exc}")
            print(f"{head}: FAILED ({exc})", flush=True)
            continue
        result.started += 1
        result.run_ids.append(res.run_id)
        auc = res.test.get("test/auc", float("nan"))
        print(f"{head}: test AUC {auc:.4f} (best epoch {res.best_epoch}, {time.perf_counter() - t0:.0f} s)",
              flush=True)
    return result


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
