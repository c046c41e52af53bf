"""`mococxr paper PLAN --plan`: the counting rules (sweep/cost.py), the stable CPU rate (sweep/cost_rate.py),
done runs read from the store (sweep/cost_store.py) and what the test sets can resolve (report/power.py)."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from mococxr.cli import main
from mococxr.config import FinetuneConfig, override
from mococxr.flows import cost_rate
from mococxr.flows.cost import Datasets, cell_line, lr_candidates, resolved_epochs, validation_passes
from mococxr.flows.cost_rate import Rate, Timing, timings
from mococxr.flows.plan import load_plan
from mococxr.report.power import RHO, half_widths, power_lines
from mococxr.report.published import APPENDIX_TABLE1, TABLE1
from mococxr.train.budget import epochs_for_fraction, training_budget

REPO = Path(__file__).resolve().parents[1]
PHANTOM = REPO / "sweeps" / "paper_phantom.yaml"
N_TRAIN, N_VAL, N_TEST = 160, 40, 30


def _prep(n_train: int = N_TRAIN) -> SimpleNamespace:
    def split(name: str, n: int) -> pd.DataFrame:
        return pd.DataFrame(
            {"image_id": [f"{name}{i}" for i in range(n)], "path": [f"/d/{name}{i}.png" for i in range(n)]}
        )

    return SimpleNamespace(
        splits={"train": split("t", n_train), "val": split("v", N_VAL), "test": split("s", N_TEST)}
    )


def _cfg(**values) -> FinetuneConfig:
    base = {"protocol": "linear", "init": "imagenet", "epochs": 10, "batch_size": 16, "preset": "cxr"}
    return override(FinetuneConfig(), {**base, **values})


def _work(line, kind: str) -> tuple[float, float]:
    return tuple(line.work.get(kind, (0.0, 0.0)))


def test_linear_runs_of_one_encoder_pay_its_val_and_test_features_once():
    prep, data, shared = _prep(), Datasets(), set()
    first = cell_line("chexpert", "g", "imagenet", _cfg(draw=0), prep, data, shared)
    second = cell_line("chexpert", "g", "imagenet", _cfg(draw=1), prep, data, shared)
    other = cell_line("chexpert", "g", "moco", _cfg(init="models:/m/1"), prep, data, shared)
    assert first.pays == ["val", "test", "train"] and _work(first, "features") == (
        0,
        N_VAL + N_TEST + N_TRAIN,
    )
    assert second.pays == ["train"] and _work(second, "features") == (
        0,
        N_TRAIN,
    )  # its own draw, the shared val/test
    assert other.pays == ["val", "test", "train"]  # another encoder: its own features
    for line in (first, second):  # per-epoch validation and the test score are head-only on cached features
        assert _work(line, "validation") == (0, 0) and _work(line, "test") == (0, 0)
        assert _work(line, "training") == (0, N_TRAIN * 10)  # augmented: a frozen forward per image per epoch
    # the same encoder at another image size is another cache entry
    assert cell_line("chexpert", "g", "imagenet", _cfg(image_size=128), prep, data, shared).pays == [
        "val",
        "test",
        "train",
    ]


def test_preset_none_trains_the_head_on_one_cached_pass():
    prep, data, shared = _prep(), Datasets(), set()
    line = cell_line("shenzhen", "g", "imagenet", _cfg(preset="none", linear_lr="select"), prep, data, shared)
    assert _work(line, "training") == (0, 0)
    assert _work(line, "features") == (0, N_VAL + N_TEST + N_TRAIN)
    assert line.images() == N_VAL + N_TEST + N_TRAIN  # nothing else: epochs and the 3 lrs are head-only


def test_val_every_counts_the_validated_epochs_and_the_last():
    assert [validation_passes(18, k) for k in (1, 5, 6, 18, 40)] == [18, 4, 3, 1, 1]
    prep, data = _prep(), Datasets()
    line = cell_line(
        "chexpert", "g", "imagenet", _cfg(protocol="e2e", epochs=18, val_every=5), prep, data, set()
    )
    assert _work(line, "training") == (N_TRAIN * 18, 0)  # training steps, not forwards
    assert _work(line, "validation") == (0, N_VAL * 4) and _work(line, "test") == (0, N_TEST)
    assert "val x4" in line.detail and not line.pays


def test_lr_candidates_repay_linear_training_only():
    """A cell's own linear_lr prices it: select trains each of linear_lrs, paper one; e2e ignores both."""
    prep = _prep()
    one = cell_line("c", "g", "imagenet", _cfg(), prep, Datasets(), set())
    three = cell_line("c", "g", "imagenet", _cfg(linear_lr="select"), prep, Datasets(), set())
    two = cell_line(
        "c", "g", "imagenet", _cfg(linear_lr="select", linear_lrs="1e-4,1e-3"), prep, Datasets(), set()
    )
    assert lr_candidates(_cfg()) == 1 and lr_candidates(_cfg(linear_lr="select")) == 3
    assert _work(one, "training") == (0, N_TRAIN * 10) and "lr" not in one.detail
    assert _work(three, "training") == (0, 3 * N_TRAIN * 10) and "x 3 lr" in three.detail
    assert _work(two, "training") == (0, 2 * N_TRAIN * 10)
    assert {k: _work(three, k) for k in ("validation", "test", "features")} == {
        k: _work(one, k) for k in ("validation", "test", "features")
    }
    e2e = [
        cell_line("c", "g", "imagenet", _cfg(protocol="e2e", linear_lr=rule), prep, Datasets(), set())
        for rule in ("paper", "select")
    ]
    assert e2e[0].work == e2e[1].work  # end-to-end runs keep their one learning rate


def test_size_rule_prices_the_epochs_the_run_trains():
    """--plan's epochs are the fine-tune budget's: under epochs_rule size, from the draw's image count."""
    prep = _prep()
    cfg = _cfg(protocol="e2e", epochs=None, epochs_rule="size", fraction=0.25)
    n = round(0.25 * N_TRAIN)  # 40 images: below CheXpert's 0.1 % draw, so the paper's 220 epochs
    assert resolved_epochs(cfg, n) == 220 == training_budget(cfg, n // 16, n).epochs
    line = cell_line("c", "g", "imagenet", cfg, prep, Datasets(), set())
    assert _work(line, "training") == (n * 220, 0) and f"{n} img x 220 ep" in line.detail
    fraction = cell_line(
        "c", "g", "imagenet", _cfg(protocol="e2e", epochs=None, fraction=0.25), prep, Datasets(), set()
    )
    assert f"x {epochs_for_fraction(0.25)} ep" in fraction.detail


def test_without_the_cache_a_linear_run_is_todays_rule():
    prep = _prep()
    line = cell_line("c", "g", "imagenet", _cfg(feature_cache=False), prep, Datasets(), set())
    epochs = 10
    assert (
        line.images() == N_TRAIN * epochs + epochs * N_VAL + N_TEST + N_TRAIN + N_VAL
    )  # what --plan said before
    assert _work(line, "validation") == (0, epochs * N_VAL) and not line.pays
    three = cell_line(
        "c", "g", "imagenet", _cfg(feature_cache=False, linear_lr="select"), prep, Datasets(), set()
    )
    assert _work(three, "validation") == (0, 3 * epochs * N_VAL) and _work(three, "test") == (0, N_TEST)


def _clock(monkeypatch, durations: list[float]) -> None:
    """A fake perf_counter: each call of the timed function advances it by the next duration."""
    now = [0.0]
    monkeypatch.setattr(cost_rate.time, "perf_counter", lambda: now[0])
    it = iter(durations)

    def advance() -> None:
        now[0] += next(it)

    return advance


def test_cpu_rate_is_the_median_of_several_timings_and_says_if_it_is_stable(monkeypatch):
    steady = _clock(monkeypatch, [1.0] + [0.5, 0.52, 0.49, 0.5, 0.51])  # warm-up, then five timings
    t = timings(steady, 10, min_seconds=0.25)
    assert t.n == 5 and t.rate == pytest.approx(20.0) and t.stable
    assert "median of 5 timings" in t.describe() and "within +-10 %" in t.describe()
    noisy = _clock(monkeypatch, [1.0] + [0.5, 0.8, 0.4, 0.5, 0.7, 0.3, 0.9, 0.5, 0.6])
    t = timings(noisy, 10, min_seconds=0.25)
    assert t.n == 9 and not t.stable and "NOT within +-10 %" in t.describe()  # kept timing, then said so
    short = _clock(monkeypatch, [0.01] + [0.01] * 25 * 5)  # a call far below min_seconds: timings batch calls
    assert timings(short, 4, min_seconds=0.25).rate == pytest.approx(400.0)


def test_expected_half_widths_shrink_with_the_test_set_and_match_the_papers_at_its_test_set():
    arm = (0.815, 0.850, RHO[("linear", "linear")])
    small, large = half_widths([arm], 234, 67)[0], half_widths([arm], 2340, 670)[0]
    assert large == pytest.approx(small / math.sqrt(10), rel=0.2)
    assert math.isnan(half_widths([arm], 50, 0)[0])  # one class: no AUC
    # the stated calibration: at the paper's test set the simulation gives the paper's typical widths
    for kind in RHO:
        cells = [(k, v) for k, v in TABLE1.items() if (k[1], k[2]) == kind]
        arms = [
            (
                APPENDIX_TABLE1[(b, "imagenet", pb, f)].point,
                APPENDIX_TABLE1[(b, "moco", pm, f)].point,
                RHO[kind],
            )
            for (b, pm, pb, f), _ in cells
        ]
        simulated = sorted(half_widths(arms, 234, 67))
        published = sorted((v.hi - v.lo) / 2 for _, v in cells)
        assert simulated[len(arms) // 2] == pytest.approx(published[len(arms) // 2], rel=0.25), kind


def test_power_lines_put_the_expected_half_width_beside_each_published_effect():
    plan = SimpleNamespace(grids={"chexpert": SimpleNamespace(backbones=("resnet18",))})
    tests = {
        "chexpert": {"Pleural Effusion": (234, 67)},
        "competition": {"Edema": (234, 45)},
        "table2": {"Tuberculosis": (132, 67)},
    }
    text = "\n".join(power_lines(plan, tests))
    assert "234 test images, 67 positive" in text and "paired-bootstrap replicates" in text
    row = next(ln for ln in text.splitlines() if "ResNet18 MoCo linear vs ImageNet linear" in ln)
    assert re.findall(r"[+-]\d\.\d{3}", row) == [
        "+0.096",
        "+0.070",
        "+0.049",
        "+0.034",
    ]  # Table 1's effects
    assert "DenseNet121" not in text  # not in this plan's chexpert stage
    assert "Edema: 234 test images, 45 positive" in text and "lr vs lr 1e-4" in text


def _fake_rate(backbone: str, image_size: int) -> Rate:
    return Rate(Timing(100.0, -0.02, 0.03, 5), Timing(300.0, -0.01, 0.01, 5))


def _phantom_data(tmp_path: Path, monkeypatch) -> None:
    from mococxr.flows.stages import prepare_phantom

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cost_rate, "measure", _fake_rate)
    prepare_phantom(load_plan(PHANTOM))


def test_plan_creates_nothing_in_a_fresh_store(tmp_path, monkeypatch, capsys):
    _phantom_data(tmp_path, monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}")
    assert main(["paper", str(PHANTOM), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "does not exist yet: every run is to do" in out and "54 training runs, 0 done, 54 to do" in out
    assert not (tmp_path / "fresh").exists() and not (tmp_path / "mlruns").exists()
    assert "WHAT THE TEST SETS CAN RESOLVE" in out and "within +-10 %" in out
    # the rules line reads the cells' own configs: each linear cell trains the lrs its linear_lr says
    assert (
        "linear_lr select: 3 lr candidates per cell (3e-05/0.0001/0.001)" in out and "epochs_rule size" in out
    )


def test_plan_after_part_of_the_phantom_plan_shows_it_done_and_prices_the_rest(
    tmp_path, tracking_uri, monkeypatch, capsys
):
    from mococxr.sweep.grid import run_grid

    _phantom_data(tmp_path, monkeypatch)
    # ResNet18 on Shenzhen: its random-init cells at 6.25 %
    grid = load_plan(PHANTOM).grid_specs("shenzhen")[0]
    result = run_grid(replace(grid, inits={"random": "random"}, fractions=[0.0625]), progress=False)
    assert result.started == 2 and not result.failed
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    capsys.readouterr()
    assert main(["paper", str(PHANTOM), "--plan"]) == 0
    out = capsys.readouterr().out
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before  # --plan only read the store
    assert "54 training runs, 2 done, 52 to do" in out and "(read only): 2 of 54 runs finished" in out
    runs = re.findall(r"^  \[\d+\]\s+(done |to do)  (\S.*?)\s{2,}.*?([\d,]+) img  GPU", out, re.M)
    assert len(runs) == 54
    done = sorted(what for state, what, _ in runs if state == "done ")
    assert done == ["random e2e 6.25% draw 0", "random linear 6.25% draw 0"]
    todo_images = sum(int(n.replace(",", "")) for state, _, n in runs if state == "to do")
    # the GPU table's total row: runs, the five kinds, total hours, images
    total = re.search(r"^total\s+(\d+)(?:\s+[\d.]+){6}\s+([\d,]+)$", out, re.M)
    assert total and int(total.group(1)) == 52
    assert abs(int(total.group(2).replace(",", "")) - todo_images) <= len(runs)  # each line rounds its images
    assert re.search(r"^shenzhen\s+22\s", out, re.M) and re.search(r"^pretrain\s+4\s", out, re.M)
    assert "DONE (finished in the store, not priced above): 2 runs (shenzhen 2)" in out


def test_plan_wall_time_is_said_in_the_unit_it_is():
    from mococxr.flows.cost_format import span

    assert span(0.6) == "about 36 min"
    assert span(5.24) == "about 5.2 hours"
    assert span(446) == "about 18.6 days"
