"""Real servers for tests, run natively: a throwaway PostgreSQL, an S3 object store (moto), an
``mlflow server`` and any other HTTP service (optuna-dashboard).

All listen on 127.0.0.1 only, on free ports, keep their files in a fresh temporary folder, and are
stopped and deleted when the ``with`` block ends, whether the test passed or not. A missing
PostgreSQL installation skips the test with the apt line that provides it; a missing moto skips
with the pip line.

``compose_service`` reads ``docker/compose.yaml`` with compose's ``${VAR}`` interpolation, so the
native tests start the stack's own commands and environments rather than a copy of them.
"""

from __future__ import annotations

import configparser
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
PG_APT = "apt-get install -y --no-install-recommends postgresql-15 (or postgresql: any version with initdb)"
MOTO_PIP = "pip install 'moto[server]' boto3 (both in the dev extra: pip install -e '.[dev]')"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.S)


# -- compose ------------------------------------------------------------------------------------------
def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-d}``, ``${VAR-d}``,
    ``${VAR:?msg}``, ``${VAR?msg}``, ``${VAR:+alt}``; defaults may themselves hold variables.

    A required variable that is missing raises ``KeyError`` naming it and compose's message.
    """
    out, i = [], 0
    while (j := text.find("$", i)) >= 0:
        out.append(text[i:j])
        if text.startswith("$$", j):
            out.append("$")
            i = j + 2
        elif text.startswith("${", j):
            depth, k = 1, j + 2  # find the matching brace; nested ${...} may sit in a default
            while depth and k < len(text):
                if text.startswith("${", k):
                    depth, k = depth + 1, k + 2
                    continue
                depth -= text[k] == "}"
                k += 1
            if depth:
                raise ValueError(f"unclosed ${{ in {text!r}")
            out.append(_braced(text[j + 2 : k - 1], env))
            i = k
        elif m := _NAME.match(text, j + 1):
            out.append(env.get(m.group(0), ""))
            i = m.end()
        else:
            out.append("$")
            i = j + 1
    out.append(text[i:])
    return "".join(out)


def _braced(inner: str, env: Mapping[str, str]) -> str:
    spec = _BRACED.match(inner)
    if spec is None:
        raise ValueError(f"invalid interpolation ${{{inner}}}")
    name, op, arg = spec.group("name"), spec.group("op"), spec.group("arg") or ""
    value = env.get(name)
    unset_or_empty = not value if op and op.startswith(":") else value is None
    if op in (":-", "-"):
        return interpolate(arg, env) if unset_or_empty else value
    if op in (":?", "?"):
        if unset_or_empty:
            raise KeyError(f"{name}: {arg or 'required'}")
        return value
    if op in (":+", "+"):
        return "" if unset_or_empty else interpolate(arg, env)
    return value or ""


def _walk(value, env: Mapping[str, str]):
    if isinstance(value, str):
        return interpolate(value, env)
    if isinstance(value, list):
        return [_walk(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _walk(v, env) for k, v in value.items()}
    return value


def load_compose(env: Mapping[str, str], path: Path = COMPOSE) -> dict:
    """``compose.yaml`` parsed, YAML merge keys resolved and every string interpolated with ``env``."""
    return _walk(yaml.safe_load(path.read_text()), env)


def compose_service(name: str, env: Mapping[str, str], path: Path = COMPOSE) -> dict:
    """One service of ``compose.yaml`` with its ``environment`` as a dict and ``command`` as a list."""
    service = dict(load_compose(env, path)["services"][name])
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    service["environment"] = {k: "" if v is None else str(v) for k, v in environment.items()}
    command = service.get("command") or []
    service["command"] = command.split() if isinstance(command, str) else [str(c) for c in command]
    return service


# -- processes ----------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """End a process started with ``start_new_session=True`` and its children: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} was not written)"


# -- PostgreSQL ---------------------------------------------------------------------------------------
def pg_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` holding ``initdb``, or the one on ``PATH``."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found and shutil.which("initdb"):
        found = [shutil.which("initdb")]
    return Path(found[-1]).parent if found else None


@dataclass
class Postgres:
    """A running server; ``superuser`` connects with ``password`` over TCP (scram-sha-256)."""

    port: int
    bindir: Path
    superuser: str
    password: str
    base: Path

    def url(
        self,
        database: str,
        user: str | None = None,
        password: str | None = None,
        *,
        driver: str = "postgresql+psycopg2",
    ) -> str:
        """A SQLAlchemy URL; without ``password`` the client takes it from ``PGPASSWORD``."""
        user = user or self.superuser
        auth = f"{quote(user)}:{quote(password, safe='')}" if password else quote(user)
        return f"{driver}://{auth}@127.0.0.1:{self.port}/{database}"

    def env(self, password: str | None = None) -> dict[str, str]:
        """libpq variables that make ``psql`` and friends connect here."""
        return {
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.port),
            "PGUSER": self.superuser,
            "PGPASSWORD": password or self.password,
            "PATH": f"{self.bindir}:{os.environ['PATH']}",
        }

    def run(self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 120) -> str:
        """Run a client program (``psql``, ``createdb``, ``pg_dump`` or a script) against the server."""
        proc = subprocess.run(
            list(args),
            env={**os.environ, **self.env(), **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def create_database(self, name: str) -> None:
        self.run(str(self.bindir / "createdb"), name)


@contextmanager
def postgres(*, superuser: str = "postgres") -> Iterator[Postgres]:
    """Start a PostgreSQL server with password authentication; skip the test if none is installed.

    initdb refuses to run as root, so as root the server runs as the ``postgres`` user (``runuser``).
    """
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip(f"PostgreSQL server binaries (initdb, pg_ctl) not found; {PG_APT}")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver: pip install psycopg2-binary")
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run initdb as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root and `runuser` is missing, so initdb cannot drop root")
        as_user = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="mococxr-pg-"))  # not under pytest's tmp: root-only on CI
    password = os.urandom(12).hex()
    (base / "pw").write_text(password)
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
        os.chown(base / "pw", owner.pw_uid, owner.pw_gid)
    port = free_port()
    data, log = base / "data", base / "server.log"

    def pg(*args: str) -> None:
        proc = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=180)
        if proc.returncode:
            raise AssertionError(
                f"{args[0]} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}\n{tail(log)}"
            )

    started = False
    try:
        pg(
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            superuser,
            "--auth=scram-sha-256",
            f"--pwfile={base / 'pw'}",
            "--no-sync",
            "--no-instructions",
        )
        # -k: the socket lives in our folder (/var/run/postgresql may be missing); -F: no fsync.
        pg(
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-w",
            "-t",
            "120",
            "-o",
            f"-h 127.0.0.1 -p {port} -k {base} -F",
            "start",
        )
        started = True
        yield Postgres(port=port, bindir=bindir, superuser=superuser, password=password, base=base)
    finally:
        if started:
            subprocess.run(
                [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(base, ignore_errors=True)


# -- MLflow tracking server ---------------------------------------------------------------------------
class MlflowServer:
    """``argv`` (an ``mlflow server ... --host 127.0.0.1 --port PORT`` command) as a stoppable process.

    The server and its uvicorn workers form one process group, so ``stop`` ends all of them.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        port: int,
        username: str,
        password: str,
        log: Path,
    ) -> None:
        self.argv, self.env, self.port = list(argv), dict(env), port
        self.username, self.password, self.log = username, password, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def client_env(self) -> dict[str, str]:
        """What a client needs to log here as the admin (MLflow reads these itself)."""
        return {
            "MLFLOW_TRACKING_URI": self.url,
            "MLFLOW_TRACKING_USERNAME": self.username,
            "MLFLOW_TRACKING_PASSWORD": self.password,
        }

    def start(self, *, wait: bool = True, timeout: float = 240) -> None:
        self.starts += 1
        log = self.log if self.starts == 1 else self.log.with_suffix(f".{self.starts}.log")
        with open(log, "w") as fh:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.log.parent,
            )
        if wait:
            self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 240) -> None:
        """Wait for ``/health``, which answers without credentials even with basic auth."""
        log = self.log if self.starts == 1 else self.log.with_suffix(f".{self.starts}.log")
        wait_healthy(f"{self.url}/health", self.proc, log, timeout)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)


def auth_ini(target: Path, replacements: Mapping[str, str]) -> Path:
    """``docker/mlflow/basic_auth.ini`` with strings in its values replaced (e.g. the database host)."""
    config = configparser.ConfigParser()
    config.read(DOCKER / "mlflow" / "basic_auth.ini")
    for key, value in config["mlflow"].items():
        for old, new in replacements.items():
            value = value.replace(old, new)
        config["mlflow"][key] = value
    with open(target, "w") as fh:
        config.write(fh)
    return target


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode} before {url} was healthy:\n{tail(log)}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not healthy after {timeout:.0f} s:\n{tail(log)}")


@contextmanager
def mlflow_server(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    port: int,
    username: str,
    password: str,
    log: Path,
    timeout: float = 240,
) -> Iterator[MlflowServer]:
    """Start the server, wait until it is healthy, and stop it (whichever start is current) at the end."""
    server = MlflowServer(argv, env, port=port, username=username, password=password, log=log)
    try:
        server.start(timeout=timeout)
        yield server
    finally:
        server.stop()


# -- any HTTP service ---------------------------------------------------------------------------------
@contextmanager
def http_service(
    argv: Sequence[str], env: Mapping[str, str], *, health: str, log: Path, timeout: float = 120
) -> Iterator[subprocess.Popen]:
    """Run ``argv`` as a process group until ``health`` answers 200; stop the group at the end."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=log.parent,
        )
    try:
        wait_healthy(health, proc, log, timeout)
        yield proc
    finally:
        stop_group(proc)


# -- S3 object store ----------------------------------------------------------------------------------
@dataclass
class S3:
    """An S3 endpoint on 127.0.0.1 and the keys it was given (moto accepts any keys)."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in ``bucket`` under ``prefix``, listed through the S3 API."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


@contextmanager
def s3_server(log: Path, *, access_key: str, secret_key: str) -> Iterator[S3]:
    """moto's S3 server (``python -m moto.server``) on 127.0.0.1; skip the test if moto is missing.

    A process of its own rather than moto's in-process thread: the stored checkpoints stay out of
    the test's memory, and the server ends with its process group like the others.
    """
    for module in ("moto.server", "boto3", "flask_cors"):  # flask_cors: moto's [server] extra
        pytest.importorskip(module, reason=f"the S3 test server: {MOTO_PIP}")
    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with http_service(argv, env, health=f"http://127.0.0.1:{port}/moto-api/", log=log):
        yield S3(endpoint=f"http://127.0.0.1:{port}", access_key=access_key, secret_key=secret_key)
