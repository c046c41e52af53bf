"""What ``--plan`` reads from the store: which of a plan's runs are finished. It writes nothing.

A grid cell is finished when its experiment holds a FINISHED fine-tune run with the cell's config hash,
registry aliases pinned to the version they point to now: the rule :func:`mococxr.sweep.grid.run_grid`
skips cells by. A pretraining trial is finished when the backbone's Optuna study (in the storage beside
the MLflow store, where the plan's pretrain stage keeps it) holds a COMPLETE trial at that grid point.
Table 2's inits are the registered trial checkpoints the store holds, placeholders for the others.

A store that does not exist yet is not created (a sqlite file that is absent means nothing is done);
an existing one is opened as every command opens it and only searched.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from mococxr.errors import MococxrError
from mococxr.flows.cost import Line
from mococxr.flows.plan import PaperPlan
from mococxr.tracking import filters as flt
from mococxr.tracking import mlflow as mt


@dataclass
class StoreView:
    """A read-only look at the store a plan writes to (``exists`` False: nothing there yet)."""

    plan: PaperPlan
    tracking_uri: str
    exists: bool
    optuna_storage: str | None = None
    _finished: dict[str, dict[str, str]] = field(default_factory=dict)
    _pins: dict[str, str] = field(default_factory=dict)
    n_done: int = 0
    n_lines: int = 0

    @classmethod
    def open(cls, plan: PaperPlan, tracking_uri: str | None = None) -> StoreView:
        uri = mt.resolve_tracking_uri(tracking_uri)
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
            return cls(plan, uri, exists=False)
        return cls(plan, uri, exists=True, optuna_storage=mt.open_store(uri).optuna_storage)

    def describe(self) -> str:
        where = f"store {self.tracking_uri}"
        if not self.exists:
            return f"{where} does not exist yet: every run is to do (--plan created nothing)"
        return f"{where} (read only): {self.n_done} of {self.n_lines} runs finished"

    # -- grid cells ---------------------------------------------------------------------------------
    def pin(self, init: str) -> str:
        """``init`` with a registry alias pinned to its version now (unchanged when it cannot be)."""
        from mococxr.sweep.grid import pin_init

        if init not in self._pins:
            try:
                self._pins[init] = pin_init(init) if self.exists else init
            except MococxrError:  # no such registered model or alias yet: no run can have used it
                self._pins[init] = init
        return self._pins[init]

    def finished(self, experiment: str) -> dict[str, str]:
        from mococxr.tracking.runs import finished_hashes

        if experiment not in self._finished:
            self._finished[experiment] = finished_hashes(experiment) if self.exists else {}
        return self._finished[experiment]

    def cell_done(self, experiment: str, cfg) -> bool:
        from mococxr.config import config_hash

        return config_hash(replace(cfg, init=self.pin(cfg.init))) in self.finished(experiment)

    def table2_inits(self, backbone: str, n: int) -> dict[str, str]:
        """Table 2's inits: label -> ``models:/NAME/VERSION`` of each registered trial checkpoint of the
        backbone's study (labelled as the table2 stage labels them), placeholders up to ``n``."""
        name = self.plan.registered_model(backbone)
        inits: dict[str, str] = {}
        if self.exists:
            from mlflow.tracking import MlflowClient

            from mococxr.flows.stages import trial_label

            study = self.plan.study_name(backbone)
            versions = [
                v
                for v in MlflowClient().search_model_versions(flt.equal("name", name))
                if v.tags.get(mt.tag("optuna_study")) == study
            ]
            for v in sorted(versions, key=lambda v: int(v.tags.get(mt.tag("optuna_trial"), "0"))):
                t = v.tags
                label = trial_label(
                    float(t.get(mt.tag("lr"), "nan")),
                    t.get(mt.tag("scheduler")),
                    t.get(mt.tag("optuna_trial")),
                )
                inits[label] = f"models:/{name}/{v.version}"
        for i in range(len(inits) + 1, n + 1):
            inits[f"trial {i} (not registered)"] = f"models:/{name}/pending-{i}"
        return inits

    # -- pretraining trials ---------------------------------------------------------------------------
    def complete_trials(self, study_name: str) -> list[dict]:
        """The params of the study's COMPLETE trials ([] when the study or its storage does not exist)."""
        url = self.optuna_storage
        if not self.exists or url is None:
            return []
        if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
            return []
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study = optuna.load_study(study_name=study_name, storage=url)
        except KeyError:  # no such study yet
            return []
        return [
            dict(t.params)
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        ]

    # -- marking ------------------------------------------------------------------------------------
    def mark(self, lines: list[Line]) -> None:
        """Set ``done`` on every line the store holds finished."""
        trials: dict[str, list] = {}
        for line in lines:
            kind, where, what = line.key
            if kind == "cell":
                line.done = self.cell_done(where, what)
            else:
                left = trials.setdefault(where, self.complete_trials(where))
                match = (
                    next((p for p in left if p == what), None)
                    if isinstance(what, dict)
                    else (left[0] if left else None)
                )
                if match is not None:
                    left.remove(match)
                    line.done = True
        self.n_lines, self.n_done = len(lines), sum(ln.done for ln in lines)


__all__ = ["StoreView"]
