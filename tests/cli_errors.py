"""What a failing command must show, checked the same way by every fault test: its exit status and exactly
one stderr line ``mococxr: error: ...`` that names every culprit, with no traceback."""

from __future__ import annotations

from pathlib import Path

import optuna
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from mococxr.cli import main


def one_error(capsys, code: int, *culprits: str, status: int = 2) -> str:
    """Assert exit ``status`` and one error line naming every culprit; return that line.

    MLflow's own INFO lines when it creates a new store's tables are not ours and are left out."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and " INFO mlflow." not in line]
    assert code == status, err
    assert len(lines) == 1 and lines[0].startswith("mococxr: error: "), err
    assert "Traceback" not in err
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])
    return lines[0]


def exit_code(argv: list[str]) -> int:
    """main() returns its status; argparse errors leave through SystemExit with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def nothing_started(db: str | Path) -> None:
    """Assert that the sqlite MLflow store ``db`` (a path) holds no run and no experiment but MLflow's
    Default, and that its Optuna storage (``optuna.db`` beside it) is absent or holds no study: a refused
    command made nothing a user would have to clean up."""
    db = Path(db)
    if db.exists():
        client = MlflowClient(f"sqlite:///{db}")
        experiments = client.search_experiments(view_type=ViewType.ALL)
        assert [e.name for e in experiments] in ([], ["Default"]), [e.name for e in experiments]
        ids = [e.experiment_id for e in experiments]
        assert not ids or not client.search_runs(ids, run_view_type=ViewType.ALL)
    optuna_db = db.with_name("optuna.db")
    if optuna_db.exists():
        assert not optuna.get_all_study_names(f"sqlite:///{optuna_db}")


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A YAML flow sequence of ``levels`` anchors, each holding ``width`` aliases of the one before: a
    "billion laughs" of ``width ** levels`` values once expanded, in a few hundred bytes."""
    anchors = [f"&l0 [{', '.join(['lol'] * width)}]"]
    anchors += [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return f"[{', '.join(anchors)}]"
