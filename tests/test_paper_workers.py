"""Three workers of ``mococxr paper sweeps/paper_phantom.yaml`` started at once on the team stack's stores:
Optuna on a local PostgreSQL, runs on a local ``mlflow server`` with a PostgreSQL backend. Every cell and
trial runs once, promotion and reports happen once; then a worker killed mid-cell (SIGKILL) in a second
run has its cell retried by another and nothing is duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from servers import free_port, mlflow_server, postgres, stop_group

from mococxr.report.record import REVISION
from mococxr.tracking import mlflow as mt

REPO = Path(__file__).resolve().parents[1]
PLAN = REPO / "sweeps" / "paper_phantom.yaml"


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "mococxr", *argv],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=log.parent,
            start_new_session=True,
        )


def _runs(client: MlflowClient, kind: str) -> list:
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, f"tags.`{mt.tag('kind')}` = '{kind}'", max_results=5000)


def _one_finished_each(client: MlflowClient) -> list:
    """Exactly one FINISHED run per fine-tune cell (experiment, config hash) and per pretraining trial;
    nothing left RUNNING."""
    tuned = _runs(client, "finetune")
    cells = Counter(
        (r.info.experiment_id, r.data.tags[mt.tag("config_hash")])
        for r in tuned
        if r.info.status == "FINISHED"
    )
    assert cells and max(cells.values()) == 1, cells.most_common(3)
    trials = Counter(
        (r.data.tags[mt.tag("optuna_study")], r.data.tags[mt.tag("optuna_trial")])
        for r in _runs(client, "pretrain")
        if r.info.status == "FINISHED"
    )
    assert trials and max(trials.values()) == 1, trials
    running = [
        r.info.run_name
        for k in ("finetune", "pretrain", "grid", "report")
        for r in _runs(client, k)
        if r.info.status == "RUNNING"
    ]
    assert not running, running
    return tuned


@pytest.mark.slow
def test_three_paper_workers_share_the_plan_and_a_killed_one_is_replaced(tmp_path):
    with postgres() as pg:
        pg.create_database("optuna")
        pg.create_database("mlflow")
        port = free_port()
        argv = [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            pg.url("mlflow", password=pg.password),
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MOCOCXR_"))}
        with mlflow_server(
            argv, env, port=port, username="", password="", log=tmp_path / "server.log"
        ) as srv:
            storage = pg.url("optuna", password=pg.password)
            worker_env = {
                **env,
                "MLFLOW_TRACKING_URI": srv.url,
                "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
            }
            args = [
                "paper",
                str(PLAN),
                "--storage",
                storage,
                "--chexpert-root",
                str(tmp_path / "ch"),
                "--shenzhen-root",
                str(tmp_path / "sz"),
                "--out",
                str(tmp_path / "reports"),
            ]
            client = MlflowClient(srv.url)

            # -- 1: three workers at once --------------------------------------------------------------
            logs = [tmp_path / f"w{i}.log" for i in range(3)]
            procs = [_start(args, worker_env, log) for log in logs]
            for proc, log in zip(procs, logs, strict=True):
                assert proc.wait(timeout=1800) == 0, log.read_text()[-3000:]
            outs = [log.read_text() for log in logs]
            _one_finished_each(client)
            versions = {}
            for backbone in ("resnet18", "densenet121"):
                name = f"mococxr-paper-phantom-{backbone}"
                found = client.search_model_versions(f"name = '{name}'")
                assert len(found) == 2  # one version per trial: registered once, not once per worker
                versions[backbone] = client.get_model_version_by_alias(name, "production").version
            reports = _runs(client, "report")
            families = Counter(r.data.tags[mt.tag("config_hash")] for r in reports)
            assert len(families) == 4 and max(families.values()) == 1, (
                families
            )  # chexpert, shenzhen, table2, competition
            assert all(
                r.info.status == "FINISHED" and r.data.metrics[REVISION] == 1 for r in reports
            )  # made once
            trained = [sum(": test AUC " in line for line in out.splitlines()) for out in outs]
            assert sum(trained) == len([r for r in _runs(client, "finetune") if r.info.status == "FINISHED"])
            assert sum(t > 0 for t in trained) >= 2, trained  # the cells were shared out
            assert any("waiting for" in out for out in outs)  # a barrier said what it waited for

            # -- 2: a second plan run (one more draw per CheXpert fraction); one worker killed mid-cell --
            plan = yaml.safe_load(PLAN.read_text())
            plan["stages"]["chexpert"]["draws"] = 2
            plan["pretrain"]["study"]["heartbeat"] = {"interval": 1, "grace_period": 6, "max_retry": 2}
            wider = tmp_path / "paper_phantom_2draws.yaml"
            wider.write_text(yaml.safe_dump(plan))
            args2 = [*args[:1], str(wider), *args[2:], "--only", "chexpert"]
            logs2 = [tmp_path / f"v{i}.log" for i in range(3)]
            before = {r.info.run_id for r in _runs(client, "finetune")}
            procs = [_start(args2, worker_env, log) for log in logs2]
            victim, deadline = None, time.time() + 900
            while victim is None and time.time() < deadline:
                for r in _runs(client, "finetune"):
                    if r.info.run_id not in before and r.info.status == "RUNNING" and r.data.params:
                        owner = r.data.tags[mt.tag("owner")]
                        victim = next(p for p in procs if owner.endswith(f":{p.pid}"))
                        killed_run = r.info.run_id
                        break
                time.sleep(0.5)
            assert victim is not None, [log.read_text()[-2000:] for log in logs2]
            os.killpg(victim.pid, signal.SIGKILL)
            for proc, log in zip(procs, logs2, strict=True):
                code = proc.wait(timeout=1800)
                assert code == (-signal.SIGKILL if proc is victim else 0), log.read_text()[-3000:]
            tuned = _one_finished_each(client)
            dead = client.get_run(killed_run)
            assert dead.info.status == "FAILED"
            assert "stopped sending heartbeats" in dead.data.tags[mt.tag("end_reason")]
            retried = [
                r
                for r in tuned
                if r.info.status == "FINISHED"
                and r.data.tags[mt.tag("config_hash")] == dead.data.tags[mt.tag("config_hash")]
            ]
            assert len(retried) == 1  # the killed cell finished once, by another worker
            new = [r for r in tuned if r.info.run_id not in before]
            # the second draw of each CheXpert cell: 2 backbones x 2 inits x 2 protocols x 2 fractions
            assert len([r for r in new if r.info.status == "FINISHED"]) == 16
            for backbone, version in versions.items():  # the second run promoted nothing anew
                name = f"mococxr-paper-phantom-{backbone}"
                assert client.get_model_version_by_alias(name, "production").version == version
            stop_group(victim)
