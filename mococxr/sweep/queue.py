"""One work queue for every kind of work: Optuna's RDB storage (sqlite on one machine, PostgreSQL for many).

A *queue* is an Optuna study whose trials are fixed items of work: a grid's cells, a plan's one-off steps
(registering checkpoints, promoting, building a report). Workers on any number of machines share it
through the database's transactions, so no coordination rests on sleeps or clocks:

- **Enqueued once.** :func:`open_study` decides who sets a study up by the database's unique study
  name: the worker whose ``create_study`` succeeds runs the setup (e.g. creates the MLflow parent run),
  enqueues every item and then marks the study ``ready``; everyone else loads it and waits for the
  mark. A creator that dies before marking is noticed after the heartbeat grace period, and the first
  worker to notice finishes the setup (only what is missing).
- **Popped atomically.** :meth:`WorkQueue.pop` moves a WAITING trial to RUNNING in one row-locked
  transaction (``SELECT ... FOR UPDATE`` on PostgreSQL, sqlite's single writer); a worker that loses
  the race moves on to the next trial.
- **Leased, not owned forever.** The popping worker records an Optuna heartbeat every
  ``heartbeat.interval`` seconds. A worker that dies stops beating; after the grace period whoever
  looks next (:func:`optuna.storages.fail_stale_trials`, run before every pop and while waiting)
  marks its trial FAIL, ``on_stale`` marks its MLflow run FAILED, and
  :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback` queues a copy with the same item.
- **One live trial per item.** A popped trial works only if it is the lowest-numbered trial of its
  item that did not fail; a higher-numbered copy (left by a setup finished after a crash) is closed
  at once as PRUNED with ``duplicate_of``. So an item is never worked twice at the same time.

The MLflow run stays the record of a result; the trial is only the lease on the work. A finished
item's trial is COMPLETE, its value the item's score (a cell's test AUC, so optuna-dashboard plots a
grid's progress like a study's) and its user attr ``mlflow_run_id`` the run that holds the result.
"""

from __future__ import annotations

import random
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from mococxr.errors import ConfigError
from mococxr.sweep.spec_common import Heartbeat
from mococxr.sweep.storage import rdb_storage
from mococxr.tracking.mlflow import owner_id

READY = "ready"  # study user attr: set up and enqueued
LIVE = (TrialState.WAITING, TrialState.RUNNING)


@dataclass(frozen=True)
class Item:
    """One piece of work: ``key`` is unique in its queue (a cell's config hash); ``params`` are what
    optuna-dashboard shows for it (strings, numbers or booleans)."""

    key: str
    params: Mapping[str, Any] = field(default_factory=dict)


def fail_stale(study: optuna.Study) -> None:
    """Optuna's dead-worker check: RUNNING trials without a heartbeat for the grace period become FAIL
    (and are queued again by the storage's retry callback)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def open_study(
    name: str,
    storage: optuna.storages.RDBStorage,
    *,
    grace: float,
    setup: Callable[[optuna.Study, bool], None],
    ready: Callable[[optuna.Study], bool] | None = None,
    say: Callable[[str], None] = print,
    **create: Any,
) -> optuna.Study:
    """Create the study ``name`` and run ``setup(study, False)``, or load it and wait until its creator
    marked it ready. ``ready(study)`` says whether a study made before the mark existed counts as ready
    (e.g. it has a parent run).

    A creator that makes no progress for ``grace`` seconds (no new trial, no new attribute: it died) is
    replaced by one repairer, chosen the way the creator was (the unique study name ``<name>.repair``),
    which runs ``setup(study, True)``: that must do only what is missing. Measured (benchmarks/queue_scale):
    filling a 600-item queue takes 15-40 s on a busy machine, so progress, not the time since the start,
    tells a slow creator from a dead one; before this, 31 joiners of 32 re-ran the setup at once."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = optuna.create_study(study_name=name, storage=storage, load_if_exists=False, **create)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, **_load_args(create))
    else:
        setup(study, False)
        study.set_user_attr(READY, True)
        return study
    said, seen, since = False, None, time.monotonic()
    while not ((attrs := study.user_attrs).get(READY) or (ready is not None and ready(study))):
        progress = sorted((k, str(v)[:100]) for k, v in attrs.items())  # one small query, unlike the trials
        if progress != seen:
            seen, since = progress, time.monotonic()
        elif time.monotonic() - since > grace:
            if _won_repair(name, storage):
                say(f"{name}: its creator stopped setting it up (dead?); finishing the setup here")
                setup(study, True)
                study.set_user_attr(READY, True)
                break
            since = time.monotonic()  # another worker repairs it: wait for its progress
        if not said:
            say(f"{name}: another worker is setting it up; waiting for it")
            said = True
        time.sleep(1.0)
    return study


def _won_repair(name: str, storage: optuna.storages.RDBStorage) -> bool:
    """Whether this worker is the one to finish a dead creator's setup (first to create the marker study)."""
    try:
        optuna.create_study(study_name=f"{name}.repair", storage=storage, load_if_exists=False)
    except optuna.exceptions.DuplicatedStudyError:
        return False
    return True


def _load_args(create: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in create.items() if k in ("sampler", "pruner")}


def name_value(study: optuna.Study, metric: str) -> None:
    """Name the study's objective ``metric`` where optuna-dashboard shows it (instead of "Objective 0")."""
    with warnings.catch_warnings():  # experimental before Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([metric])


class WorkQueue:
    """A queue of :class:`Item` s in an Optuna study (see the module docstring)."""

    def __init__(self, study: optuna.Study, heartbeat: Heartbeat) -> None:
        self.study = study
        self.heartbeat = heartbeat

    @classmethod
    def open(
        cls,
        name: str,
        storage_url: str,
        items: Sequence[Item],
        *,
        heartbeat: Heartbeat,
        setup: Callable[[], Mapping[str, Any]] | None = None,
        on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
        say: Callable[[str], None] = print,
        metric: str = "test/auc",
    ) -> WorkQueue:
        """Open (create and fill, or join) the queue ``name``. ``setup()`` runs once, for the worker that
        creates it, and returns study user attrs (e.g. the MLflow parent run id). Items that failed
        for good on an earlier call are queued again, so a re-run retries them. ``metric`` names a
        finished item's value in optuna-dashboard (a grid cell's test AUC)."""
        keys = [i.key for i in items]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"queue {name}: two items share a key")
        storage = rdb_storage(storage_url, heartbeat, on_stale=on_stale)

        def fill(study: optuna.Study, repair: bool) -> None:
            name_value(study, metric)
            attrs = study.user_attrs
            if setup is not None and not (repair and attrs.get("setup_done")):
                for k, v in setup().items():
                    study.set_user_attr(k, v)
                study.set_user_attr("setup_done", True)
            study.set_user_attr("n_items", len(items))
            study.set_user_attr("choices", _choices(items))
            if repair:
                study.set_user_attr("repaired", True)  # copies of items may exist: pop checks for them
            have = {t.user_attrs.get("key") for t in study.get_trials(deepcopy=False)} if repair else set()
            for n, item in enumerate(items, 1):
                if item.key not in have:
                    study.enqueue_trial(dict(item.params), user_attrs={"key": item.key})
                if n % 25 == 0:  # a sign of life that joiners can read cheaply (see open_study)
                    study.set_user_attr("enqueued", n)

        study = open_study(name, storage, grace=heartbeat.grace, setup=fill, say=say, direction="maximize")
        queue = cls(study, heartbeat)
        queue._choices = _choices(items)
        queue._requeue_failed(items)
        return queue

    @property
    def name(self) -> str:
        return self.study.study_name

    @property
    def attrs(self) -> dict[str, Any]:
        return self.study.user_attrs

    # -- state ----------------------------------------------------------------------------------------
    def trials(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def items(self) -> dict[str, FrozenTrial]:
        """key -> the trial that stands for the item: a COMPLETE one, else a live one, else the last FAIL."""
        out: dict[str, FrozenTrial] = {}
        rank = {TrialState.COMPLETE: 3, TrialState.RUNNING: 2, TrialState.WAITING: 1, TrialState.FAIL: 0}
        for t in sorted(self.trials(), key=lambda t: t.number):
            key = t.user_attrs.get("key")
            if key is None or "duplicate_of" in t.user_attrs or t.state not in rank:
                continue
            held = out.get(key)
            if held is None or rank[t.state] > rank[held.state] or (rank[t.state] == rank[held.state] == 0):
                out[key] = t
        return out

    def counts(self) -> dict[str, int]:
        """Items by state (``complete``, ``running``, ``waiting``, ``fail``), the whole queue's."""
        states = [t.state.name.lower() for t in self.items().values()]
        return {s: states.count(s) for s in ("complete", "running", "waiting", "fail")}

    def _requeue_failed(self, items: Sequence[Item]) -> None:
        stand = self.items()
        for item in items:
            t = stand.get(item.key)
            if t is not None and t.state == TrialState.FAIL:
                self.study.enqueue_trial(
                    dict(item.params), user_attrs={"key": item.key, "retry_of": t.number}
                )

    # -- work -----------------------------------------------------------------------------------------
    def pop(self) -> Lease | None:
        """The next item for this worker, leased (heartbeat running), or ``None`` when none is waiting."""
        fail_stale(self.study)
        storage, sid = self.study._storage, self.study._study_id
        waiting = sorted(
            storage.get_all_trials(sid, deepcopy=False, states=(TrialState.WAITING,)), key=lambda t: t.number
        )
        lost = 0
        while waiting:
            # the lowest number first; after a lost race a random other one, so that many workers do not
            # all queue on the same row lock (benchmarks/queue_scale)
            t = waiting.pop(random.randrange(len(waiting)) if lost else 0)
            try:
                if not storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                    lost += 1
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                lost += 1
                continue
            lease = Lease(self, t._trial_id, t.number, t.user_attrs.get("key", ""), dict(t.system_attrs))
            lease.start()
            first = self._first_live(lease) if self._may_have_copies(t) else None
            if first is not None:
                lease.close_duplicate(first)
                continue
            return lease
        return None

    def _may_have_copies(self, t: FrozenTrial) -> bool:
        """Whether another trial of ``t``'s item can exist: ``t`` is a retry or re-run copy, or the queue's
        setup was finished by a repairer. An item's first trial in an unrepaired queue has none, which
        spares every pop a read of the whole queue (benchmarks/queue_scale: 0.76 s at 600 items)."""
        return bool(
            "failed_trial" in t.system_attrs or "retry_of" in t.user_attrs or self.attrs.get("repaired")
        )

    def _first_live(self, lease: Lease) -> FrozenTrial | None:
        """Another trial of the lease's item that goes first: a COMPLETE one, or a lower-numbered live one."""
        for t in sorted(self.trials(), key=lambda t: t.number):
            if t.number == lease.number or t.user_attrs.get("key") != lease.key:
                continue
            if "duplicate_of" in t.user_attrs:
                continue
            if t.state == TrialState.COMPLETE or (t.state in LIVE and t.number < lease.number):
                return t
        return None

    def wait(self, say: Callable[[str], None] = print, what: str = "item") -> bool:
        """The barrier: ``True`` once no item of the queue is waiting or running in any worker; ``False`` as
        soon as an item waits for a worker (a dead worker's item queued again): pop it, then wait again."""
        said, settled = None, False
        while True:
            fail_stale(self.study)
            items = self.items().values()
            live = [t for t in items if t.state in LIVE]
            if not live:
                # a lease just failed as dead gets its copy a moment after the FAIL (two writes in optuna's
                # fail_stale_trials): look once more before calling it done (benchmarks/queue_scale)
                if settled or not any(
                    t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs for t in items
                ):
                    return True
                settled = True
                time.sleep(1.0)
                continue
            if any(t.state == TrialState.WAITING for t in live):
                return False
            who = sorted({t.user_attrs.get("worker", "?") for t in live if t.state == TrialState.RUNNING})
            line = (
                f"{self.name}: waiting for {len(live)} {what}(s) running in other workers"
                f" ({', '.join(who) or 'not started yet'})"
            )
            if line != said:
                say(line)
                said = line
            time.sleep(min(self.heartbeat.interval, 5))


def _choices(items: Sequence[Item]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for item in items:
        for k, v in item.params.items():
            if v not in out.setdefault(k, []):
                out[k].append(v)
    return out


class Lease:
    """One popped item: its trial is RUNNING and beats until :meth:`done`, :meth:`failed` or
    :meth:`requeue` ends it."""

    def __init__(self, queue: WorkQueue, trial_id: int, number: int, key: str, system_attrs: dict) -> None:
        self.queue, self.trial_id, self.number, self.key = queue, trial_id, number, key
        self.retry_of = system_attrs.get("failed_trial")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def storage(self) -> optuna.storages.RDBStorage:
        return self.queue.study._storage

    def start(self) -> None:
        self.storage.record_heartbeat(self.trial_id)
        self.storage.set_trial_user_attr(self.trial_id, "worker", owner_id())
        self._set_params()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.number}", daemon=True)
        self._thread.start()

    def _set_params(self) -> None:
        """Show the item's fixed params on the trial, as a study's trial shows its drawn ones."""
        trial = self.storage.get_trial(self.trial_id)
        if trial.params:
            return
        choices = getattr(self.queue, "_choices", None) or self.queue.attrs.get("choices", {})
        for name, value in trial.system_attrs.get("fixed_params", {}).items():
            dist = CategoricalDistribution(choices.get(name) or [value])
            self.storage.set_trial_param(self.trial_id, name, dist.to_internal_repr(value), dist)

    def _beat(self) -> None:
        while not self._stop.wait(self.queue.heartbeat.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # noqa: BLE001 - a missed beat only makes the lease look older
                pass

    def still_held(self) -> bool:
        """Renew the lease and say whether it is still ours: after this beat nobody can judge this worker
        dead for the grace period. ``False``: it was judged dead (a pause longer than the grace period)
        and its copy stands for the item now."""
        try:
            self.storage.record_heartbeat(self.trial_id)
        except Exception:  # noqa: BLE001 - the state below is what decides
            pass
        return self.storage.get_trial(self.trial_id).state == TrialState.RUNNING

    def _end(self, state: TrialState, values: list[float] | None = None, **attrs: Any) -> bool:
        """End the trial; ``False`` if it had been failed meanwhile (judged dead), when nothing is written."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            for k, v in attrs.items():
                self.storage.set_trial_user_attr(self.trial_id, k, v)
            self.storage.set_trial_state_values(self.trial_id, state=state, values=values)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False  # judged dead meanwhile (a very long pause): the retry copy stands for the item
        return True

    def done(self, value: float | None, run_id: str, **attrs: Any) -> bool:
        """The item is finished; ``run_id`` holds its result. ``False``: the lease had been lost."""
        v = value if value is not None and value == value else 0.0
        return self._end(TrialState.COMPLETE, [float(v)], mlflow_run_id=run_id, **attrs)

    def failed(self, reason: str) -> None:
        """The item failed (an error in its work): FAIL, not retried until the queue is opened again."""
        self._end(TrialState.FAIL, fail_reason=reason[:500])

    def requeue(self, reason: str) -> None:
        """This worker stops (Ctrl-C, SIGTERM): FAIL, and a copy is queued now for the next worker."""
        if not self._end(TrialState.FAIL, fail_reason=reason[:500]):
            return  # failed as dead before: its retry is queued already
        frozen = self.storage.get_trial(self.trial_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)(self.queue.study, frozen)

    def close_duplicate(self, first: FrozenTrial) -> None:
        self._end(TrialState.PRUNED, duplicate_of=first.number)


def run_each(
    name: str,
    storage_url: str,
    works: Mapping[str, Callable[[], Mapping[str, Any]]],
    *,
    heartbeat: Heartbeat,
    say: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Do each of ``works`` (key -> function) exactly once among every worker that calls this with the same
    ``name``, spreading them over the workers, and return every result (JSON values) to all of them once
    all are done: promoting a checkpoint or building a report happens once however many workers reach
    that step. A worker that dies in one is replaced after the grace period; an error in one is raised
    by the worker that met it and, as one line naming it, by every worker waiting for it."""
    queue = WorkQueue.open(
        name, storage_url, [Item(k) for k in works], heartbeat=heartbeat, say=say, metric="done (no score)"
    )
    while (lease := queue.pop()) is not None or not queue.wait(say, what="step"):
        if lease is None:
            continue  # an item came back (its worker died): pop it
        try:
            result = dict(works[lease.key]())
        except KeyboardInterrupt:
            lease.requeue("interrupted (Ctrl-C or SIGTERM); queued again")
            raise
        except Exception as exc:
            lease.failed(f"{type(exc).__name__}: {exc}")
            raise
        lease.done(None, run_id=str(result.get("run_id", "")), result=result)
    stands = queue.items()
    for key in works:
        t = stands.get(key)
        if t is None or t.state != TrialState.COMPLETE:
            reason = "" if t is None else t.user_attrs.get("fail_reason", "")
            worker = "another worker" if t is None else t.user_attrs.get("worker", "another worker")
            step = name if key == "once" else f"{name} ({key})"
            raise ConfigError(f"{step}: failed in {worker}: {reason}; run the command again to retry it")
    return {key: dict(stands[key].user_attrs.get("result", {})) for key in works}


def run_once(
    name: str,
    storage_url: str,
    work: Callable[[], Mapping[str, Any]],
    *,
    heartbeat: Heartbeat,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """:func:`run_each` with one piece of work: done once, its result returned to every worker."""
    return run_each(name, storage_url, {"once": work}, heartbeat=heartbeat, say=say)["once"]


__all__ = ["Item", "Lease", "WorkQueue", "fail_stale", "name_value", "open_study", "run_each", "run_once"]
