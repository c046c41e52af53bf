"""The `mococxr` command as a user meets it: exit codes, one-line errors, data synth/check/stats."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
from PIL import Image

from mococxr.cli import main


def test_synth_check_stats_round_trip(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["data", "synth", "--out", str(out), "--n", "40", "--size", "64", "--seed", "1"]) == 0
    assert (out / "CheXpert-v1.0-small" / "train.csv").is_file()
    assert main(["data", "check", "--dataset", "chexpert", "--root", str(out)]) == 0
    assert "no problems" in capsys.readouterr().out
    assert main(["data", "stats", "--dataset", "chexpert", "--root", str(out), "--task", "competition5"]) == 0
    stats = capsys.readouterr().out
    assert "Pleural Effusion" in stats and "Cardiomegaly" in stats


def test_check_reports_every_problem_and_exits_nonzero(tmp_path, capsys):
    """A truncated PNG, a missing file and a bad label value: all three reported, with their rows."""
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("ok.png", "trunc.png", "badlabel.png"):
        Image.new("L", (32, 32), 128).save(images / name)
    data = (images / "trunc.png").read_bytes()
    (images / "trunc.png").write_bytes(data[: len(data) // 2])
    csv = tmp_path / "labels.csv"
    pd.DataFrame(
        {
            "path": ["imgs/ok.png", "imgs/trunc.png", "imgs/missing.png", "imgs/badlabel.png"],
            "Effusion": ["1", "0", "1", "maybe"],
        }
    ).to_csv(csv, index=False)
    code = main(["data", "check", "--dataset", "csv", "--root", str(csv)])
    out = capsys.readouterr()
    assert code == 1
    lines = [line for line in out.out.splitlines() if line.strip()]
    assert any("trunc.png" in line and "line 3" in line for line in lines), lines
    assert any("missing.png" in line and "line 4" in line for line in lines), lines
    assert any("maybe" in line and "line 5" in line for line in lines), lines
    assert "3 problem(s)" in out.err


def test_user_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mococxr",
            "data",
            "stats",
            "--dataset",
            "chexpert",
            "--root",
            str(tmp_path / "nope"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("mococxr: error:")


def test_bad_config_value_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("batch_size: sixteen\n")
    assert main(["pretrain", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "batch_size" in err and "sixteen" in err
