"""The docker/compose.yaml topology, run natively: PostgreSQL + S3 + an authenticated MLflow server + workers.

No Docker daemon is needed. The test starts a real PostgreSQL, runs ``docker/postgres/init-databases.sh``
against it, starts an S3 object store (moto's server standing in for the ``storage`` service, RustFS)
and creates the bucket as ``storage-init`` does, starts the compose file's own ``mlflow server`` command
and environment (basic auth, the PostgreSQL backend, artifacts proxied by the server to
``s3://BUCKET/artifacts``; only hosts and ports are rewritten for 127.0.0.1), runs the compose ``worker``
command as processes and the ``optuna-dashboard`` command against the study. Everything listens on
127.0.0.1, on free ports, and is stopped at the end. Without moto the artifact destination is a local
folder and only the bucket test skips.

What it shows: anonymous requests are refused and users can be added as docker/README.md says; two
workers finish one study while a third replaces one killed with SIGKILL mid-trial (its trial is
failed and retried); runs, LoggedModels, resume states and predictions reach the server through
``mlflow-artifacts:`` and land in the bucket; optuna-dashboard serves the study; a restarted server is
waited for, not failed on.
"""

from __future__ import annotations

import io
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import requests
import torch
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from servers import (
    DOCKER,
    S3,
    MlflowServer,
    Postgres,
    auth_ini,
    compose_service,
    free_port,
    http_service,
    mlflow_server,
    postgres,
    s3_server,
    stop_group,
    tail,
)

pytestmark = pytest.mark.slow

STUDY = "servers"
SWEEP_EXPERIMENT = "servers-sweep"
N_TRIALS = 3


@dataclass
class Stack:
    pg: Postgres
    server: MlflowServer
    env: dict[str, str]  # the docker/.env this run used
    work: Path
    phantom: Path
    s3: S3 | None  # None: moto is missing and artifacts went to a local folder
    s3_missing: str = ""  # why s3 is None


def _clean_environ() -> dict[str, str]:
    """This process's environment without anything that would point a child at another store."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MOCOCXR_", "PG", "AWS_"))}


def _server_command(
    compose_env: dict[str, str], pg: Postgres, port: int, artifacts: Path | None
) -> list[str]:
    """The compose mlflow command, moved to 127.0.0.1:PORT; ``artifacts``: a local folder in place of S3."""
    rewrites = {"--host=": "--host=127.0.0.1", "--port=": f"--port={port}", "--workers=": "--workers=1"}
    if artifacts is not None:
        rewrites["--artifacts-destination="] = f"--artifacts-destination={artifacts}"
    command = compose_service("mlflow", compose_env)["command"]
    argv = []
    for arg in command:
        arg = arg.replace("postgres:5432", f"127.0.0.1:{pg.port}")
        prefix = next((p for p in rewrites if arg.startswith(p)), None)
        argv.append(rewrites.pop(prefix) if prefix else arg)
    assert not rewrites, f"compose mlflow command lost {sorted(rewrites)}: {command}"
    assert (
        argv[:2] == ["mlflow", "server"] and "--app-name=basic-auth" in argv and "--serve-artifacts" in argv
    )
    return [str(Path(sys.executable).parent / "mlflow"), *argv[1:]]


@contextmanager
def object_store(work: Path, env: dict[str, str]) -> Iterator[S3 | str]:
    """The compose ``storage`` service (moto in RustFS's place) with the ``storage-init`` bucket made,
    or, where moto cannot be installed or started, the reason why (the stack then stores locally)."""
    keys = compose_service("storage", env)["environment"]
    bucket = compose_service("storage-init", env)["environment"]["MLFLOW_BUCKET"]
    with ExitStack() as stop:
        try:  # only the start may skip; what the tests raise later passes through untouched
            s3 = stop.enter_context(
                s3_server(
                    work / "s3.log",
                    access_key=keys["RUSTFS_ACCESS_KEY"],
                    secret_key=keys["RUSTFS_SECRET_KEY"],
                )
            )
        except pytest.skip.Exception as skipped:
            print(f"test_servers: no S3 object store, artifacts go to a local folder: {skipped}")
            yield str(skipped)
            return
        s3.client().create_bucket(Bucket=bucket)
        yield s3


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    from mococxr.data.phantom import synthesize

    pytest.importorskip(
        "flask_wtf", reason="`mlflow server --app-name basic-auth` needs mlflow[auth] (Flask-WTF)"
    )
    work = tmp_path_factory.mktemp("stack")
    token = lambda: secrets.token_urlsafe(18)  # noqa: E731
    env = {
        name: token()
        for name in (
            "POSTGRES_PASSWORD",
            "MLFLOW_DB_PASSWORD",
            "OPTUNA_DB_PASSWORD",
            "S3_ACCESS_KEY",
            "S3_SECRET_KEY",
            "MLFLOW_ADMIN_PASSWORD",
            "MLFLOW_SECRET_KEY",
        )
    }
    env.update(
        MLFLOW_WORKER_PASSWORD=env["MLFLOW_ADMIN_PASSWORD"],
        SWEEP_SPEC=str(work / "study.yaml"),
        STUDY_NAME=STUDY,
    )
    with postgres() as pg, object_store(work, env) as s3:
        init_env = {
            k: compose_service("postgres", env)["environment"][k]
            for k in ("MLFLOW_DB_PASSWORD", "OPTUNA_DB_PASSWORD")
        }
        pg.run(
            "sh",
            str(DOCKER / "postgres" / "init-databases.sh"),
            env={**init_env, "POSTGRES_USER": pg.superuser, "POSTGRES_DB": "postgres"},
        )
        port = free_port()
        argv = _server_command(env, pg, port, None if isinstance(s3, S3) else work / "artifacts")
        server_env = {
            **_clean_environ(),
            **compose_service("mlflow", env)["environment"],
            "MLFLOW_AUTH_CONFIG_PATH": str(
                auth_ini(work / "basic_auth.ini", {"postgres:5432": f"127.0.0.1:{pg.port}"})
            ),
        }
        if isinstance(s3, S3):
            assert server_env["MLFLOW_S3_ENDPOINT_URL"] == "http://storage:9000"
            server_env["MLFLOW_S3_ENDPOINT_URL"] = s3.endpoint
        username = server_env["MLFLOW_AUTH_ADMIN_USERNAME"]
        with (
            mlflow_server(
                argv,
                server_env,
                port=port,
                username=username,
                password=env["MLFLOW_ADMIN_PASSWORD"],
                log=work / "mlflow-server.log",
            ) as server,
            pytest.MonkeyPatch.context() as mp,
        ):
            for key in [k for k in os.environ if k.startswith("MOCOCXR_")]:
                mp.delenv(key)
            for key, value in server.client_env().items():  # in-process clients authenticate too
                mp.setenv(key, value)
            phantom = synthesize(work / "phantom", 64, size=64)
            yield Stack(
                pg=pg,
                server=server,
                env=env,
                work=work,
                phantom=phantom,
                s3=s3 if isinstance(s3, S3) else None,
                s3_missing="" if isinstance(s3, S3) else s3,
            )


def client(stack: Stack) -> MlflowClient:
    return MlflowClient(tracking_uri=stack.server.url)


def worker_env(stack: Stack) -> dict[str, str]:
    """The compose worker environment, pointed at the native server."""
    env = compose_service("worker", stack.env)["environment"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    env["MLFLOW_TRACKING_URI"] = stack.server.url
    return {**_clean_environ(), **env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_worker(stack: Stack, log: Path) -> subprocess.Popen:
    """The compose worker command (``mococxr sweep SPEC --storage postgresql...``) as a process group."""
    command = [
        a.replace("postgres:5432", f"127.0.0.1:{stack.pg.port}")
        for a in compose_service("worker", stack.env)["command"]
    ]
    assert command[:2] == ["mococxr", "sweep"]
    with open(log, "w") as fh:
        # --debug: a failing trial leaves its traceback in the log this test prints.
        return subprocess.Popen(
            [sys.executable, "-m", "mococxr", "--debug", *command[1:]],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=worker_env(stack),
            cwd=stack.work,
            start_new_session=True,
        )


def load_study(stack: Stack) -> optuna.Study:
    url = stack.pg.url("optuna", "optuna", stack.env["OPTUNA_DB_PASSWORD"])
    return optuna.load_study(study_name=STUDY, storage=url)


# -- (a) authentication ---------------------------------------------------------------------------------
def test_anonymous_requests_are_refused_and_users_are_added(stack):
    url, admin = stack.server.url, (stack.server.username, stack.server.password)
    search = f"{url}/api/2.0/mlflow/experiments/search"
    anonymous = requests.get(search, params={"max_results": 1}, timeout=60)
    assert anonymous.status_code == 401 and "Basic" in anonymous.headers.get("WWW-Authenticate", "")
    assert (
        requests.get(
            search, params={"max_results": 1}, auth=(admin[0], "wrong-password-1"), timeout=60
        ).status_code
        == 401
    )
    assert requests.get(search, params={"max_results": 1}, auth=admin, timeout=60).status_code == 200

    # docker/README.md "Add a user": the auth REST API, as the admin.
    alice = ("alice", secrets.token_urlsafe(12))
    created = requests.post(
        f"{url}/api/2.0/mlflow/users/create",
        auth=admin,
        timeout=60,
        json={"username": alice[0], "password": alice[1]},
    )
    assert created.status_code == 200, created.text
    experiment_id = client(stack).create_experiment("servers-shared")

    def alice_creates_run() -> int:
        return requests.post(
            f"{url}/api/2.0/mlflow/runs/create", auth=alice, timeout=60, json={"experiment_id": experiment_id}
        ).status_code

    assert requests.get(search, params={"max_results": 1}, auth=alice, timeout=60).status_code == 200
    assert alice_creates_run() == 403  # default_permission = READ
    granted = requests.post(
        f"{url}/api/3.0/mlflow/users/permissions/grant",
        auth=admin,
        timeout=60,
        json={
            "username": alice[0],
            "resource_type": "experiment",
            "resource_id": experiment_id,
            "permission": "EDIT",
        },
    )
    assert granted.status_code == 200, granted.text
    assert alice_creates_run() == 200

    # The worker's database role cannot open the MLflow databases.
    psql = str(stack.pg.bindir / "psql")
    with pytest.raises(AssertionError, match="permission denied for database"):
        stack.pg.run(
            psql,
            "-d",
            "mlflow",
            "-c",
            "select 1",
            env={"PGUSER": "optuna", "PGPASSWORD": stack.env["OPTUNA_DB_PASSWORD"]},
        )


# -- (b, c) sweep workers -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep(stack) -> dict:
    """Two compose workers on one study; one is SIGKILLed mid-trial and replaced, as `restart:` would."""
    spec = {
        "name": STUDY,
        "experiment": SWEEP_EXPERIMENT,
        "budget": {"n_trials": N_TRIALS, "epochs": 2},
        "search_space": {"lr": {"type": "float", "low": 1.0e-3, "high": 5.0e-2, "log": True}},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "heartbeat": {"interval": 1, "grace_period": 4, "max_retry": 1},
        "base": {
            "data": {"dataset": "chexpert", "root": str(stack.phantom), "val": 0.25, "test": 0.2},
            "init": "random",
            "image_size": 32,
            "batch_size": 16,
            "moco_k": 64,
            "workers": 0,
        },
    }
    Path(stack.env["SWEEP_SPEC"]).write_text(yaml.safe_dump(spec))
    logs = [stack.work / f"worker{i}.log" for i in range(3)]
    procs = [start_worker(stack, logs[0]), start_worker(stack, logs[1])]
    t0 = time.monotonic()
    victim, victim_pid = None, None
    try:
        while victim is None and time.monotonic() - t0 < 300:
            time.sleep(0.3)
            try:
                running = load_study(stack).get_trials(states=(TrialState.RUNNING,))
            except KeyError:  # the workers have not created the study yet
                continue
            for trial in running:
                pid = int(trial.user_attrs.get("worker", ":0").rsplit(":", 1)[1])
                if "mlflow_run_id" in trial.user_attrs and pid in {p.pid for p in procs}:
                    victim, victim_pid = trial, pid
                    os.killpg(pid, signal.SIGKILL)
                    break
            if any(p.poll() not in (None, -signal.SIGKILL) for p in procs):
                break
        assert victim is not None, "no trial ran:\n" + "\n".join(tail(log) for log in logs[:2])
        procs.append(start_worker(stack, logs[2]))  # the replacement container
        for proc, log in zip(procs, logs, strict=True):
            if proc.pid == victim_pid:
                assert proc.wait(timeout=30) == -signal.SIGKILL
                continue
            try:
                assert proc.wait(timeout=max(10.0, 480 - (time.monotonic() - t0))) == 0, tail(log)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"worker timed out:\n{tail(log)}") from None
    finally:
        for proc in procs:
            stop_group(proc, timeout=5)
    return {"victim": victim, "pids": {p.pid for p in procs}, "seconds": time.monotonic() - t0}


def test_workers_finish_the_study_and_everything_reaches_the_server(stack, sweep):
    trials = load_study(stack).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == N_TRIALS, [(t.number, t.state, t.user_attrs) for t in trials]
    workers = {int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in trials}
    assert len(workers) >= 2 and workers <= sweep["pids"]  # one study shared by the worker processes

    mc = client(stack)
    experiment = mc.get_experiment_by_name(SWEEP_EXPERIMENT)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    for trial in complete:
        run = mc.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert run.data.tags["mococxr.optuna_trial"] == str(trial.number)
        assert run.data.tags["mococxr.optuna_study"] == STUDY
        assert [m.step for m in mc.get_metric_history(run.info.run_id, "val/linear_auc")] == [1, 2]
        # A finished trial keeps no resume state (resume_state=until_done): deleted through the server.
        assert mc.list_artifacts(run.info.run_id, "resume") == []
        models = mc.search_logged_models(
            experiment_ids=[experiment.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
        assert trial.user_attrs["best_model_id"] in {m.model_id for m in models}
        assert all(m.artifact_location.startswith("mlflow-artifacts:") for m in models)
        assert {"READY"} == {str(m.status).rsplit(".", 1)[-1] for m in models}

    best = max(complete, key=lambda t: t.value)
    # models:/ URIs resolve through the global tracking URI (MLflow ignores tracking_uri= for them).
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(stack.server.url)
    try:
        local = mlflow.artifacts.download_artifacts(
            f"models:/{best.user_attrs['best_model_id']}", dst_path=str(stack.work / "dl")
        )
    finally:
        mlflow.set_tracking_uri(previous)
    state = torch.load(Path(local) / "state_dict.pt", map_location="cpu", weights_only=True)
    assert any(k.endswith("weight") for k in state)
    # Bytes live in the server's artifact destination (the bucket: see the bucket test); the workers
    # kept nothing locally.
    assert not (stack.work / "mlruns").exists()
    if stack.s3 is None:
        assert list((stack.work / "artifacts").rglob("state_dict.pt"))
    else:
        assert not (stack.work / "artifacts").exists()
    parent = mc.get_run(load_study(stack).user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mococxr.pretrain_run_id"] == best.user_attrs["mlflow_run_id"]


def test_killed_worker_trial_is_failed_and_retried(stack, sweep):
    victim = sweep["victim"]
    trials = {t.number: t for t in load_study(stack).get_trials()}
    assert trials[victim.number].state == TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == victim.params
    dead = client(stack).get_run(victim.user_attrs["mlflow_run_id"])
    assert dead.info.status == "FAILED" and dead.data.tags["mococxr.optuna_state"] == "FAIL"
    assert sum(t.state == TrialState.COMPLETE for t in trials.values()) == N_TRIALS


# -- (d) fine-tuning against the server -----------------------------------------------------------------
@pytest.fixture(scope="module")
def finetune(stack, sweep):
    """``mococxr finetune`` from the best trial's LoggedModel, logging to the server; its MLflow run."""
    best = max(load_study(stack).get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    init = f"models:/{best.user_attrs['best_model_id']}"
    argv = [
        sys.executable,
        "-m",
        "mococxr",
        "finetune",
        "--dataset",
        "chexpert",
        "--root",
        str(stack.phantom),
        "--task",
        "pleural_effusion",
        "--val",
        "0.25",
        "--test",
        "0.2",
        "--init",
        init,
        "--protocol",
        "linear",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--experiment",
        "servers-finetune",
    ]
    proc = subprocess.run(
        argv, env=worker_env(stack), cwd=stack.work, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mc = client(stack)
    [run] = mc.search_runs([mc.get_experiment_by_name("servers-finetune").experiment_id])
    assert run.data.tags["mococxr.pretrain_run_id"] == best.user_attrs["mlflow_run_id"]
    return run


def test_finetune_from_a_sweep_checkpoint_logs_predictions(stack, finetune):
    run = finetune
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id,
        artifact_path="predictions/test.parquet",
        tracking_uri=stack.server.url,
        dst_path=str(stack.work / "pred"),
    )
    predictions = pd.read_parquet(local)
    assert len(predictions) == int(run.data.params["n_test"]) > 0
    assert {"image_id", "patient_id", "label:Pleural Effusion", "score:Pleural Effusion"} <= set(predictions)


def test_checkpoints_and_predictions_land_in_the_bucket(stack, sweep, finetune):
    """The S3 path: the server writes what workers log to s3://BUCKET/artifacts, read back with boto3."""
    if stack.s3 is None:
        pytest.skip(f"no S3 object store: {stack.s3_missing}")
    bucket = compose_service("storage-init", stack.env)["environment"]["MLFLOW_BUCKET"]
    keys = stack.s3.keys(bucket)
    assert keys and all(k.startswith("artifacts/") for k in keys), keys[:20]
    mc = client(stack)
    sweep_id = mc.get_experiment_by_name(SWEEP_EXPERIMENT).experiment_id
    for trial in load_study(stack).get_trials(states=(TrialState.COMPLETE,)):
        model = f"artifacts/{sweep_id}/models/{trial.user_attrs['best_model_id']}/artifacts/state_dict.pt"
        assert model in keys, [k for k in keys if k.endswith("state_dict.pt")]
        run_id = trial.user_attrs["mlflow_run_id"]
        assert f"artifacts/{sweep_id}/{run_id}/artifacts/config.json" in keys
        assert not [k for k in keys if f"/{run_id}/artifacts/resume/" in k]  # deleted from the bucket too
    # ... after they were written there. moto logs each request; MLflow deletes with DeleteObjects.
    requests_seen = (stack.work / "s3.log").read_text(errors="replace").splitlines()
    assert [line for line in requests_seen if '"PUT ' in line and "/artifacts/resume/epoch_" in line]
    assert [line for line in requests_seen if '"POST ' in line and "?delete" in line]
    run = finetune
    prediction = f"artifacts/{run.info.experiment_id}/{run.info.run_id}/artifacts/predictions/test.parquet"
    assert prediction in keys, [k for k in keys if run.info.run_id in k]
    # The bytes in the bucket are the checkpoint itself: a plain state dict.
    best = max(load_study(stack).get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    blob = stack.s3.client().get_object(
        Bucket=bucket,
        Key=f"artifacts/{sweep_id}/models/{best.user_attrs['best_model_id']}/artifacts/state_dict.pt",
    )
    state = torch.load(io.BytesIO(blob["Body"].read()), map_location="cpu", weights_only=True)
    assert any(k.endswith("weight") for k in state)


# -- (e) optuna-dashboard ---------------------------------------------------------------------------------
def test_optuna_dashboard_serves_the_study(stack, sweep):
    """The compose optuna-dashboard command, on 127.0.0.1, lists the workers' study through its API."""
    pytest.importorskip(
        "optuna_dashboard", reason="pip install 'optuna-dashboard>=0.17' (the dashboard extra)"
    )
    service = compose_service("optuna-dashboard", stack.env)
    argv = [a.replace("postgres:5432", f"127.0.0.1:{stack.pg.port}") for a in service["command"]]
    port = free_port()
    argv[argv.index("--host") + 1], argv[argv.index("--port") + 1] = "127.0.0.1", str(port)
    assert argv[0] == "optuna-dashboard"
    argv[0] = str(Path(sys.executable).parent / "optuna-dashboard")
    url = f"http://127.0.0.1:{port}"
    env = {**_clean_environ(), **service["environment"]}
    with http_service(argv, env, health=f"{url}/api/meta", log=stack.work / "optuna-dashboard.log"):
        studies = requests.get(f"{url}/api/studies", timeout=60).json()["study_summaries"]
        [study] = [s for s in studies if s["study_name"] == STUDY]
        detail = requests.get(f"{url}/api/studies/{study['study_id']}", timeout=60)
        assert detail.status_code == 200, detail.text[:500]
        states = [t["state"] for t in detail.json()["trials"]]
        assert states.count("Complete") == N_TRIALS and "Fail" in states, states
        assert requests.get(f"{url}/dashboard", timeout=60).status_code == 200  # the UI page itself


# -- transient server errors ------------------------------------------------------------------------------
def test_client_waits_for_a_restarted_server(stack, sweep, monkeypatch):
    """MLflow's own retry (MLFLOW_HTTP_REQUEST_MAX_RETRIES / _BACKOFF_FACTOR) rides out a restart."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "6")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    mc = client(stack)
    run_id = mc.create_run(mc.get_experiment_by_name(SWEEP_EXPERIMENT).experiment_id).info.run_id
    stack.server.stop()
    restart = threading.Timer(2.0, stack.server.start, kwargs={"wait": False})
    restart.start()
    try:
        t0 = time.monotonic()
        mc.log_metric(run_id, "retry/ok", 1.0)  # refused connections are retried with backoff
        waited = time.monotonic() - t0
    finally:
        restart.join()
    stack.server.wait_healthy(120)
    assert waited > 2.0  # it was refused at first and waited for the restart
    assert [m.value for m in mc.get_metric_history(run_id, "retry/ok")] == [1.0]
