"""A quiet, honest terminal: MLflow's chatter kept off it (its warnings kept on it), a redirected log never
silent for long (progress lines while a slow item or step runs), and names optuna-dashboard shows."""

from __future__ import annotations

import io
import logging
import threading
import time

import optuna

from mococxr.cli import main
from mococxr.console import PlainProgress, progress, working
from mococxr.sweep.queue import WorkQueue, run_once
from mococxr.sweep.spec_common import Heartbeat

FAST = Heartbeat(interval=1, grace_period=3, max_retry=2)


def _as_if_mlflow_was_just_imported() -> None:
    """MLflow's logging as its import leaves it (INFO to its own stream), whatever earlier tests did."""
    from mlflow.utils import logging_utils

    logging_utils._configure_mlflow_loggers("mlflow")
    logging_utils.MLFLOW_LOGGING_STREAM.enabled = True


def test_cli_run_keeps_mlflow_chatter_off_the_terminal_but_not_its_warnings(tracking_uri, capfd, monkeypatch):
    """A CLI command on a fresh store: no "Creating initial MLflow database tables" (our own line says what
    the wait is), no eprint lines ("Successfully registered model"), no run URLs; warnings still shown."""
    from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT
    from mlflow.utils.logging_utils import eprint

    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "")  # restored after the test
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    _as_if_mlflow_was_just_imported()
    logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    assert "Creating initial MLflow database tables" in capfd.readouterr().err  # what a user used to see

    assert main(["registry", "list"]) == 0
    eprint("Successfully registered model 'm'.")  # as mlflow.register_model prints it
    logging.getLogger("mlflow.tracking.fluent").warning("a warning MLflow gives")
    out, err = capfd.readouterr()
    text = out + err
    assert "no registered models" in out
    assert f"creating the MLflow store {tracking_uri} (its tables, once)" in err
    for chatter in (
        "Creating initial MLflow database tables",
        "Updating database tables",
        "INFO ",
        "Successfully",
    ):
        assert chatter not in text, text
    assert "WARNING mlflow.tracking.fluent: a warning MLflow gives" in err
    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get()  # no "🏃 View run ... at: http://..." lines


def test_plain_progress_writes_lines_while_an_item_is_slow():
    """Redirected (not a terminal): a slow step between two items still gets a line every every_s, ending
    with what it is on; a fast loop prints nothing; the heartbeat thread ends with the loop."""
    out = io.StringIO()
    bar = progress(range(2), "[t-trial001] pretrain epoch 1/2", every_s=0.2, file=out)
    assert isinstance(bar, PlainProgress)
    for i in bar:
        bar.set_postfix(loss=f"{i:.1f}")
        time.sleep(0.5 if i == 0 else 0.0)
    lines = out.getvalue().splitlines()
    assert lines and all(line.startswith("[t-trial001] pretrain epoch 1/2: ") for line in lines)
    assert any(line.endswith("for 0 s]") and "[on 1/2 " in line for line in lines), lines
    assert not any(t.name == "mococxr-heartbeat" for t in threading.enumerate())

    quiet = io.StringIO()
    assert list(progress(range(100), "fast", file=quiet)) == list(range(100))
    assert quiet.getvalue() == ""

    resumed = io.StringIO()
    for _ in progress(
        range(3), "caching images at 64px", total=10, initial=7, every_s=0, unit="img", file=resumed
    ):
        pass
    assert resumed.getvalue().splitlines()[-1].startswith("caching images at 64px: 10/10 (")
    assert " img/s)" in resumed.getvalue()


def test_working_writes_a_line_while_a_long_step_runs():
    out = io.StringIO()
    with working("[t-trial000] epoch 1/2: linear monitor and checkpoint", every_s=0.1, file=out):
        time.sleep(0.35)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and all(line.endswith(" s)") and "still working" in line for line in lines)
    short = io.StringIO()
    with working("short", every_s=5, file=short):
        pass
    with working("off", enabled=False, every_s=0.01, file=short):
        time.sleep(0.05)
    assert short.getvalue() == ""
    assert not any(t.name == "mococxr-heartbeat" for t in threading.enumerate())


def test_progress_lines_keep_one_rhythm_across_steps():
    """A step that follows another (an epoch's monitor after its batches) speaks every_s after the last
    progress line, not every_s after its own start: no 15 s gap at the hand-over; but a quick step after a
    long silence stays quiet for 0.3 of the interval (so no gap exceeds 1.3 intervals)."""
    from mococxr import console

    beat = console._Heartbeat(10.0, lambda now: None)
    try:
        console._LAST_LINE[0] = beat.start - 3.0  # the batches' last line, 3 s before this step began
        assert beat._due() == beat.start + 7.0
        console._LAST_LINE[0] = beat.start - 60.0  # a minute of other output since
        assert beat._due() == beat.start + 3.0
    finally:
        beat.stop()
    out = io.StringIO()
    console.write("[t-trial000] epoch 1/2  loss 4.0", file=out)
    assert out.getvalue() == "[t-trial000] epoch 1/2  loss 4.0\n"
    assert time.monotonic() - console._LAST_LINE[0] < 5.0


def test_queues_name_their_value_for_optuna_dashboard(tmp_path):
    """A grid's queue shows its value as test/auc, a one-off step's as what it is, not "Objective 0"."""
    storage = f"sqlite:///{tmp_path / 'q.db'}"
    WorkQueue.open("grid", storage, [], heartbeat=FAST)
    assert optuna.load_study(study_name="grid", storage=storage).metric_names == ["test/auc"]
    assert run_once("step", storage, lambda: {"x": 1}, heartbeat=FAST) == {"x": 1}
    assert optuna.load_study(study_name="step", storage=storage).metric_names == ["done (no score)"]
