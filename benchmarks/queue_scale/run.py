"""Scale simulation of the grid work queue: many workers on one PostgreSQL, some of them SIGKILLed.

``--workers`` processes (default 32) run one fine-tune grid of at least ``--cells`` cells (default 600)
through :func:`mococxr.sweep.grid.run_grid`, with the queue (Optuna) and the MLflow store in two
databases of one throwaway PostgreSQL server (``tests/servers.py``). Training is replaced by
:class:`SleepTrainer` (benchmark only): it creates a real MLflow run the way a fine-tune does, sleeps
``--sleep`` seconds inside it and records its timestamps. While the workers drain the queue the driver
SIGKILLs ``--kill-frac`` of them (at least 3) mid-cell at random moments in the first half of the grid,
then checks:

- no duplicates: exactly one FINISHED fine-tune run per cell (config hash), and no two attempts at one
  cell overlapping in time (from the trainer's own timestamps; a killed attempt ends at its kill);
- no lost cells: every cell's queue item COMPLETE, its trial pointing at that FINISHED run; the killed
  workers' cells were retried by other workers; every surviving worker exited 0;

and prints the coordination overhead per cell (for each worker, end of one cell's sleep to start of the
next cell's sleep: MLflow run end + queue done + pop + adoption check + MLflow run start), the wall time,
cells/s and the ideal wall time (cells x sleep / workers). Exits 1 if a check fails, or when no cell
finishes for ``--stall-timeout`` seconds (then it prints the queue's trial counts).

The workers import and open the store first (start-up, timed apart), then all call run_grid at once, so
they race to create the queue; ``--setup-first`` lets one worker create and fill it before the others.

    .venv/bin/python benchmarks/queue_scale/run.py                          # 32 workers, 600 cells
    .venv/bin/python benchmarks/queue_scale/run.py --workers 4 --cells 40   # a quick one
    .venv/bin/python benchmarks/queue_scale/run.py --setup-first --interval 2 --grace 60

Internally the same file is the worker (``--worker``); see README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
EXPERIMENT = "queue-scale"
PROTOCOLS = ["linear", "e2e"]
FRACTIONS = [0.01, 0.1, 1.0]
POLL = 0.05  # seconds between the driver's looks at the workers' records


# -- the benchmark-only trainer --------------------------------------------------------------------------
@dataclass
class SleepResult:
    """What run_grid reads from a trainer's result."""

    run_id: str
    test: dict[str, float]
    best_epoch: int = 0


class SleepTrainer:
    """BENCHMARK ONLY: stands in for :func:`mococxr.train.finetune.finetune` in ``run_grid(train=...)``.

    It creates a real MLflow fine-tune run (tags as a fine-tune's: kind, config_hash, protocol,
    label_fraction, draw, plus run_grid's ``extra_tags``), logs ``test/auc``, sleeps ``sleep`` seconds
    inside the run, and appends to ``path`` (JSONL) a ``start`` record before the sleep and an ``end``
    record once the run is FINISHED, with wall-clock timestamps: ``t_enter`` (called), ``t_start`` /
    ``t_end`` (the sleep), ``t_exit`` (run ended). It never reads ``data``.
    """

    def __init__(self, path: Path, sleep: float) -> None:
        self.path, self.sleep = path, sleep
        self.fh = open(path, "a", buffering=1)

    def _write(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def __call__(self, cfg, *, data, store, parent_run_id, progress, extra_tags) -> SleepResult:
        import mlflow

        from mococxr.config import config_hash
        from mococxr.tracking import mlflow as mt

        t_enter = time.time()
        key = config_hash(cfg)
        tags = {
            **mt.tags(
                kind="finetune",
                config_hash=key,
                protocol=cfg.protocol,
                label_fraction=cfg.fraction,
                draw=cfg.draw,
                backbone=cfg.backbone,
                init=cfg.init,
            ),
            **(extra_tags or {}),
        }
        auc = 0.5 + (int(key[:8], 16) % 10_000) / 20_000  # a fixed fake score per cell
        name = f"sleep-{cfg.protocol}-f{cfg.fraction:g}-d{cfg.draw}"
        with mt.start_run(cfg.experiment, run_name=name, run_tags=tags, parent_run_id=parent_run_id) as run:
            mlflow.log_metric("test/auc", auc)
            rec = {"key": key, "pid": os.getpid(), "run_id": run.info.run_id, "t_enter": t_enter}
            rec["t_start"] = time.time()
            self._write({"ev": "start", **rec})
            time.sleep(self.sleep)
            rec["t_end"] = time.time()
        rec["t_exit"] = time.time()
        self._write({"ev": "end", **rec})
        return SleepResult(run_id=run.info.run_id, test={"test/auc": auc}, best_epoch=0)


# -- the grid ----------------------------------------------------------------------------------------------
def draws_for(cells: int) -> int:
    return max(1, math.ceil(cells / (len(PROTOCOLS) * len(FRACTIONS))))


def build_spec(name: str, draws: int, storage: str, interval: int, grace: int, max_retry: int):
    """1 init x 2 protocols x 3 fractions x ``draws``: every cell a distinct config."""
    from mococxr.config import DataConfig, FinetuneConfig
    from mococxr.sweep.grid_spec import GridSpec
    from mococxr.sweep.spec_common import Heartbeat

    base = FinetuneConfig(data=DataConfig(root="/nonexistent/queue-scale-phantom"), experiment=EXPERIMENT)
    return GridSpec(
        name=name,
        experiment=EXPERIMENT,
        base=base,
        inits={"random": "random"},
        protocols=list(PROTOCOLS),
        fractions=list(FRACTIONS),
        draws=dict.fromkeys(FRACTIONS, draws),
        heartbeat=Heartbeat(interval=interval, grace_period=grace, max_retry=max_retry),
        storage=storage,
    )


# -- a worker ---------------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> int:
    work = Path(args.dir)
    t0 = time.time()
    from mlflow.tracking import MlflowClient

    from mococxr.sweep.grid import run_grid
    from mococxr.tracking import mlflow as mt

    store = mt.open_store()
    MlflowClient().get_experiment_by_name(EXPERIMENT)  # connect now: start-up, not coordination
    spec = build_spec(
        args.grid_name, args.draws, os.environ["QS_OPTUNA_URL"], args.interval, args.grace, args.max_retry
    )
    trainer = SleepTrainer(work / "records" / f"worker-{args.index:03d}.jsonl", args.sleep)
    log = open(work / "logs" / f"worker-{args.index:03d}.say", "a", buffering=1)

    def say(line: str) -> None:
        log.write(f"{time.time():.3f} {line}\n")

    (work / "ready" / f"{args.index:03d}").write_text(json.dumps({"pid": os.getpid(), "t_import": t0}))
    go = (work / "go", work / f"go-{args.index:03d}")
    while not any(g.exists() for g in go):
        time.sleep(0.02)
    t_go = time.time()
    result = run_grid(spec, store=store, train=trainer, progress=False, say=say)
    summary = {
        "pid": os.getpid(),
        "t_go": t_go,
        "t_done": time.time(),
        "started": result.started,
        "skipped": result.skipped,
        "elsewhere": result.elsewhere,
        "failed": result.failed,
        "total": result.total,
        "run_ids": len(result.run_ids),
    }
    (work / "results" / f"worker-{args.index:03d}.json").write_text(json.dumps(summary))
    return 0


# -- the driver -------------------------------------------------------------------------------------------
@dataclass
class Worker:
    index: int
    proc: subprocess.Popen
    t_spawn: float
    t_ready: float | None = None
    killed_at: float | None = None
    killed_key: str | None = None
    open_cell: dict | None = None  # the start record of the cell it is in, if any
    offset: int = 0
    records: list[dict] = field(default_factory=list)


def read_records(w: Worker, path: Path) -> list[dict]:
    """New complete JSONL lines of a worker's record file since the last look."""
    if not path.exists():
        return []
    with open(path, "rb") as fh:
        fh.seek(w.offset)
        chunk = fh.read()
    cut = chunk.rfind(b"\n") + 1
    w.offset += cut
    new = [json.loads(line) for line in chunk[:cut].splitlines() if line.strip()]
    for rec in new:
        w.open_cell = rec if rec["ev"] == "start" else None
    w.records.extend(new)
    return new


def start_postgres(stack, max_connections: int):
    """The throwaway server of tests/servers.py, restarted with room for every worker's connections."""
    sys.path.insert(0, str(REPO / "tests"))
    from servers import postgres

    pg = stack.enter_context(postgres())
    pg.run(
        str(pg.bindir / "psql"),
        "-d",
        "postgres",
        "-c",
        f"ALTER SYSTEM SET max_connections = {max_connections}",
    )
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    ctl = [str(pg.bindir / "pg_ctl"), "-D", str(pg.base / "data"), "-l", str(pg.base / "server.log")]
    subprocess.run(
        [*as_user, *ctl, "-w", "-t", "120", "restart"], check=True, capture_output=True, timeout=180
    )
    for db in ("optuna", "mlflow"):
        pg.create_database(db)
    return pg


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values``, nearest rank."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] if s else float("nan")


def stats_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "median": statistics.median(ms),
        "p99": pct(ms, 0.99),
        "mean": statistics.fmean(ms),
        "max": max(ms),
    }


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def drive(args: argparse.Namespace) -> int:
    import contextlib

    signal.signal(signal.SIGTERM, _interrupt)  # clean up (workers, PostgreSQL) on kill and Ctrl-C,
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background (SIGINT ignored)

    work = Path(args.dir or tempfile.mkdtemp(prefix="queue-scale-"))
    for sub in ("records", "logs", "ready", "results", "artifacts"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    draws = draws_for(args.cells)
    n_cells = draws * len(PROTOCOLS) * len(FRACTIONS)
    n_kill = 0 if args.kill_frac <= 0 else min(args.workers - 1, max(3, round(args.kill_frac * args.workers)))
    print(f"work folder {work}", flush=True)
    print(
        f"{args.workers} workers, {n_cells} cells ({draws} draws x {len(FRACTIONS)} fractions x "
        f"{len(PROTOCOLS)} protocols), sleep {args.sleep} s, {n_kill} to kill; heartbeat every "
        f"{args.interval} s, grace {args.grace} s, max_retry {args.max_retry}",
        flush=True,
    )
    with contextlib.ExitStack() as stack:
        pg = start_postgres(stack, args.max_connections)
        optuna_url = pg.url("optuna", password=pg.password)
        mlflow_url = pg.url("mlflow", password=pg.password)
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": mlflow_url,
            "MOCOCXR_ARTIFACT_ROOT": str(work / "artifacts"),
            "QS_OPTUNA_URL": optuna_url,
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "GIT_PYTHON_REFRESH": "quiet",
        }
        os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "MOCOCXR_ARTIFACT_ROOT")})
        from mococxr.sweep.spec_common import Heartbeat
        from mococxr.sweep.storage import rdb_storage
        from mococxr.tracking import mlflow as mt

        # One process creates both schemas, so the workers do not race in the migrations.
        mt.open_store()
        mt.ensure_experiment(EXPERIMENT)
        rdb_storage(optuna_url, Heartbeat(interval=args.interval, grace_period=args.grace))
        grid_name = f"queue-scale-{int(time.time())}"
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--dir", str(work)]
        argv += ["--grid-name", grid_name, "--draws", str(draws), "--sleep", str(args.sleep)]
        argv += [
            "--interval",
            str(args.interval),
            "--grace",
            str(args.grace),
            "--max-retry",
            str(args.max_retry),
        ]
        workers: list[Worker] = []
        try:
            t_spawn = time.time()
            for i in range(args.workers):
                with open(work / "logs" / f"worker-{i:03d}.log", "w") as out:
                    proc = subprocess.Popen(
                        [*argv, "--index", str(i)], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO
                    )
                workers.append(Worker(i, proc, time.time()))
            figures = run_workers(args, work, workers, rng, n_kill, n_cells, t_spawn, optuna_url)
        finally:
            for w in workers:  # only the processes started here, by their own handle
                if w.proc.poll() is None:
                    w.proc.kill()
                    w.proc.wait()
        if figures is None:
            return 1
        ok = verify(args, work, workers, figures, n_cells, optuna_url)
    (work / "figures.json").write_text(json.dumps(figures, indent=2, default=str))
    print(f"figures: {work / 'figures.json'}", flush=True)
    return 0 if ok else 1


def queue_state(optuna_url: str) -> dict[str, Any]:
    """The queue study's trials by state and whether it is marked ready, read with plain SQL (cheap)."""
    import sqlalchemy as sa

    engine = sa.create_engine(optuna_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        states = dict(conn.execute(sa.text("SELECT state, count(*) FROM trials GROUP BY state")).all())
        ready = conn.execute(
            sa.text("SELECT count(*) FROM study_user_attributes WHERE key = 'ready'")
        ).scalar()
    engine.dispose()
    return {"trials": {str(k): v for k, v in states.items()}, "ready": bool(ready)}


def setup_repairs(work: Path) -> int:
    """Workers that decided the queue's creator was dead and ran its setup themselves (their say logs)."""
    return sum(
        "finishing the setup here" in f.read_text(errors="replace") for f in (work / "logs").glob("*.say")
    )


def run_workers(
    args, work: Path, workers: list[Worker], rng, n_kill: int, n_cells: int, t_spawn: float, optuna_url: str
):
    """Start-up barrier, go, the kills, and the wait for every worker to end; returns the timing figures."""
    deadline = time.time() + args.startup_timeout
    while True:
        for w in workers:
            f = work / "ready" / f"{w.index:03d}"
            if w.t_ready is None and f.exists():
                w.t_ready = f.stat().st_mtime
            if w.proc.poll() is not None:
                print(f"worker {w.index} exited {w.proc.returncode} while starting; see its log", flush=True)
                return None
        if all(w.t_ready is not None for w in workers):
            break
        if time.time() > deadline:
            print(f"workers not ready after {args.startup_timeout} s", flush=True)
            return None
        time.sleep(0.2)
    t_go = time.time()
    load_go = os.getloadavg()
    print(f"all {len(workers)} workers ready {t_go - t_spawn:.1f} s after spawning; go", flush=True)
    if args.setup_first:  # one worker creates and fills the queue; the rest go once it is marked ready
        (work / "go-000").write_text("go")
        while not queue_state(optuna_url)["ready"]:
            if workers[0].proc.poll() is not None or time.time() > t_go + args.stall_timeout:
                print(f"the queue was not marked ready: {queue_state(optuna_url)}", flush=True)
                return None
            time.sleep(0.5)
        print(f"queue set up by worker 0 alone in {time.time() - t_go:.1f} s; go for the others", flush=True)
    t_go_all = time.time()
    (work / "go").write_text("go")
    thresholds = sorted(rng.uniform(0.05, 0.5) * n_cells for _ in range(n_kill))
    kills: list[dict] = []
    done = 0
    deadline, t_progress = t_go + args.timeout, time.time()
    while any(w.proc.poll() is None for w in workers):
        before = done
        for w in workers:
            done += sum(
                r["ev"] == "end" for r in read_records(w, work / "records" / f"worker-{w.index:03d}.jsonl")
            )
        if done > before:
            t_progress = time.time()
        elif done < n_cells and time.time() - t_progress > args.stall_timeout:
            print(
                f"STALLED: no cell finished for {args.stall_timeout:.0f} s ({done} of {n_cells} done, "
                f"{time.time() - t_go:.0f} s after go); queue {queue_state(optuna_url)}; "
                f"{setup_repairs(work)} worker(s) ran the queue's setup themselves (creator thought dead)",
                flush=True,
            )
            return None
        while thresholds and done >= thresholds[0]:
            busy = [w for w in workers if w.killed_at is None and w.proc.poll() is None and w.open_cell]
            if not busy:
                break
            w = rng.choice(busy)
            w.proc.send_signal(signal.SIGKILL)
            w.killed_at = time.time()
            w.killed_key = w.open_cell["key"]
            w.proc.wait()
            thresholds.pop(0)
            kills.append(
                {
                    "worker": w.index,
                    "pid": w.proc.pid,
                    "t": w.killed_at - t_go,
                    "key": w.killed_key,
                    "done": done,
                }
            )
            print(
                f"SIGKILL worker {w.index} (pid {w.proc.pid}) mid-cell {w.killed_key[:12]} "
                f"after {done} cells",
                flush=True,
            )
        if time.time() > deadline:
            print(f"workers still running after {args.timeout} s; killing them", flush=True)
            return None
        time.sleep(POLL)
    t_all_exit = time.time()
    load_end = os.getloadavg()
    for w in workers:
        read_records(w, work / "records" / f"worker-{w.index:03d}.jsonl")
    ready = [w.t_ready - w.t_spawn for w in workers]
    return {
        "workers": len(workers),
        "cells": n_cells,
        "sleep_s": args.sleep,
        "t_spawn": t_spawn,
        "t_go": t_go,
        "t_all_exit": t_all_exit,
        "t_go_all": t_go_all,
        "setup_first": args.setup_first,
        "setup_repairs": setup_repairs(work),
        "startup_s": {"median": statistics.median(ready), "max": max(ready), "all_ready": t_go - t_spawn},
        "kills": kills,
        "kills_planned": n_kill,
        "loadavg_at_go": load_go,
        "loadavg_at_end": load_end,
        "cpus": os.cpu_count(),
    }


def verify(args, work: Path, workers: list[Worker], fig: dict, n_cells: int, optuna_url: str) -> bool:
    import optuna
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from mococxr.config import config_hash
    from mococxr.tracking import mlflow as mt

    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks.append((name, ok, detail))

    # the cells, by config hash
    spec = build_spec("x", draws_for(n_cells), optuna_url, args.interval, args.grace, args.max_retry)
    keys = {config_hash(cfg) for _, cfg in spec.configs()}
    check("distinct configs", len(keys) == n_cells, f"{len(keys)} hashes for {n_cells} cells")

    # the trainer's records: attempts per cell, their intervals
    kill_at = {w.proc.pid: w.killed_at for w in workers if w.killed_at is not None}
    attempts: dict[str, list[dict]] = {}
    gaps, parts = [], {"mlflow_end": [], "queue": [], "mlflow_start": []}
    dangling = []
    for w in workers:
        ends = {(r["key"], r["t_start"]): r for r in w.records if r["ev"] == "end"}
        starts = [r for r in w.records if r["ev"] == "start"]
        cells = []
        for s in starts:
            e = ends.get((s["key"], s["t_start"]))
            if e is None:
                if s["pid"] not in kill_at:
                    dangling.append(s)
                until = kill_at.get(s["pid"], float("inf"))
                attempts.setdefault(s["key"], []).append({**s, "until": until, "killed": True})
            else:
                attempts.setdefault(s["key"], []).append({**e, "until": e["t_exit"], "killed": False})
                cells.append(e)
        cells.sort(key=lambda r: r["t_start"])
        for a, b in zip(cells, cells[1:], strict=False):
            gaps.append(b["t_start"] - a["t_end"])
            parts["mlflow_end"].append(a["t_exit"] - a["t_end"])
            parts["queue"].append(b["t_enter"] - a["t_exit"])
            parts["mlflow_start"].append(b["t_start"] - b["t_enter"])
    overlaps = []
    for key, atts in attempts.items():
        atts.sort(key=lambda a: a["t_enter"])
        for a, b in zip(atts, atts[1:], strict=False):
            if b["t_enter"] < a["until"]:
                overlaps.append((key, a["pid"], b["pid"]))
    slept_twice = [k for k, atts in attempts.items() if sum(not a["killed"] for a in atts) > 1]
    check(
        "no cell worked twice at once", not overlaps, f"{len(overlaps)} overlapping attempts {overlaps[:3]}"
    )
    check("no cell slept to the end twice", not slept_twice, f"{len(slept_twice)} cells {slept_twice[:3]}")
    check("no unfinished attempt in a live worker", not dangling, f"{len(dangling)}")

    # MLflow: one FINISHED fine-tune run per cell, none left RUNNING
    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs, token = [], None
    while True:
        page = client.search_runs(
            [exp.experiment_id],
            f"tags.`{mt.tag('kind')}` = 'finetune'",
            run_view_type=ViewType.ALL,
            max_results=1000,
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            break
    by_status: dict[str, int] = {}
    finished: dict[str, list[str]] = {}
    for r in runs:
        by_status[r.info.status] = by_status.get(r.info.status, 0) + 1
        if r.info.status == "FINISHED":
            finished.setdefault(r.data.tags.get(mt.tag("config_hash"), ""), []).append(r.info.run_id)
    multi = {k: v for k, v in finished.items() if len(v) > 1}
    missing = keys - set(finished)
    check(
        "one FINISHED run per cell",
        not multi and not missing and set(finished) == keys,
        f"{len(finished)} cells with a FINISHED run, {len(multi)} with several, {len(missing)} without",
    )
    check("no fine-tune run left RUNNING", by_status.get("RUNNING", 0) == 0, f"runs by status {by_status}")
    parents = client.search_runs([exp.experiment_id], f"tags.`{mt.tag('kind')}` = 'grid'")
    check(
        "grid parent run FINISHED",
        len(parents) == 1 and parents[0].info.status == "FINISHED",
        f"{[(p.info.status, p.data.metrics.get('grid/n_finished')) for p in parents]}",
    )

    # the queue: every item COMPLETE, pointing at the cell's FINISHED run
    names = optuna.get_all_study_names(storage=optuna_url)
    study = optuna.load_study(study_name=names[0], storage=optuna_url)
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    complete: dict[str, list] = {}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            complete.setdefault(t.user_attrs.get("key"), []).append(t)
    bad_run = [
        k for k, ts in complete.items() if ts[0].user_attrs.get("mlflow_run_id") not in finished.get(k, [])
    ]
    check("one study", len(names) == 1, f"{names}")
    check(
        "every cell's item COMPLETE once",
        set(complete) == keys and all(len(v) == 1 for v in complete.values()),
        f"{len(complete)} keys COMPLETE, trials by state {states}",
    )
    check("COMPLETE trials point at the FINISHED run", not bad_run, f"{len(bad_run)} do not")
    retries = [t for t in trials if "failed_trial" in t.system_attrs]
    enqueued = [t for t in trials if "failed_trial" not in t.system_attrs and "retry_of" not in t.user_attrs]
    check(
        "each cell enqueued once",
        len(enqueued) == n_cells,
        f"{len(enqueued)} first-enqueued trials for {n_cells} cells; {fig['setup_repairs']} worker(s) "
        "re-ran the queue's setup",
    )
    adopted = sum(bool(t.user_attrs.get("adopted")) for t in trials if t.state == TrialState.COMPLETE)
    duplicates = sum("duplicate_of" in t.user_attrs for t in trials)

    # the kills: each killed worker's cell finished by another worker
    retried_by_others = []
    for k in fig["kills"]:
        fin = [a for a in attempts.get(k["key"], []) if not a["killed"]]
        by_other = bool(fin) and all(a["pid"] != k["pid"] for a in fin)
        adopt = any(t.user_attrs.get("adopted") for t in complete.get(k["key"], []))
        retried_by_others.append(by_other or adopt)
    n_killed = len(fig["kills"])
    check(f"{fig['kills_planned']} workers SIGKILLed", n_killed == fig["kills_planned"], f"{n_killed} killed")
    check(
        "killed workers' cells retried by others",
        all(retried_by_others),
        f"{sum(retried_by_others)} of {n_killed}",
    )
    exits = {w.index: w.proc.returncode for w in workers if w.killed_at is None}
    errors: dict[str, int] = {}  # the last line of each crashed worker's log: its exception
    for i, rc in exits.items():
        if rc != 0:
            lines = (work / "logs" / f"worker-{i:03d}.log").read_text(errors="replace").strip().splitlines()
            last = lines[-1].split(": Trial#")[0] if lines else f"exit {rc}, no output"
            errors[last] = errors.get(last, 0) + 1
    killed_pids = {w.proc.pid for w in workers if w.killed_at is not None}
    judged_dead = [
        t.number
        for t in trials
        if t.state == TrialState.FAIL
        and int(str(t.user_attrs.get("worker", ":0")).rsplit(":", 1)[1]) not in killed_pids
    ]
    check(
        "surviving workers exited 0",
        all(rc == 0 for rc in exits.values()),
        f"{[i for i, rc in exits.items() if rc != 0]} did not",
    )
    failed = []
    for w in workers:
        f = work / "results" / f"worker-{w.index:03d}.json"
        if w.killed_at is None and f.exists():
            failed += json.loads(f.read_text())["failed"]
    check("no worker reported a failed cell", not failed, f"{failed[:3]}")

    # timings
    ends = [a for atts in attempts.values() for a in atts if not a["killed"]]
    t_first = min(a["t_start"] for atts in attempts.values() for a in atts)
    t_last = max(a["t_exit"] for a in ends)
    first_by_pid: dict[int, float] = {}
    for atts in attempts.values():
        for a in atts:
            first_by_pid[a["pid"]] = min(first_by_pid.get(a["pid"], math.inf), a["t_start"])
    work_wall = t_last - t_first
    fig.update(
        {
            "checks": [{"check": n, "ok": ok, "detail": d} for n, ok, d in checks],
            "overhead_ms": stats_ms(gaps),
            "overhead_parts_ms": {k: stats_ms(v) for k, v in parts.items()},
            "queue_setup_s": {
                "go_to_ready_setup_first": fig["t_go_all"] - fig["t_go"] if fig["setup_first"] else None,
                "go_to_first_cell": t_first - fig["t_go"],
                "go_to_last_worker_first_cell": max(first_by_pid.values()) - fig["t_go"],
            },
            "wall_s": {
                "first_sleep_to_last_cell": work_wall,
                "go_to_all_exited": fig["t_all_exit"] - fig["t_go"],
                "last_cell_to_all_exited": fig["t_all_exit"] - t_last,
                "spawn_to_all_exited": fig["t_all_exit"] - fig["t_spawn"],
                "ideal": n_cells * args.sleep / len(workers),
            },
            "cells_per_s": n_cells / work_wall,
            "trials_by_state": states,
            "runs_by_status": by_status,
            "stale_failed_trials": states.get("FAIL", 0),
            "live_workers_judged_dead": len(judged_dead),
            "crashed_workers": {"count": sum(errors.values()), "errors": errors},
            "retry_trials": len(retries),
            "adopted": adopted,
            "duplicate_leases_closed": duplicates,
            "killed_cells_retried_by_others": sum(retried_by_others),
        }
    )
    report(fig)
    return all(ok for _, ok, _ in checks)


def report(fig: dict) -> None:
    o, p, w = fig["overhead_ms"], fig["overhead_parts_ms"], fig["wall_s"]
    s, q = fig["startup_s"], fig["queue_setup_s"]
    lines = [
        "",
        f"{fig['workers']} workers, {fig['cells']} cells, sleep {fig['sleep_s']} s",
        f"start-up (spawn -> imported, store open): median {s['median']:.1f} s, max {s['max']:.1f} s",
        (
            f"queue filled by worker 0 alone (--setup-first) in {q['go_to_ready_setup_first']:.1f} s; "
            if fig["setup_first"]
            else f"all at once: {fig['setup_repairs']} worker(s) re-ran the queue's setup; "
        )
        + f"go -> first cell's sleep: {q['go_to_first_cell']:.2f} s; "
        f"-> every worker in a cell: {q['go_to_last_worker_first_cell']:.2f} s",
        f"coordination overhead per cell: median {o['median']:.0f} ms, p99 {o['p99']:.0f} ms, "
        f"mean {o['mean']:.0f} ms, max {o['max']:.0f} ms (n={o['n']})",
        "  of which (medians) MLflow run end {:.0f} ms, queue done+pop+adoption {:.0f} ms, "
        "MLflow run start {:.0f} ms".format(
            p["mlflow_end"]["median"], p["queue"]["median"], p["mlflow_start"]["median"]
        ),
        f"wall: first sleep -> last cell {w['first_sleep_to_last_cell']:.1f} s "
        f"({fig['cells_per_s']:.2f} cells/s); "
        f"ideal {w['ideal']:.1f} s; go -> all exited {w['go_to_all_exited']:.1f} s "
        f"(barrier after the last cell {w['last_cell_to_all_exited']:.1f} s)",
        f"killed {len(fig['kills'])}: " + ", ".join(f"w{k['worker']}@{k['t']:.1f}s" for k in fig["kills"]),
        f"trials {fig['trials_by_state']}; retry copies {fig['retry_trials']}; adopted {fig['adopted']}; "
        f"duplicate leases closed {fig['duplicate_leases_closed']}; killed cells retried by others "
        f"{fig['killed_cells_retried_by_others']}",
        f"fine-tune runs {fig['runs_by_status']}",
        f"leases of live workers FAIL'd as dead (missed heartbeats): {fig['live_workers_judged_dead']}; "
        f"crashed workers: {fig['crashed_workers']}",
        f"{fig['cpus']} CPUs; load average (1/5/15 min) at go {fig['loadavg_at_go']}, "
        f"at the end {fig['loadavg_at_end']}",
        "",
    ]
    lines += [f"{'PASS' if c['ok'] else 'FAIL'}  {c['check']}: {c['detail']}" for c in fig["checks"]]
    print("\n".join(lines), flush=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=600, help="at least this many cells (rounded up to x6)")
    ap.add_argument("--workers", type=int, default=32)
    ap.add_argument("--sleep", type=float, default=0.5, help="seconds each cell sleeps inside its run")
    ap.add_argument("--kill-frac", type=float, default=0.1, help="fraction of workers SIGKILLed (at least 3)")
    ap.add_argument("--interval", type=int, default=1, help="heartbeat interval, s")
    ap.add_argument("--grace", type=int, default=5, help="heartbeat grace period, s")
    ap.add_argument("--max-retry", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments and victims")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds from go until the workers must end")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument(
        "--setup-first",
        action="store_true",
        help="let one worker create and fill the queue before the others start (default: all at once)",
    )
    ap.add_argument("--stall-timeout", type=float, default=300, help="abort when no cell ends for this long")
    ap.add_argument("--max-connections", type=int, default=400, help="PostgreSQL max_connections")
    ap.add_argument("--dir", help="work folder (records, logs, figures.json); default a new temp folder")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--grid-name", help=argparse.SUPPRESS)
    ap.add_argument("--draws", type=int, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))
    args = parse(argv)
    return worker(args) if args.worker else drive(args)


if __name__ == "__main__":
    sys.exit(main())
