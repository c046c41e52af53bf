"""The work queue (sweep/queue.py): items enqueued once, popped atomically, leases that die are retried,
copies of an item never run it twice. Real worker processes on one sqlite Optuna database."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mococxr.sweep.queue import Item, WorkQueue, open_study
from mococxr.sweep.spec_common import Heartbeat
from mococxr.sweep.storage import rdb_storage

FAST = Heartbeat(interval=1, grace_period=3, max_retry=2)
ITEMS = [Item(f"k{i:02d}", {"i": i, "half": i % 2}) for i in range(24)]


def _worker(url: str, log: str, go, work_s: float = 0.02, die_after: int | None = None) -> None:
    """Open the queue, drain it, record each item worked in ``log`` (one line per item and worker)."""
    go.wait()
    queue = WorkQueue.open("q", url, ITEMS, heartbeat=FAST, say=lambda _: None)
    n = 0
    while (lease := queue.pop()) is not None:
        with open(log, "a") as f:
            f.write(f"{lease.key} {os.getpid()}\n")
        if die_after is not None and n == die_after:
            os._exit(9)  # killed mid-item: no goodbye to the queue
        time.sleep(work_s)
        lease.done(1.0, run_id=f"run-{lease.key}")
        n += 1
    queue.wait(say=lambda _: None)


def _start(n: int, url: str, log: Path, **kw) -> list[mp.Process]:
    ctx = mp.get_context("fork")
    go = ctx.Event()
    procs = [ctx.Process(target=_worker, args=(url, str(log), go), kwargs=kw) for _ in range(n)]
    for p in procs:
        p.start()
    go.set()  # all open the queue at the same instant
    return procs


def _study(url: str) -> optuna.Study:
    return optuna.load_study(study_name="q", storage=rdb_storage(url, FAST))


def test_four_workers_enqueue_once_and_work_each_item_once(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    log = tmp_path / "worked.txt"
    procs = _start(4, url, log)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    worked = [line.split()[0] for line in log.read_text().splitlines()]
    assert sorted(worked) == [i.key for i in ITEMS]  # every item once, none twice
    assert len({line.split()[1] for line in log.read_text().splitlines()}) > 1  # shared out
    trials = _study(url).get_trials()
    assert len(trials) == len(ITEMS)  # enqueued exactly once although four workers opened it together
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.params["i"] for t in trials} == set(range(24))  # the dashboard shows each item's params
    assert all(t.user_attrs["mlflow_run_id"] == f"run-{t.user_attrs['key']}" for t in trials)


def test_a_killed_worker_s_item_is_retried_by_another_and_done_once(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    log = tmp_path / "worked.txt"
    stale: list[int] = []
    dying = _start(1, url, log, die_after=2, work_s=0.05)
    dying[0].join(60)
    assert dying[0].exitcode == 9
    queue = WorkQueue.open(
        "q", url, ITEMS, heartbeat=FAST, say=lambda _: None, on_stale=lambda study, t: stale.append(t.number)
    )
    time.sleep(FAST.grace + 1)
    while (lease := queue.pop()) is not None:
        with open(log, "a") as f:
            f.write(f"{lease.key} {os.getpid()}\n")
        lease.done(1.0, run_id="x")
    assert len(stale) == 1  # the dead worker's lease, found by its missing heartbeat
    items = queue.items()
    assert len(items) == len(ITEMS) and all(t.state == TrialState.COMPLETE for t in items.values())
    worked = [line.split()[0] for line in log.read_text().splitlines()]
    died_on = worked[2]
    assert worked.count(died_on) == 2 and all(worked.count(k) == 1 for k in set(worked) - {died_on})
    assert queue.counts() == {"complete": 24, "running": 0, "waiting": 0, "fail": 0}


def test_a_copy_of_an_item_never_runs_it_twice(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    queue = WorkQueue.open("q", url, ITEMS[:2], heartbeat=FAST, say=lambda _: None)
    queue.study.set_user_attr("repaired", True)  # as a repairer of a dead creator's setup marks it
    queue.study.enqueue_trial({"i": 0, "half": 0}, user_attrs={"key": "k00"})  # a repair's duplicate
    first = queue.pop()
    second = queue.pop()
    assert (first.key, second.key) == ("k00", "k01")
    assert queue.pop() is None  # the copy of k00 was closed as a duplicate of the live lease
    dup = [t for t in queue.trials() if "duplicate_of" in t.user_attrs]
    assert len(dup) == 1 and dup[0].state == TrialState.PRUNED and dup[0].user_attrs["duplicate_of"] == 0
    first.done(0.5, "a")
    second.done(0.5, "b")


def test_failed_items_run_again_when_the_queue_is_opened_again(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    queue = WorkQueue.open("q", url, ITEMS[:3], heartbeat=FAST, say=lambda _: None)
    leases = [queue.pop() for _ in range(3)]
    leases[0].failed("ValueError: boom")
    leases[1].done(0.7, "r1")
    leases[2].requeue("interrupted")  # Ctrl-C: a copy waits at once
    assert queue.counts() == {"complete": 1, "running": 0, "waiting": 1, "fail": 1}
    again = WorkQueue.open("q", url, ITEMS[:3], heartbeat=FAST, say=lambda _: None)
    assert again.counts() == {"complete": 1, "running": 0, "waiting": 2, "fail": 0}
    keys = sorted(lease.key for lease in iter(again.pop, None))
    assert keys == ["k00", "k02"]


def test_a_study_whose_creator_died_before_setting_it_up_is_set_up_by_the_next(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    storage = rdb_storage(url, FAST)
    optuna.create_study(study_name="half-made", storage=storage)  # created, never marked ready
    said: list[str] = []
    made: list[bool] = []
    t0 = time.monotonic()
    study = open_study(
        "half-made", storage, grace=1.0, setup=lambda s, repair: made.append(repair), say=said.append
    )
    assert made == [True] and study.user_attrs["ready"] is True
    assert time.monotonic() - t0 < 10 and "stopped setting it up" in said[-1]


@pytest.mark.parametrize("n", [0, 1])
def test_an_empty_or_tiny_queue_returns_at_once(tmp_path, n):
    queue = WorkQueue.open("q", f"sqlite:///{tmp_path}/o.db", ITEMS[:n], heartbeat=FAST, say=lambda _: None)
    got = [lease for lease in iter(queue.pop, None)]
    assert len(got) == n
    for lease in got:
        lease.done(None, "r")
    queue.wait(say=lambda _: None)


def _once_worker(url: str, log: str, go) -> None:
    from mococxr.sweep.queue import run_once

    go.wait()

    def work() -> dict:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        return {"version": "3", "pid": os.getpid()}

    result = run_once("promote", url, work, heartbeat=FAST, say=lambda _: None)
    with open(log + ".seen", "a") as f:
        f.write(f"{result['version']} {result['pid']}\n")


def test_a_step_runs_once_among_workers_and_all_get_its_result(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    log = tmp_path / "did.txt"
    ctx = mp.get_context("fork")
    go = ctx.Event()
    procs = [ctx.Process(target=_once_worker, args=(url, str(log), go)) for _ in range(3)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    [did] = log.read_text().split()
    seen = Path(str(log) + ".seen").read_text().splitlines()
    assert seen == [f"3 {did}"] * 3


def _failing_once(url: str, out: str, go, started) -> None:
    from mococxr.sweep.queue import run_once

    def boom() -> dict:
        started.set()
        time.sleep(1.0)
        raise ValueError("no checkpoint")

    go.wait()
    try:
        run_once("step", url, boom, heartbeat=FAST, say=lambda _: None)
    except Exception as exc:  # noqa: BLE001 - what each worker saw is the test's point
        with open(out, "a") as f:
            f.write(f"{type(exc).__name__}: {exc}\n")


def test_a_failed_step_is_an_error_in_every_waiting_worker_and_runs_again_next_time(tmp_path):
    from mococxr.sweep.queue import run_once

    url = f"sqlite:///{tmp_path}/optuna.db"
    out = tmp_path / "errors.txt"
    ctx = mp.get_context("fork")
    go, started = ctx.Event(), ctx.Event()
    first = ctx.Process(target=_failing_once, args=(url, str(out), go, started))
    first.start()
    go.set()
    assert started.wait(30)
    second = ctx.Process(target=_failing_once, args=(url, str(out), go, ctx.Event()))
    second.start()  # joins while the first works on the step: it waits, then sees the failure
    for p in (first, second):
        p.join(60)
    errors = sorted(out.read_text().splitlines())
    assert errors[0].startswith("ConfigError: step: failed in ") and errors[0].endswith(
        "ValueError: no checkpoint; run the command again to retry it"
    )
    assert errors[1] == "ValueError: no checkpoint"  # the worker that ran it raises the error itself
    assert run_once("step", url, lambda: {"ok": 1}, heartbeat=FAST, say=lambda _: None) == {"ok": 1}


def test_only_one_worker_repairs_a_dead_creator_s_setup(tmp_path):
    from mococxr.sweep.queue import _won_repair

    storage = rdb_storage(f"sqlite:///{tmp_path}/optuna.db", FAST)
    assert [_won_repair("q", storage) for _ in range(3)] == [True, False, False]


def _judged_dead(queue: WorkQueue, lease) -> None:
    """What fail_stale does to a lease whose heartbeat stopped: FAIL, and a copy queued."""
    storage = queue.study._storage
    storage.set_trial_state_values(lease.trial_id, state=TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
    retry(queue.study, storage.get_trial(lease.trial_id))


@pytest.mark.parametrize("copy_adopts_ours", [False, True])
def test_a_lease_lost_while_training_leaves_one_finished_run(
    tmp_path, tracking_uri, copy_adopts_ours, capsys
):
    """A live worker judged dead (a pause longer than the grace period) finishes its run after its copy was
    queued: its done() reports the loss instead of raising, and the grid keeps exactly one FINISHED run."""
    from mlflow.tracking import MlflowClient

    from mococxr.sweep.grid import _lease_lost
    from mococxr.tracking import mlflow as mt

    mt.open_store()
    queue = WorkQueue.open("q", f"sqlite:///{tmp_path}/o.db", ITEMS[:1], heartbeat=FAST, say=lambda _: None)
    ours = queue.pop()
    _judged_dead(queue, ours)
    assert not ours.still_held()
    copy = queue.pop()
    assert copy.key == ours.key and copy.retry_of == ours.number
    client = MlflowClient()
    exp = mt.ensure_experiment("lost-lease")
    mine, theirs = (client.create_run(exp).info.run_id for _ in range(2))
    for run_id in (mine, theirs):
        client.set_terminated(run_id, "FINISHED")
    copy.done(
        0.7, mine if copy_adopts_ours else theirs
    )  # the copy adopted our FINISHED run, or trained its own
    assert ours.done(0.6, mine) is False  # no UpdateFinishedTrialError: the loss is reported
    _lease_lost(queue, ours, mine, "[1/1] cell", print)
    assert client.get_run(mine).info.status == ("FINISHED" if copy_adopts_ours else "FAILED")
    assert client.get_run(theirs).info.status == "FINISHED"
    assert queue.counts()["complete"] == 1


def test_a_waiting_worker_takes_the_item_of_a_worker_that_died_meanwhile(tmp_path):
    """benchmarks/queue_scale found this: workers already in the barrier never took the copies of the
    cells whose workers were killed later. wait() now hands such an item back to be popped."""
    queue = WorkQueue.open("q", f"sqlite:///{tmp_path}/o.db", ITEMS[:2], heartbeat=FAST, say=lambda _: None)
    dying = queue.pop()
    dying._stop.set()  # its worker dies: no more heartbeats
    alive = queue.pop()
    alive.done(0.5, "b")
    assert queue.pop() is None
    t0 = time.monotonic()
    assert queue.wait(say=lambda _: None) is False  # after the grace period: the dead worker's item is back
    assert FAST.grace <= time.monotonic() - t0 < 30
    retry = queue.pop()
    assert retry.key == dying.key and retry.retry_of == dying.number
    retry.done(0.6, "a")
    assert queue.wait(say=lambda _: None) is True
    assert queue.counts() == {"complete": 2, "running": 0, "waiting": 0, "fail": 0}
