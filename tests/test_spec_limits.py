"""Specs that cannot hurt: every YAML the project reads goes through one bounded loader (an alias bomb,
a recursive alias, deep nesting, a repeated key or an oversized file is one ConfigError naming the file),
and every field of a study and a grid spec is checked when the spec is read, before any run or study.
The plan spec's fields are tried through the CLI in tests/test_faults_cli.py."""

from __future__ import annotations

import ast
import copy
import os
import re
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from cli_errors import alias_bomb, nothing_started

from mococxr.config import load_yaml
from mococxr.config.yaml_limits import MAX_BYTES, BoundedLoader, parse_yaml
from mococxr.errors import ConfigError
from mococxr.sweep.grid_spec import load_grid
from mococxr.sweep.spec import parse_spec

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted([*(REPO / "sweeps").glob("*.yaml"), *(REPO / "mococxr" / "specs").glob("*.yaml")])


# -- the loader ----------------------------------------------------------------------------------------------
def test_an_alias_bomb_is_refused_at_once_without_growing(tmp_path):
    spec = tmp_path / "bomb.yaml"
    spec.write_text(f"name: {alias_bomb()}\n")
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match="aliases are expanded") as err:
            load_yaml(spec)
        seconds, (_, peak) = time.perf_counter() - t0, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seconds < 2 and peak < 20e6, (seconds, peak)
    assert str(err.value).startswith(f"{spec}: line 1: refused") and "*l" in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &a [1, *a]\n", "recursive alias"),
        ("a: " + "[" * 100 + "]" * 100 + "\n", "nested more than"),
        (
            "lr: 1.0e-3\nbatch_size: 16\nlr: 1.0e-4\n",
            "key 'lr' is given twice in one mapping (first on line 1)",
        ),
        ("a: " + "9" * 5000 + "\n", "not valid YAML (ValueError"),
        ("day: 2024-13-01\n", "not valid YAML (ValueError"),
        ("a: *nowhere\n", "undefined alias"),
        ("a: 1\n---\nb: 2\n", "not valid YAML"),
    ],
    ids=["recursive", "deep", "repeated-key", "huge-int", "bad-date", "undefined-alias", "two-documents"],
)
def test_what_the_loader_refuses_is_one_config_error(text, message, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_yaml(spec)
    assert str(err.value).startswith(f"{spec}:") and "\n" not in str(err.value)


def test_the_node_limit_counts_what_aliases_stand_for(monkeypatch):
    monkeypatch.setattr(BoundedLoader, "max_nodes", 40)
    assert parse_yaml("a: &a [1, 2, 3]\nb: [*a, *a, *a]\n")  # 1 + 2 + 4 + 2 + 1 + 3 * 4 = 22 nodes
    with pytest.raises(ConfigError, match="more than 40 values"):
        parse_yaml("a: &a [1, 2, 3, 4, 5, 6, 7, 8]\nb: [*a, *a, *a, *a]\n")
    with pytest.raises(ConfigError, match="more than 40 values"):
        parse_yaml("a: [" + ", ".join(["x"] * 41) + "]\n")


def test_an_oversized_file_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    spec = tmp_path / "big.yaml"
    spec.write_text("# padding\n" * (MAX_BYTES // 10 + 1))
    monkeypatch.setattr(BoundedLoader, "__init__", lambda *a: pytest.fail("parsed"))
    with pytest.raises(ConfigError, match=re.escape(f"{spec}: refused: 1,000,010 bytes")):
        load_yaml(spec)


def test_a_folder_or_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_yaml(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_specs_read_as_plain_yaml_does(path):
    assert load_yaml(path) == yaml.safe_load(path.read_text())


def test_anchors_and_merge_keys_stay_allowed():
    text = "base: &b {lr: 0.1, seed: 0}\nlinear: {<<: *b, lr: 0.01}\ne2e: *b\n"
    assert parse_yaml(text) == yaml.safe_load(text)


def test_every_yaml_is_read_by_the_bounded_loader():
    """No module of the package reads YAML itself: only config/yaml_limits.py calls into PyYAML's loaders."""
    readers = {"load", "safe_load", "full_load", "unsafe_load", "load_all", "safe_load_all", "compose"}
    found = []
    for path in sorted((REPO / "mococxr").rglob("*.py")):
        if path.name == "yaml_limits.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in readers
                and getattr(node.value, "id", "") == "yaml"
            ):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} yaml.{node.attr}")
    assert not found, "read YAML with mococxr.config.load_yaml:\n" + "\n".join(found)


# -- study and grid specs: every field checked when read ---------------------------------------------------
STUDY = yaml.safe_load((REPO / "sweeps" / "pretrain_lr.yaml").read_text())
GRID = yaml.safe_load((REPO / "sweeps" / "finetune_grid.yaml").read_text())
STUDY_FAULTS = [
    ("name", "a'b\"c", "name="),
    ("name", "x\ny", "name="),
    ("name", "runs/x", "name="),
    ("experiment", ["x"], "experiment=['x']"),
    ("experiment", "..", "experiment='..'"),
    ("registered_model", "a:b", "registered_model='a:b'"),
    ("storage", "optuna.db", "storage='optuna.db'"),
    ("budget.n_trials", 0, "budget.n_trials=0"),
    ("budget.epochs", 0, "budget.epochs=0"),
    ("base.lr", 0, "base.lr="),
    ("base.experiment", "x", "base: experiment may not be set"),
    ("objective.metric", "val/linear_auc_Edema", "objective.metric="),
    ("search_space.lr", {"low": 0.1, "high": 0.01}, "search_space.lr"),
    ("heartbeat.interval", 0, "heartbeat.interval=0"),
    ("sampler", "grid", "sampler='grid'"),
    ("extra", 1, "unknown key(s) extra"),
]
GRID_FAULTS = [
    ("name", "a'b\"c", "name="),
    ("experiment", None, "experiment=None"),
    ("experiment", "a'b\"c", "experiment="),
    ("inits", {"random": ""}, "inits.random=''"),
    ("inits", [], "inits="),
    ("protocols", [], "protocols=[]"),
    ("protocols", ["linear", "linear"], "protocols="),
    ("fractions", [0, 0.5], "fractions="),
    ("fractions", [1.5], "fractions="),
    ("draws", 0, "draws=0"),
    ("draws", {0.001: 5, 0.01: 5, 0.1: 3, 1.0: 1, 0.5: 1}, "draws.0.5"),
    ("epochs", 0, "epochs=0"),
    ("epochs", {0.01: -1}, "epochs.0.01=-1"),
    ("base.fraction", 0.5, "base: fraction may not be set"),
    ("base.lr", -1, "base.lr="),
    ("protocol_overrides.linear.draw", 2, "protocol_overrides.linear: draw may not be set"),
    ("protocol_overrides.e2e", [1], "protocol_overrides.e2e=[1]"),
    ("storage", "postgres-db", "storage="),
    ("heartbeat.max_retry", -1, "heartbeat.max_retry=-1"),
]


def _with(raw: dict, key: str, value) -> dict:
    raw = copy.deepcopy(raw)
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


@pytest.mark.parametrize(
    ("key", "value", "culprit"), STUDY_FAULTS, ids=[f"{k}={v}" for k, v, _ in STUDY_FAULTS]
)
def test_a_bad_study_field_names_the_file_and_key(key, value, culprit):
    with pytest.raises(ConfigError) as err:
        parse_spec(_with(STUDY, key, value), source="s.yaml")
    assert str(err.value).startswith("s.yaml: ") and culprit in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("key", "value", "culprit"), GRID_FAULTS, ids=[f"{k}={v}" for k, v, _ in GRID_FAULTS]
)
def test_a_bad_grid_field_names_the_file_and_key(key, value, culprit, tmp_path):
    spec = tmp_path / "g.yaml"
    spec.write_text(yaml.safe_dump(_with(GRID, key, value)))
    with pytest.raises(ConfigError) as err:
        load_grid(spec)
    assert str(err.value).startswith(f"{spec}: ") and culprit in str(err.value), str(err.value)


def test_names_may_hold_one_quote_kind_backslashes_and_unicode(tmp_path):
    name = "it's a\\b é✓"
    assert parse_spec(_with(STUDY, "name", name), source="s.yaml").name == name
    spec = tmp_path / "g.yaml"
    spec.write_text(yaml.safe_dump(_with(_with(GRID, "name", name), "experiment", name), allow_unicode=True))
    grid = load_grid(spec)
    assert grid.name == grid.experiment == name


# -- the CLI in a process of its own: an alias bomb costs no more memory than a one-line error --------------
AS_LIMIT = 8 << 30  # a guard for the machine: without the loader the bomb grows until this stops it


# Run by a small Python that forks the CLI and reports the CLI's own peak RSS. Forked straight from pytest,
# the CLI's ru_maxrss would start at pytest's size: Linux keeps the high-water mark of the memory a process
# had before exec (a fork of a 2 GB pytest reads 2 GB whatever it does after).
_LAUNCHER = """
import os, resource, sys
limit, report, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
pid = os.fork()
if pid == 0:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.execv(argv[0], argv)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def _measured(argv: list[str], folder: Path) -> tuple[int, str, float, float]:
    """(exit status, stderr, seconds, max RSS in MB) of ``mococxr ARGV`` run in ``folder``."""
    folder.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    env["MOCOCXR_ARTIFACT_ROOT"] = str(folder / "artifacts")
    report = folder / "rusage"
    t0 = time.monotonic()
    with open(folder / "stderr", "w") as err, open(folder / "stdout", "w") as out:
        launcher = [sys.executable, "-c", _LAUNCHER, str(AS_LIMIT), str(report)]
        proc = subprocess.Popen(
            [*launcher, sys.executable, "-m", "mococxr", *argv],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.monotonic() - t0
    code, maxrss_kb = (int(x) for x in report.read_text().split())
    return code, (folder / "stderr").read_text(), seconds, maxrss_kb / 1024


@pytest.mark.slow
@pytest.mark.parametrize("command", ["paper", "sweep", "grid"])
def test_an_alias_bomb_costs_the_cli_nothing(command, tmp_path):
    """The spec is read before torch loads or a store opens, so the bomb is refused in seconds and under
    500 MB (the CLI with MLflow imported holds ~200 MB here); a spec refused for an unknown key is the
    baseline, which the bomb may not exceed by more than 100 MB or 10 s."""
    bomb, plain = tmp_path / "bomb.yaml", tmp_path / "plain.yaml"
    bomb.write_text(f"name: {alias_bomb()}\nexperiment: x\n")
    plain.write_text("name: x\nno_such_key: 1\n")
    base_code, base_err, base_s, base_mb = _measured([command, str(plain)], tmp_path / "plain")
    code, err, seconds, mb = _measured([command, str(bomb)], tmp_path / "bomb")
    print(f"{command}: bomb {seconds:.1f} s {mb:.0f} MB; plain error {base_s:.1f} s {base_mb:.0f} MB")
    assert base_code == 2 and "no_such_key" in base_err, base_err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("mococxr:")]  # not the store's progress
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith(f"mococxr: error: {bomb}: line 1: refused") and "alias" in lines[0]
    assert mb < base_mb + 100 and seconds < base_s + 10, (mb, base_mb, seconds, base_s)
    assert mb < 500 and seconds < 30, (mb, seconds)
    nothing_started(tmp_path / "bomb" / "mlflow.db")
