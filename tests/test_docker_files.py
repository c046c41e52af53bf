"""Static checks of docker/: the compose stack's shape, its mococxr commands, ports and secrets.

There is no Docker daemon where these run; tests/test_servers.py runs the same topology natively.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest
import yaml
from servers import COMPOSE, DOCKER, REPO, compose_service, interpolate, load_compose

from mococxr.cli import build_parser

SERVICES = {"postgres", "storage", "storage-init", "mlflow", "optuna-dashboard", "worker", "paper-worker"}
WORKERS = ("worker", "paper-worker")  # `mococxr sweep` and `mococxr paper` workers
ONE_SHOT = {"storage-init"}  # run once and exit; the others must report health
PUBLISHED = {"mlflow", "optuna-dashboard"}
SECRET = re.compile(r"PASSWORD|SECRET|ACCESS_KEY")


def env_example() -> dict[str, str]:
    """docker/.env.example as a mapping (what a user copies to docker/.env)."""
    pairs = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(env_example())


def test_compose_parses_and_has_the_services(compose):
    assert SERVICES <= set(compose["services"]), sorted(compose["services"])
    raw = yaml.safe_load(COMPOSE.read_text())
    assert set(raw["volumes"]) == {"postgres-data", "storage-data"}


def test_env_example_defines_every_required_variable():
    env = env_example()
    load_compose(env)  # raises KeyError naming a ${VAR:?} that .env.example lacks
    for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", COMPOSE.read_text()):
        without = {k: v for k, v in env.items() if k != name}
        with pytest.raises(KeyError, match=name):
            load_compose(without)


def test_interpolation_follows_compose_rules():
    env = {"SET": "v", "EMPTY": ""}
    assert (
        interpolate("$$SET ${SET} $SET ${MISSING:-d} ${EMPTY:-d} ${EMPTY-d} ${SET:+alt}", env)
        == "$SET v v d d  alt"
    )
    assert interpolate("${MISSING:-${SET}}", env) == "v"
    with pytest.raises(KeyError, match="EMPTY: give it"):
        interpolate("${EMPTY:?give it}", env)


def mococxr_commands(compose: dict) -> list[tuple[str, list[str]]]:
    """Every ``mococxr ...`` invocation in a service's entrypoint or command, as argv lists."""
    found = []
    for name, service in compose["services"].items():
        for key in ("entrypoint", "command"):
            value = service.get(key)
            if not value:
                continue
            argv = shlex.split(value) if isinstance(value, str) else [str(v) for v in value]
            if argv[:1] == ["mococxr"]:
                found.append((name, argv[1:]))
            for part in (a for a in argv if " " in a):  # shell scripts: sh -c "... mococxr sweep ..."
                for line in re.split(r"&&|;|\|\||\n", part):
                    words = shlex.split(line)
                    if words[:1] == ["mococxr"]:
                        found.append((name, words[1:]))
    return found


def test_every_mococxr_command_parses_with_the_real_cli(compose):
    commands = mococxr_commands(compose)
    assert {name for name, _ in commands} >= set(WORKERS)
    parser = build_parser()
    for name, argv in commands:
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"service {name}: `mococxr {' '.join(argv)}` is not a valid mococxr command line")
        if args.command == "sweep":
            assert (REPO / args.spec).is_file(), (
                f"service {name}: study spec {args.spec} is not in the repository"
            )
        if args.command == "paper":
            assert (REPO / args.spec).is_file(), f"service {name}: plan {args.spec} is not in the repository"
        if args.command in ("sweep", "paper"):  # the stack's Optuna database, password from PGPASSWORD
            assert args.storage == "postgresql+psycopg2://optuna@postgres:5432/optuna", (name, args.storage)


@pytest.mark.parametrize("worker", WORKERS)
def test_worker_logs_to_the_server_with_credentials(compose, worker):
    env = compose_service(worker, env_example())["environment"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["MLFLOW_TRACKING_USERNAME"] and env["MLFLOW_TRACKING_PASSWORD"]
    assert int(env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 10  # MLflow refuses more
    assert "AWS_SECRET_ACCESS_KEY" not in env  # artifacts go through the server, not to S3
    assert env["PGPASSWORD"]


def test_paper_worker_runs_the_phantom_plan_by_default_and_only_when_named(compose):
    """`up --scale worker=N` starts no paper worker (profile); its defaults are the phantom plan and that
    plan's own data roots, under the data folder the sweep workers mount too."""
    env = env_example()
    paper, sweep = compose_service("paper-worker", env), compose_service("worker", env)
    assert paper["profiles"] == ["paper"] and "profiles" not in sweep
    assert paper["restart"] == "on-failure" and paper["volumes"] == sweep["volumes"]
    assert paper["healthcheck"] == sweep["healthcheck"]
    assert {k: v for k, v in paper["environment"].items() if k in sweep["environment"]} == sweep[
        "environment"
    ]
    argv = paper["command"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    plan = yaml.safe_load((REPO / argv[2]).read_text())
    assert argv[2] == "sweeps/paper_phantom.yaml" and plan.get("phantom")
    assert flags["--chexpert-root"] == plan["data"]["chexpert"]["root"]
    assert flags["--shenzhen-root"] == plan["data"]["shenzhen"]["root"]
    assert {flags["--chexpert-root"].split("/")[0], flags["--out"].split("/")[0]} == {"data"}  # mounted
    assert "/work/data" in {v.split(":")[1] for v in paper["volumes"]}
    overridden = {
        **env,
        "PAPER_PLAN": "sweeps/paper.yaml",
        "CHEXPERT_ROOT": "data/CheXpert",
        "SHENZHEN_ROOT": "data/ChinaSet_AllFiles",
    }
    argv = compose_service("paper-worker", overridden)["command"]
    assert argv[2] == "sweeps/paper.yaml" and {"data/CheXpert", "data/ChinaSet_AllFiles"} <= set(argv)


def test_mlflow_server_is_authenticated_and_proxies_artifacts(compose):
    service = compose_service("mlflow", env_example())
    argv = service["command"]
    assert argv[:2] == ["mlflow", "server"]
    assert {"--app-name=basic-auth", "--serve-artifacts", "--host=0.0.0.0", "--port=5000"} <= set(argv)
    flags = dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    assert flags["--backend-store-uri"].startswith("postgresql+psycopg2://mlflow@postgres:5432/")
    assert flags["--artifacts-destination"].startswith("s3://")
    env = service["environment"]
    ini_mount = {v.split(":")[1] for v in service["volumes"] if "basic_auth.ini" in v}
    assert env["MLFLOW_AUTH_CONFIG_PATH"] in ini_mount
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] and env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://storage:9000"
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]


def test_object_store_is_rustfs_and_the_bucket_is_the_artifact_destination(compose):
    """RustFS, as MLflow's own docker-compose/ uses now (MinIO publishes no community images)."""
    env = env_example()
    storage, init = compose_service("storage", env), compose_service("storage-init", env)
    mlflow = compose_service("mlflow", env)
    assert storage["image"].startswith("rustfs/rustfs:")
    assert storage["environment"]["RUSTFS_ACCESS_KEY"] == mlflow["environment"]["AWS_ACCESS_KEY_ID"]
    assert storage["environment"]["RUSTFS_SECRET_KEY"] == mlflow["environment"]["AWS_SECRET_ACCESS_KEY"]
    assert storage["environment"]["RUSTFS_ADDRESS"] == ":9000"
    assert init["environment"]["AWS_ENDPOINT_URL_S3"] == mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"]
    destination = next(a for a in mlflow["command"] if a.startswith("--artifacts-destination="))
    assert destination.split("=", 1)[1].startswith(f"s3://{init['environment']['MLFLOW_BUCKET']}/")
    [script] = init["command"]
    assert "create-bucket" in script and subprocess.run(["sh", "-n", "-c", script]).returncode == 0
    assert "/backup" in {v.split(":")[1] for v in init["volumes"]}  # docker/README.md's backup uses it


def test_every_pulled_image_is_pinned(compose):
    for name, service in compose["services"].items():
        image = service["image"]
        if "build" in service:  # the mococxr image, built here from docker/Dockerfile
            continue
        assert ":" in image and not image.endswith(":latest"), f"service {name}: pin {image!r} to a tag"
        assert "minio" not in image, f"service {name}: MinIO publishes no community images any more"


def test_published_ports_bind_loopback_only(compose):
    for name, service in compose["services"].items():
        ports = service.get("ports", [])
        assert bool(ports) == (name in PUBLISHED), f"service {name} publishes {ports}"
        for port in ports:
            text = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
            assert text.startswith("127.0.0.1:"), f"service {name} publishes {port!r} beyond 127.0.0.1"
        assert service.get("network_mode") != "host"


def test_health_checks_and_start_order(compose):
    services = compose["services"]
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no"
            continue
        assert service.get("healthcheck", {}).get("test"), f"service {name} has no healthcheck"
        for dep, condition in (service.get("depends_on") or {}).items():
            expected = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert condition == {"condition": expected}, f"{name} -> {dep}: {condition}"
    assert set(services["mlflow"]["depends_on"]) == {"postgres", "storage", "storage-init"}
    for worker in WORKERS:
        assert set(services[worker]["depends_on"]) == {"postgres", "mlflow"}


def test_no_secret_values_are_committed():
    for key, value in env_example().items():
        if SECRET.search(key):
            assert value == "change-me", f"docker/.env.example: {key} must be the placeholder change-me"
    raw = yaml.safe_load(COMPOSE.read_text())
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET.search(key):
                assert re.fullmatch(r"\$\{[A-Z][A-Z0-9_]*:\?[^}]*\}", str(value)), (
                    f"{name}.{key} is not a required ${{VAR}}"
                )
    ini = (DOCKER / "mlflow" / "basic_auth.ini").read_text()
    assert not re.search(r"^\s*admin_password\s*=", ini, re.M)
    assert not re.search(r"://[^/@\s]+:[^/@\s]+@", ini + COMPOSE.read_text()), "a password inside a URL"
    assert not (DOCKER / ".env").exists() or _git_ignored(DOCKER / ".env")
    if shutil.which("git") and (REPO / ".git").exists():
        tracked = subprocess.run(
            ["git", "ls-files", "docker"], cwd=REPO, capture_output=True, text=True
        ).stdout
        assert "docker/.env\n" not in tracked


def _git_ignored(path) -> bool:
    if not shutil.which("git"):
        return False
    return subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO).returncode == 0


def test_dockerfile_has_a_base_build_arg_and_the_project_pins():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert text.index("ARG BASE") < text.index("FROM ${BASE}")
    pyproject = (REPO / "pyproject.toml").read_text()
    for package in ("torch", "torchvision"):
        spec = re.search(rf'"({package}[<>=!~][^"]*)"', pyproject).group(1)
        assert f'"{spec}"' in text, f"Dockerfile must install {spec} as pyproject.toml pins it"
    assert "mlflow[auth]" in text and "boto3" in text  # basic-auth app and the S3 artifact store


def test_init_script_is_valid_shell_and_creates_the_databases():
    script = DOCKER / "postgres" / "init-databases.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for database in ("mlflow", "mlflow_auth", "optuna"):
        assert f"CREATE DATABASE {database} OWNER" in text
    ini = (DOCKER / "mlflow" / "basic_auth.ini").read_text()
    assert "@postgres:5432/mlflow_auth" in ini
