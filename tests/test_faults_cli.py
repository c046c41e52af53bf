"""The CLI's one boundary for errors: every failure a user can cause is one line `mococxr: error: ...`
naming the culprit (flag, file, URI, id), exit 2, no traceback; a bug is one line, exit 1, and
`--debug` shows its traceback; SIGTERM is Ctrl-C with exit 143 and the run marked KILLED."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from cli_errors import alias_bomb, nothing_started
from cli_errors import exit_code as _exit_code
from cli_errors import one_error as _one_error
from mlflow.tracking import MlflowClient

from mococxr.cli import main
from mococxr.data.phantom import synthesize
from mococxr.tracking import artifacts as ma
from mococxr.tracking import mlflow as mt


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "ph"
    synthesize(root, 24, size=32, seed=0)
    return root


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """An empty sqlite store with MLflow's tables, made once (creating the tables takes seconds)."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    mt.open_store(f"sqlite:///{db}")
    mlflow.set_tracking_uri(None)
    return db


@pytest.fixture()
def store(template, tmp_path, monkeypatch, capsys) -> Path:
    """A fresh, opened sqlite store for one test (a copy of the template: no table-creation log)."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(template, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("MOCOCXR_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    mt.open_store()
    capsys.readouterr()
    return db


# -- bad flag values: refused when the config is built (or by argparse), before any work -----------------
BAD_FLAGS = [
    (["pretrain", "--batch-size", "0"], "--batch-size="),
    (["pretrain", "--batch-size", "-4"], "--batch-size="),
    (["pretrain", "--batch-size", "sixteen"], "--batch-size="),
    (["pretrain", "--epochs", "0"], "--epochs="),
    (["pretrain", "--image-size", "0"], "--image-size="),
    (["pretrain", "--lr", "-1"], "--lr="),
    (["pretrain", "--lr", "fast"], "--lr="),
    (["pretrain", "--moco-t", "0"], "--moco-t="),
    (["pretrain", "--moco-k", "30", "--batch-size", "16"], "--moco-k="),
    (["pretrain", "--keep", "best:2"], "--keep="),
    (["pretrain", "--keep", "every:0"], "--keep="),
    (["pretrain", "--policy", "ignroe"], "--policy"),
    (["pretrain", "--backbone", "vgg16"], "--backbone"),
    (["pretrain", "--optimizer", "lion"], "--optimizer"),
    (["pretrain", "--val", "1.5"], "--val="),
    (["pretrain", "--test", "-0.1"], "--test="),
    (["finetune", "--fraction", "0"], "--fraction="),
    (["finetune", "--fraction", "1.5"], "--fraction="),
    (["finetune", "--protocol", "finetune"], "--protocol"),
    (["finetune", "--draw", "-1"], "--draw="),
    (["finetune", "--weight-decay", "-0.1"], "--weight-decay="),
    (["finetune", "--epochs-scale", "0"], "--epochs-scale="),
    (["registry", "promote", "--name", "m", "--version", "1", "--stage", "prod"], "--stage"),
    (["registry", "promote", "--name", "m", "--version", "1"], "--stage"),
    (["registry", "register", "--name", "m", "--run-id", "abc", "--stage", "live"], "--stage"),
    (["registry", "register", "--name", "m", "--run-id", "abc"], "--epoch"),
    (["--tracking-uri", "foo://bar", "registry", "list"], "foo://bar"),
    (["data", "synth", "--out", "x", "--layout", "nih"], "--layout"),
]


@pytest.mark.parametrize(("argv", "culprit"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_value_is_one_line(argv, culprit, phantom, store, capsys):
    if argv[0] in ("pretrain", "finetune"):
        argv = [*argv, "--root", str(phantom)]
    _one_error(capsys, _exit_code(argv), culprit)
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")  # nothing started


def test_tracking_uri_lists_the_supported_schemes(tmp_path, capsys):
    line = _one_error(capsys, _exit_code(["--tracking-uri", "foo://bar", "registry", "list"]), "foo://bar")
    for scheme in ("sqlite:///", "postgresql://", "mysql://", "http"):
        assert scheme in line


# -- broken stores ------------------------------------------------------------------------------------------
def test_corrupt_sqlite_store_names_the_file(tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    db.write_bytes(os.urandom(8192))
    code = _exit_code(["--tracking-uri", f"sqlite:///{db}", "registry", "list"])
    assert "not an SQLite database" in _one_error(capsys, code, str(db))
    assert db.stat().st_size == 8192  # left as it was for the user to restore


def test_truncated_sqlite_store_names_the_file(template, tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    db.write_bytes(template.read_bytes()[: template.stat().st_size // 2])
    code = _exit_code(["--tracking-uri", f"sqlite:///{db}", "registry", "list"])
    assert "truncated" in _one_error(capsys, code, str(db))


def test_malformed_pages_inside_a_valid_header_name_the_file(template, tmp_path, capsys):
    """A store whose header is intact but whose pages are garbage fails in MLflow; still one line."""
    data = bytearray(template.read_bytes())
    data[100:] = os.urandom(len(data) - 100)
    db = tmp_path / "mlflow.db"
    db.write_bytes(bytes(data))
    code = _exit_code(["--tracking-uri", f"sqlite:///{db}", "registry", "list"])
    assert "is damaged" in _one_error(capsys, code, str(db))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_server_fails_within_the_timeout(monkeypatch, capsys):
    monkeypatch.setenv("MOCOCXR_SERVER_TIMEOUT", "3")
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    t0 = time.monotonic()
    code = _exit_code(["--tracking-uri", uri, "registry", "list"])
    assert time.monotonic() - t0 < 10
    _one_error(capsys, code, uri, "MOCOCXR_SERVER_TIMEOUT")


def test_silent_server_fails_within_the_timeout(monkeypatch, capsys):
    """A server that accepts connections but never answers (hung): the probe's timeout bounds it."""
    monkeypatch.setenv("MOCOCXR_SERVER_TIMEOUT", "2")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        t0 = time.monotonic()
        code = _exit_code(["--tracking-uri", uri, "registry", "list"])
        assert time.monotonic() - t0 < 10
    assert "no answer" in _one_error(capsys, code, uri)


def test_bad_server_timeout_is_named(monkeypatch, capsys):
    monkeypatch.setenv("MOCOCXR_SERVER_TIMEOUT", "soon")
    _one_error(
        capsys,
        _exit_code(["--tracking-uri", "http://127.0.0.1:9", "registry", "list"]),
        "MOCOCXR_SERVER_TIMEOUT",
        "soon",
    )


# -- unknown ids and URIs ------------------------------------------------------------------------------------
UNKNOWN = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    "argv, culprit",
    [
        (["pretrain", "--resume", UNKNOWN], UNKNOWN),
        (["finetune", "--init", f"models:/m-{UNKNOWN}"], f"m-{UNKNOWN}"),
        (["finetune", "--init", "models:/nosuch@production"], "nosuch"),
        (["finetune", "--init", "models:/nosuch/3"], "nosuch"),
        (["finetune", "--init", f"runs:/{UNKNOWN}/state_dict.pt"], UNKNOWN),
        (["registry", "promote", "--name", "nosuch", "--version", "1", "--stage", "staging"], "nosuch"),
        (["registry", "register", "--name", "m", "--run-id", UNKNOWN, "--epoch", "1"], UNKNOWN),
        (["registry", "register", "--name", "m", "--model-id", f"m-{UNKNOWN}"], f"m-{UNKNOWN}"),
        (["registry", "list", "--name", "nosuch"], "nosuch"),
    ],
)
def test_unknown_id_or_uri_is_one_line(argv, culprit, phantom, store, capsys):
    if argv[0] in ("pretrain", "finetune"):
        argv = [*argv, "--root", str(phantom), "--image-size", "32", "--epochs", "1"]
    _one_error(capsys, _exit_code(argv), culprit)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert all(r.info.status != "RUNNING" for r in runs)


def test_an_image_as_init_is_not_a_checkpoint(phantom, store, capsys):
    png = next(phantom.rglob("*.jpg"), None) or next(phantom.rglob("*.png"))
    code = _exit_code(
        ["finetune", "--init", str(png), "--root", str(phantom), "--image-size", "32", "--epochs", "1"]
    )
    line = _one_error(capsys, code, str(png), "not a PyTorch file")
    assert "weights_only" not in line


# -- outputs that are files, and files that are empty --------------------------------------------------------
def test_synth_out_naming_a_file_writes_nothing(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("keep me")
    _one_error(
        capsys, _exit_code(["data", "synth", "--out", str(target), "--n", "4", "--size", "32"]), str(target)
    )
    assert target.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [target]


def test_report_out_naming_a_file_writes_nothing(tmp_path, store, capsys):
    target = tmp_path / "report.md"
    target.write_text("keep me")
    _one_error(capsys, _exit_code(["report", "--experiment", "x", "--out", str(target)]), str(target))
    assert target.read_text() == "keep me"


def test_check_reports_a_header_only_csv(tmp_path, capsys):
    csv = tmp_path / "labels.csv"
    csv.write_text("path,Effusion\n")
    assert _exit_code(["data", "check", "--dataset", "csv", "--root", str(csv)]) == 1
    out = capsys.readouterr()
    assert "no data rows" in out.out and str(csv) in out.out


def test_grid_epochs_table_with_a_non_number_names_the_key(tmp_path, capsys):
    spec = tmp_path / "grid.yaml"
    spec.write_text(
        "experiment: t\ninits: [random]\nprotocols: [linear]\nfractions: [0.5, 1.0]\nepochs: {0.5: ten}\n"
    )
    _one_error(capsys, _exit_code(["grid", str(spec), "--dry-run"]), "epochs.0.5", "ten")


# -- plan specs: every bad field is one line when the spec is read, before any run or study ------------------
PHANTOM_PLAN = Path(__file__).resolve().parents[1] / "sweeps" / "paper_phantom.yaml"
BOMB = alias_bomb()  # nine anchors of nine aliases: 9**9 values once expanded, in 400 bytes
PLAN_FAULTS = [  # (dotted key, bad value, what the one error line names besides the file)
    ("report.replicates", -5, "report.replicates=-5"),
    ("report.replicates", "many", "report.replicates='many'"),
    ("report.bootstrap", 500, "report: unknown key(s) bootstrap"),
    ("name", "a'b\"c", "name="),
    ("name", "", "name=''"),
    ("name", ["x"], "name=['x']"),
    ("name", BOMB, "alias"),
    ("pretrain.backbones", BOMB, "alias"),
    ("pretrain.backbones", ["resnet18", "resnet18"], "pretrain.backbones="),
    ("pretrain.backbones", ["vgg16"], "pretrain.backbones"),
    ("pretrain.study.budget.n_trials", 0, "budget.n_trials=0"),
    ("pretrain.study.base.lr", -1, "base.lr="),
    ("pretrain.study.base.data", {"root": "x"}, "pretrain.study.base: data"),
    ("pretrain.study.objective.metric", "val/linear_auc_Edema", "objective.metric="),
    ("pretrain.study.sampler", "grid", "pretrain.study.sampler="),
    ("finetune.base.lr", 0, "finetune.base.lr="),
    ("finetune.base.epochs", 0, "finetune.base.epochs="),
    ("finetune.base.fraction", 0.5, "finetune.base: fraction"),
    ("finetune.protocol_overrides.linear.min_steps", -1, "finetune.protocol_overrides.linear.min_steps="),
    ("finetune.protocol_overrides.lineer", {"lr": 1e-3}, "finetune.protocol_overrides.lineer"),
    ("finetune.baseline", "moco", "finetune.baseline='moco'"),
    ("data.chexpert.val", 1.5, "data.chexpert.val=1.5"),
    ("data.shenzhen", [1], "data.shenzhen=[1]"),
    ("phantom.size", 0, "phantom.size=0"),
    ("stages.chexpert.fractions", [0, 1.0], "stages.chexpert.fractions="),
    ("stages.chexpert.fractions", [0.1, 1.5], "stages.chexpert.fractions="),
    ("stages.chexpert.fractions", [0.1, 0.1], "stages.chexpert.fractions="),
    ("stages.chexpert.draws", 0, "stages.chexpert.draws=0"),
    ("stages.chexpert.draws", {0.1: 1, 1.0: 1, 0.5: 2}, "stages.chexpert.draws.0.5"),
    ("stages.shenzhen.epochs", {0.0625: 0}, "stages.shenzhen.epochs.0.0625=0"),
    ("stages.competition.tasks", {"Edema": "maybe"}, "stages.competition.tasks.Edema"),
    ("stages.table2.epochs", 0, "stages.table2.epochs=0"),
    ("stages.table2.fraction", 1.5, "stages.table2.fraction="),
    ("stages.table2.protocol", "finetune", "stages.table2.protocol="),
    ("cost.gpu_img_s_resnet18", 0, "cost.gpu_img_s_resnet18="),
    ("extra", 1, "unknown key(s) extra"),
]


def bad_plan(path: Path, key: str, value) -> Path:
    """The phantom plan with ``key`` set to ``value`` (BOMB: the alias bomb, written as YAML)."""
    raw = yaml.safe_load(PHANTOM_PLAN.read_text())
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = "BOMB" if value is BOMB else value
    path.write_text(yaml.safe_dump(raw, sort_keys=False).replace("BOMB", BOMB))
    return path


def _fault_id(case: tuple) -> str:
    key, value, _ = case
    return f"{key}={'bomb' if value is BOMB else value}"


PLAN_SAMPLE = [  # what `paper --plan` is tried with
    f
    for f in PLAN_FAULTS
    if _fault_id(f)
    in ("report.replicates=-5", "name=a'b\"c", "name=bomb", "pretrain.backbones=bomb", "extra=1")
]


@pytest.mark.parametrize(("key", "value", "culprit"), PLAN_FAULTS, ids=[_fault_id(f) for f in PLAN_FAULTS])
def test_a_bad_plan_spec_is_one_line_before_any_run(
    key, value, culprit, store, tmp_path, monkeypatch, capsys
):
    """`mococxr paper SPEC` opens the store, then reads the spec: a bad field fails there, nothing run."""
    monkeypatch.chdir(tmp_path)  # the plan's data roots are relative: nothing may land in the repository
    spec = bad_plan(tmp_path / "plan.yaml", key, value)
    _one_error(capsys, _exit_code(["paper", str(spec)]), f"{spec}:", culprit)
    nothing_started(store)


@pytest.mark.parametrize(("key", "value", "culprit"), PLAN_SAMPLE, ids=[_fault_id(f) for f in PLAN_SAMPLE])
def test_a_bad_plan_spec_is_one_line_for_paper_plan(
    key, value, culprit, store, tmp_path, monkeypatch, capsys
):
    """`paper --plan` reads the same spec the same way (a sample of the cases above)."""
    monkeypatch.chdir(tmp_path)
    spec = bad_plan(tmp_path / "plan.yaml", key, value)
    _one_error(capsys, _exit_code(["paper", str(spec), "--plan"]), f"{spec}:", culprit)
    nothing_started(store)


@pytest.mark.parametrize("command", ["sweep", "grid"])
def test_an_alias_bomb_is_one_line_for_every_spec_command(command, store, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: {BOMB}\nexperiment: x\n")
    _one_error(capsys, _exit_code([command, str(spec)]), f"{spec}:", "alias")
    nothing_started(store)


# -- bugs, --debug and signals -------------------------------------------------------------------------------
def test_a_bug_is_one_line_exit_1_and_debug_shows_the_traceback(monkeypatch, capsys):
    import mococxr.data.records as records

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(records, "check_dataset", broken)
    assert _exit_code(["data", "check", "--dataset", "csv", "--root", "x.csv"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--debug" in err and "ZeroDivisionError" in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "data", "check", "--dataset", "csv", "--root", "x.csv"])


def test_sigterm_marks_the_run_killed_and_exits_143(store, monkeypatch, capsys):
    """In-process: a command whose run receives SIGTERM ends it KILLED, prints one line, returns 143."""
    import mococxr.cli as cli

    def cmd(args):
        with mt.start_run("sigterm-test", run_name="victim"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
        return 0

    monkeypatch.setattr(cli, "cmd_data_check", cmd)
    before = signal.getsignal(signal.SIGTERM)
    assert _exit_code(["data", "check", "--dataset", "csv", "--root", "x.csv"]) == 143
    assert signal.getsignal(signal.SIGTERM) == before  # restored for the rest of the process
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SIGTERM" in err
    (run,) = mlflow.search_runs(experiment_names=["sigterm-test"], output_format="list")
    assert run.info.status == "KILLED"


def test_sigterm_to_the_command_exits_143(tmp_path):
    """The real process: `mococxr data synth` (many images) terminated exits 143 with one line."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mococxr",
            "data",
            "synth",
            "--out",
            str(tmp_path / "ph"),
            "--n",
            "20000",
            "--size",
            "64",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "ph").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "SIGTERM" in err


# -- full disk and read-only artifact folders ----------------------------------------------------------------
def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); needs root and "
            "CAP_SYS_ADMIN"
        )


@pytest.fixture()
def mounted(tmp_path):
    mounts: list[Path] = []

    def mount(name: str, options: str) -> Path:
        path = tmp_path / name
        _mount_tmpfs(path, options)
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", str(path)], check=False)


PRETRAIN = [
    "pretrain",
    "--init",
    "random",
    "--image-size",
    "32",
    "--batch-size",
    "8",
    "--epochs",
    "1",
    "--moco-k",
    "16",
    "--workers",
    "0",
    "--experiment",
    "disk",
]


def _pretrain_fails_on(artifacts: Path, phantom: Path, monkeypatch, capsys, *culprits: str) -> None:
    monkeypatch.setenv("MOCOCXR_ARTIFACT_ROOT", str(artifacts))
    code = _exit_code([*PRETRAIN, "--root", str(phantom)])
    err = capsys.readouterr().err
    errors = [line[line.index("mococxr:") :] for line in err.splitlines() if "mococxr:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    for culprit in culprits:
        assert culprit in errors[0], errors[0]
    (run,) = mlflow.search_runs(experiment_names=["disk"], output_format="list")
    assert run.info.status == "FAILED"
    exp = mlflow.get_experiment_by_name("disk").experiment_id
    models = MlflowClient().search_logged_models(experiment_ids=[exp])
    assert all("READY" not in str(m.status) for m in models)
    # no truncated checkpoint left where a models:/ URI would find it
    assert not [p for p in artifacts.rglob("state_dict.pt")]


@pytest.mark.slow
def test_full_disk_is_one_line_and_the_run_failed(mounted, phantom, store, monkeypatch, capsys):
    disk = mounted("full", "size=1m")
    _pretrain_fails_on(disk / "artifacts", phantom, monkeypatch, capsys, str(disk), "no space left")


@pytest.mark.slow
def test_read_only_artifacts_are_one_line_and_the_run_failed(mounted, phantom, store, monkeypatch, capsys):
    disk = mounted("ro", "ro,size=1m")
    _pretrain_fails_on(disk / "artifacts", phantom, monkeypatch, capsys, str(disk), "read-only")


def test_header_only_csv_read_is_one_line(tmp_path, capsys):
    csv = tmp_path / "labels.csv"
    csv.write_text("path,Effusion\n")
    _one_error(
        capsys,
        _exit_code(["data", "stats", "--dataset", "csv", "--root", str(csv)]),
        str(csv),
        "no data rows",
    )


def test_experiments_open_in_model_training_mode(store):
    """MLflow 3's UI opens an experiment without this tag in GenAI mode; older experiments gain it."""
    client = MlflowClient()
    exp = client.get_experiment(mt.ensure_experiment("new-one"))
    assert exp.tags[mt.EXPERIMENT_KIND_TAG] == "custom_model_development" and exp.tags[mt.NOTE_TAG]
    old = client.create_experiment("older-one")
    assert mt.ensure_experiment("older-one") == old
    assert client.get_experiment(old).tags[mt.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_a_json_artifact_that_does_not_fit_leaves_no_partial_file(mounted, store, monkeypatch):
    disk = mounted("small", "size=64k")
    monkeypatch.setenv("MOCOCXR_ARTIFACT_ROOT", str(disk / "artifacts"))
    with pytest.raises(OSError), mt.start_run("small-disk"):
        ma.log_json({"x": "y" * 200_000}, "big/config.json")
    assert not list(disk.rglob("config.json"))
    (run,) = mlflow.search_runs(experiment_names=["small-disk"], output_format="list")
    assert run.info.status == "FAILED"


def test_a_server_store_bounds_mlflow_retries_unless_set(monkeypatch):
    """Opening an http store sets MLflow's retry/timeout variables the user left unset, and only those."""
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's spelling
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    names = (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
    )
    for name in names:
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)  # restored (to unset) after the test
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    monkeypatch.setenv("MOCOCXR_SERVER_TIMEOUT", "4")
    try:
        mt.open_store(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        mlflow.set_tracking_uri(None)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"  # the user's choice stands
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "4"
    assert int(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]) <= 1


def test_corrupt_optuna_storage_is_one_line(tmp_path, store, capsys):
    bad = tmp_path / "optuna.db"
    bad.write_bytes(os.urandom(4096))
    spec = Path(__file__).resolve().parents[1] / "sweeps" / "pretrain_lr.yaml"
    code = _exit_code(["sweep", str(spec), "--storage", f"sqlite:///{bad}", "--n-trials", "1"])
    _one_error(capsys, code, str(bad), "not a database")
