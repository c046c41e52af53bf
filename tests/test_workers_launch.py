"""docker/slurm/paper-workers.sbatch: its worker line, and two workers of it run at once on one store.

The slow test runs the script with bash (its ``#SBATCH`` lines are comments there) as two array tasks
at the same time, ``SLURM_ARRAY_TASK_ID=0`` and ``=1``, on a sqlite MLflow store and a sqlite Optuna
storage in a temporary folder, with a tiny phantom plan: both must finish and the store must hold each
piece of work once.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from servers import stop_group, tail

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "docker" / "slurm" / "paper-workers.sbatch"
PHANTOM = REPO / "sweeps" / "paper_phantom.yaml"
BEGIN, END = "# ---- worker command", "# ---- end of worker command"
WORKER_LINE = (
    'mococxr paper "$PLAN" --storage "$OPTUNA_STORAGE" --chexpert-root "$CHEXPERT_ROOT" '
    '--shenzhen-root "$SHENZHEN_ROOT" --out "$REPORTS"'
)
REQUIRED = ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE", "CHEXPERT_ROOT", "SHENZHEN_ROOT")
DEFAULTED = {"PLAN": "sweeps/paper.yaml", "REPORTS": "reports"}


def worker_line(text: str) -> str:
    """The one command line between the script's worker-command markers."""
    lines = text.splitlines()
    begin = [i for i, line in enumerate(lines) if line.startswith(BEGIN)]
    end = [i for i, line in enumerate(lines) if line.startswith(END)]
    assert len(begin) == len(end) == 1 and begin[0] < end[0], "one marked worker command"
    body = [line for line in lines[begin[0] + 1 : end[0]] if line.strip()]
    assert len(body) == 1, f"the worker command must be one line, found {body}"
    return body[0]


def test_script_is_valid_bash_and_its_worker_line_is_mococxr_paper():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    text = SCRIPT.read_text()
    line = worker_line(text)
    assert line == WORKER_LINE
    commands = [s for s in text.splitlines() if s.strip() and not s.lstrip().startswith("#")]
    assert commands[-1] == line  # the worker is the last command: the task's exit status is its status
    header = text.split("#SBATCH", 1)[0]
    for name in re.findall(r"\$([A-Z_]+)", line):
        assert re.search(rf"^#\s+{name}\s", header, re.M), f"{name} is not described in the header"
        if name in REQUIRED:
            assert re.search(rf'^: "\${{{name}:\?', text, re.M), f"{name} is not checked as required"
        else:
            assert f'{name}="${{{name}:-{DEFAULTED[name]}}}"' in text, f"{name} has no default"
    for name in REQUIRED:
        assert re.search(rf"^#\s+{name}\s+required", header, re.M)


def test_sbatch_header_asks_for_one_gpu_per_array_task():
    text = SCRIPT.read_text()
    directives = dict(
        re.match(r"#SBATCH --([a-z-]+)(?:=(.*))?$", s).groups()
        for s in text.splitlines()
        if s.startswith("#SBATCH")
    )
    assert directives["array"] == "0-3" and directives["gres"] == "gpu:1"
    assert int(directives["cpus-per-task"]) >= 1 and directives["time"]
    assert "%a" in directives["output"] and "%A" in directives["output"]  # one log per array task
    assert "sbatch --array=0-7 docker/slurm/paper-workers.sbatch" in text
    assert "SLURM_ARRAY_TASK_ID" in text
    assert not re.search(r"/(home|Users|scratch)/", text), "no user paths"


def test_worker_line_parses_with_the_real_cli():
    from mococxr.cli import build_parser

    values = {
        "PLAN": "sweeps/paper.yaml",
        "OPTUNA_STORAGE": "postgresql+psycopg2://optuna@db:5432/optuna",
        "CHEXPERT_ROOT": "/data/CheXpert",
        "SHENZHEN_ROOT": "/data/ChinaSet_AllFiles",
        "REPORTS": "reports",
    }
    words = shlex.split(re.sub(r"\$([A-Z_]+)", lambda m: values[m.group(1)], worker_line(SCRIPT.read_text())))
    assert words[:2] == ["mococxr", "paper"]
    args = build_parser().parse_args(words[1:])
    assert (args.command, args.spec, args.storage) == ("paper", values["PLAN"], values["OPTUNA_STORAGE"])
    assert (args.chexpert_root, args.shenzhen_root, args.out) == (
        values["CHEXPERT_ROOT"],
        values["SHENZHEN_ROOT"],
        values["REPORTS"],
    )


def tiny_plan(tmp_path: Path) -> Path:
    """sweeps/paper_phantom.yaml shrunk: ResNet18 only, 2 one-epoch trials, one CheXpert cell per
    init x protocol (fraction 1.0, one draw, one epoch); the data roots point nowhere (the script's
    CHEXPERT_ROOT and SHENZHEN_ROOT override them)."""
    raw = copy.deepcopy(yaml.safe_load(PHANTOM.read_text()))
    raw["name"] = "mococxr-workers-test"
    raw["phantom"] = {"chexpert_n": 120, "chexpert_valid": 60, "shenzhen_n": 40, "size": 32, "seed": 0}
    raw["data"]["chexpert"]["root"] = str(tmp_path / "not-used" / "chexpert")
    raw["data"]["shenzhen"]["root"] = str(tmp_path / "not-used" / "shenzhen")
    study = raw["pretrain"]["study"]
    raw["pretrain"]["backbones"] = ["resnet18"]
    study["budget"] = {"n_trials": 2, "epochs": 1}
    study["search_space"] = {"lr": {"choices": [1.0e-3, 1.0e-4]}, "scheduler": {"choices": ["cosine"]}}
    study["base"].update({"moco_k": 64, "batch_size": 32})
    raw["finetune"]["protocol_overrides"] = {"linear": {"preset": "none"}}
    raw["stages"] = {"chexpert": {"fractions": [1.0], "draws": 1, "epochs": {1.0: 1}}}
    raw["report"] = {"replicates": 20}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _runs(client, experiment: str, kind: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    return client.search_runs([exp.experiment_id], f"tags.`mococxr.kind` = '{kind}'", max_results=1000)


@pytest.mark.slow
def test_two_array_tasks_share_the_plan_and_do_each_piece_of_work_once(tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    from mococxr.data.phantom import MARKER
    from mococxr.flows.plan import load_plan

    plan_path = tiny_plan(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = f"sqlite:///{tmp_path / 'queue' / 'optuna.db'}"  # not the default beside mlflow.db
    (tmp_path / "queue").mkdir()
    bindir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": uri,
        "MOCOCXR_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
        "OPTUNA_STORAGE": storage,
        "PLAN": str(plan_path),
        "CHEXPERT_ROOT": str(tmp_path / "data" / "chexpert"),
        "SHENZHEN_ROOT": str(tmp_path / "data" / "shenzhen"),
        "REPORTS": str(tmp_path / "reports"),
        "SLURM_ARRAY_JOB_ID": "4242",
        "OMP_NUM_THREADS": "1",
    }
    if (bindir / "activate").is_file():
        env["MOCOCXR_VENV"] = str(bindir.parent)  # the script activates it, as a lab's venv
    for name in ("SLURM_SUBMIT_DIR", "PGPASSWORD", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    logs = [tmp_path / f"mococxr-paper-4242_{i}.out" for i in range(2)]
    procs = []
    for task, log in enumerate(logs):
        with log.open("w") as out:  # bash runs the sbatch file; its #SBATCH lines are comments
            procs.append(
                subprocess.Popen(
                    ["bash", str(SCRIPT)],
                    cwd=tmp_path,
                    env={**env, "SLURM_ARRAY_TASK_ID": str(task)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    deadline = time.monotonic() + 1500
    try:
        for proc, log in zip(procs, logs, strict=True):
            try:
                proc.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"worker timed out:\n{tail(log)}") from None
    finally:
        for proc in procs:
            stop_group(proc)
    for task, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        assert proc.returncode == 0, f"array task {task} exited {proc.returncode}:\n{tail(log, 8000)}"
        assert re.search(rf"^mococxr paper worker: array task {task} of job 4242 on ", log.read_text(), re.M)
    for key in ("chexpert", "shenzhen"):  # the roots came from the script's variables, not the plan
        assert (Path(env[f"{key.upper()}_ROOT"]) / MARKER).exists()
    assert not (tmp_path / "not-used").exists()

    plan = load_plan(plan_path)
    client = MlflowClient(tracking_uri=uri)
    # pretraining: every trial of the study COMPLETE, each with exactly one FINISHED run
    study_name = plan.study_name("resnet18")
    assert not (tmp_path / "optuna.db").exists(), "the Optuna storage is OPTUNA_STORAGE, not the default"
    study = optuna.load_study(study_name=study_name, storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2
    finished = [
        r for r in _runs(client, plan.experiment("pretrain"), "pretrain") if r.info.status == "FINISHED"
    ]
    per_trial = sorted(r.data.tags.get("mococxr.optuna_trial") for r in finished)
    assert per_trial == sorted(str(t.number) for t in complete), per_trial
    assert {t.user_attrs["mlflow_run_id"] for t in complete} == {r.info.run_id for r in finished}
    # fine-tuning: exactly one FINISHED run per cell of the CheXpert grid
    [grid] = plan.grid_specs("chexpert")
    cells = sorted((label, cfg.protocol, str(cfg.fraction), str(cfg.draw)) for label, cfg in grid.configs())
    assert len(cells) == 4
    runs = [r for r in _runs(client, plan.experiment("chexpert"), "finetune") if r.info.status == "FINISHED"]
    got = sorted(
        tuple(r.data.tags[f"mococxr.{k}"] for k in ("init", "protocol", "label_fraction", "draw"))
        for r in runs
    )
    assert got == cells, got
