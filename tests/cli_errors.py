"""What a failing command must show, checked the same way by every fault test: its exit status and exactly
one stderr line ``mococxr: error: ...`` that names every culprit, with no traceback."""

from __future__ import annotations

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
