"""Lineage a user can click in the MLflow UI: a fine-tune run links to the checkpoint it started from (its
description, its input models), a checkpoint lists the runs that used it, pretraining checkpoints are their
run's outputs at their epoch, and ``keep_model`` keeps an end-to-end run's trained model."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from mococxr.commands.args import build_parser
from mococxr.config import DataConfig, FinetuneConfig, config_hash, from_flags
from mococxr.data.phantom import synthesize
from mococxr.errors import ConfigError
from mococxr.models.backbones import build_encoder
from mococxr.sweep.grid_spec import load_grid
from mococxr.tracking import artifacts as ma
from mococxr.tracking import lineage, registry
from mococxr.tracking import mlflow as mt
from mococxr.train import finetune as ft
from mococxr.train.finetune_log import _run_name, keeps_model
from mococxr.train.head import Classifier

LINK = re.compile(r"\]\((#/[^)]*)\)")
NOTE = "mlflow.note.content"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> str:
    return str(synthesize(tmp_path_factory.mktemp("phantom") / "ph", 120, size=48))


def checkpoint(name: str = "lineage-encoder", register: bool = True) -> tuple[str, str]:
    """A random resnet18 as epoch 2 of a pretraining run (its own experiment) and, with ``register``,
    version 1 of ``name``: (model id, pretraining run id)."""
    torch.manual_seed(0)
    mt.open_store()
    with mt.start_run(
        "lineage-pretrain", run_name="study-trial007", run_tags=mt.tags(kind="pretrain")
    ) as run:
        model_id = ma.log_state_dict_model(
            build_encoder("resnet18").state_dict(),
            name="study-trial007",
            run_id=run.info.run_id,
            experiment_id=run.info.experiment_id,
            step=2,
            info={"backbone": "resnet18", "epoch": 2},
            model_tags=mt.tags(kind="pretrain", backbone="resnet18"),
        )
    if register:
        registry.register(name, model_id=model_id)
    return model_id, run.info.run_id


def tiny(root: str, init: str, draw: int) -> FinetuneConfig:
    """A linear run on cached features, one epoch at 32 px: seconds."""
    data = DataConfig(dataset="chexpert", root=root, task="pleural_effusion", val=0.25, test=0.25)
    return FinetuneConfig(
        data=data,
        init=init,
        draw=draw,
        fraction=0.5,
        epochs=1,
        image_size=32,
        batch_size=16,
        lr=1e-3,
        preset="none",
        experiment="lineage-finetune",
    )


def assert_links_exist(text: str) -> set[str]:
    """Every relative link of a description points to something the store holds; returns the kinds."""
    client, kinds = MlflowClient(), set()
    for target in LINK.findall(text):
        if m := re.fullmatch(r"#/experiments/(\d+)/models/(m-\w+)", target):
            assert client.get_logged_model(m.group(2)).experiment_id == m.group(1), target
            kinds.add("model")
        elif m := re.fullmatch(r"#/models/([^/]+)/versions/(\d+)", target):
            assert client.get_model_version(unquote(m.group(1)), m.group(2)), target
            kinds.add("version")
        elif m := re.fullmatch(r"#/experiments/(\d+)/runs/(\w+)", target):
            assert client.get_run(m.group(2)).info.experiment_id == m.group(1), target
            kinds.add("run")
        else:
            raise AssertionError(f"not a route of MLflow 3's UI: {target}")
    return kinds


def test_a_finetune_run_links_its_checkpoint_and_the_checkpoint_lists_its_runs(phantom, tracking_uri):
    model_id, pretrain_run = checkpoint()
    by_version = ft.finetune(tiny(phantom, "models:/lineage-encoder/1", 0), progress=False)
    by_id = ft.finetune(tiny(phantom, f"models:/{model_id}", 1), progress=False)  # same weights, no version
    client = MlflowClient()
    runs = [client.get_run(r.run_id) for r in (by_version, by_id)]

    # REST level: the checkpoint and its stand-in (one per experiment) are each run's input models
    stand_ins = set()
    for run in runs:
        ids = {m.model_id for m in run.inputs.model_inputs}  # in no particular order
        assert model_id in ids and len(ids) == len(run.inputs.model_inputs) == 2
        stand_ins |= ids - {model_id}
    (stand_in,) = stand_ins
    copy = client.get_logged_model(stand_in)
    assert copy.experiment_id == runs[0].info.experiment_id and copy.tags["mococxr.model_id"] == model_id
    assert copy.name == "e02-trial007-study" and assert_links_exist(copy.tags[NOTE]) == {"model", "run"}

    # the run's description links to the checkpoint, its version and its pretraining run
    note = runs[0].data.tags[NOTE]
    assert assert_links_exist(note) == {"model", "version", "run"}
    for target in (
        f"/models/{model_id})",
        "(#/models/lineage-encoder/versions/1)",
        f"/runs/{pretrain_run})",
    ):
        assert target in note.split("\n\n")[1], target  # second paragraph: shown before "Show more"
    assert assert_links_exist(runs[1].data.tags[NOTE]) == {"model", "run"}

    # the checkpoint lists both runs; the version lists the one that named it
    listed = client.get_logged_model(model_id).tags[NOTE]
    assert lineage.USED_BY_HEADING in listed and listed.startswith("Encoder checkpoint of run")
    assert all(f"/runs/{r.info.run_id})" in listed for r in runs) and "(2 finished;" in listed
    assert lineage.users_filter(model_id) in listed and assert_links_exist(listed) == {"run"}
    version = client.get_model_version("lineage-encoder", "1")
    assert f"/runs/{by_version.run_id})" in version.description
    assert f"/runs/{by_id.run_id})" not in version.description
    assert version.tags[registry.FINETUNE_RUNS_TAG] == "1"


def _fake_finetune(model_id: str) -> str:
    """A finished fine-tune run's tags and params as finetune logs them for a checkpoint (no training)."""
    with mt.start_run("lineage-fake", run_tags=mt.tags(kind="finetune")) as run:
        mlflow.log_params({"init_model_id": model_id})
    return run.info.run_id


def test_runs_finishing_together_are_both_listed(tracking_uri, monkeypatch):
    model_id, _ = checkpoint(register=False)
    a, b = _fake_finetune(model_id), _fake_finetune(model_id)
    real = lineage.find_runs

    def before_b_finished(filter_string):
        """A's first search misses B; B then records (its searches see both) before A writes."""
        found = real(filter_string)
        monkeypatch.setattr(lineage, "find_runs", real)
        lineage.record_use(model_id)  # B
        return [r for r in found[0] if r.info.run_id == a], found[1]

    monkeypatch.setattr(lineage, "find_runs", before_b_finished)
    lineage.record_use(model_id)  # A writes its stale list, searches again, and writes both
    listed = MlflowClient().get_logged_model(model_id).tags[NOTE]
    assert f"/runs/{a})" in listed and f"/runs/{b})" in listed and listed.count(lineage.USED_BY_HEADING) == 1
    assert lineage.record_use(model_id) is not None  # a rewrite, not an append
    assert MlflowClient().get_logged_model(model_id).tags[NOTE] == listed


def test_a_long_list_is_capped_and_says_how_to_find_every_run():
    runs = [
        SimpleNamespace(
            info=SimpleNamespace(run_id=f"{i:032x}", run_name=f"d{i} 1% linear_x", experiment_id="3"),
            data=SimpleNamespace(metrics={"test/auc": 0.5}, tags={"mococxr.task": "Cardiomegaly"}),
        )
        for i in range(60)
    ]
    text = lineage.runs_section("Runs", (runs, {"3": "exp"}), "tags.`mococxr.kind` = 'finetune'", 10_000)
    assert text.count("](#/experiments/3/runs/") == lineage.MAX_LISTED and text.endswith("- and 10 more")
    assert "`` tags.`mococxr.kind` = 'finetune' ``" in text and r"[d0 1% linear\_x]" in text
    assert "/runs/00000000000000000000000000000000) · exp · Cardiomegaly · test AUC 0.5000\n" in text
    short = lineage.runs_section("Runs", (runs, {"3": "exp"}), "f", 1_000)
    assert len(short) <= 1_000 and short.endswith(f"- and {60 - short.count('](#/')} more")


def test_pretraining_checkpoints_are_outputs_at_their_epoch(tracking_uri):
    mt.open_store()
    with mt.start_run("lineage-outputs", run_tags=mt.tags(kind="pretrain")) as run:
        ids = {}
        for epoch in (1, 2):
            ids[epoch] = ma.log_state_dict_model(
                {"w": torch.zeros(2)},
                name="lab",
                run_id=run.info.run_id,
                experiment_id=run.info.experiment_id,
                step=epoch,
                info={"epoch": epoch},
            )
            mlflow.log_metrics({"train/loss": 1.0 / epoch}, step=epoch, model_id=ids[epoch])
    logged = MlflowClient().get_run(run.info.run_id)
    assert {o.model_id: o.step for o in logged.outputs.model_outputs} == {i: e for e, i in ids.items()}
    assert not logged.inputs.model_inputs  # metrics linked to an output do not make it an input
    assert [MlflowClient().get_logged_model(ids[e]).name for e in (1, 2)] == ["e01-lab", "e02-lab"]


def test_keep_model_is_a_checked_flag_that_grids_pass_through(tmp_path):
    assert FinetuneConfig().keep_model == "e2e"
    assert [
        keeps_model(FinetuneConfig(protocol=p, keep_model=k))
        for p in ("linear", "e2e")
        for k in ("none", "e2e", "all")
    ] == [False, False, True, False, True, True]
    with pytest.raises(ConfigError, match="keep_model"):
        FinetuneConfig(keep_model="best")
    assert config_hash(FinetuneConfig(keep_model="none")) == config_hash(FinetuneConfig())  # same cells
    assert (
        from_flags(FinetuneConfig, build_parser().parse_args(["finetune", "--keep-model", "all"])).keep_model
        == "all"
    )
    grid = {
        "experiment": "g",
        "base": {"keep_model": "all"},
        "inits": {"random": "random"},
        "protocols": ["linear", "e2e"],
        "fractions": [1.0],
        "protocol_overrides": {"linear": {"keep_model": "none"}},
    }
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    kept = {cfg.protocol: cfg.keep_model for _, cfg in load_grid(tmp_path / "g.yaml").configs()}
    assert kept == {"linear": "none", "e2e": "all"}


def test_a_kept_densenet121_costs_about_28_mb():
    """The disk a kept model costs is its state dict (ResNet18: 44.8 MB, measured in test_finetune)."""
    model = Classifier(build_encoder("densenet121"), 1, frozen=False)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, Path(tmp) / "s.pt")
        assert 27e6 < (Path(tmp) / "s.pt").stat().st_size < 29.5e6


def test_run_names_put_what_tells_runs_apart_first():
    cfg = FinetuneConfig(fraction=0.001, draw=3, protocol="e2e", backbone="densenet121")
    assert _run_name(cfg, "checkpoint") == "d3 0.1% e2e moco dn121"
    assert _run_name(cfg, "checkpoint", "lr0.001-cosine-t3") == "d3 0.1% e2e lr0.001-cosine-t3 dn121"
    assert _run_name(FinetuneConfig(), "random") == "d0 100% lin random r18"
    assert ma.checkpoint_name("mystudy-trial012-epoch004", 4) == "e04-trial012-mystudy"


def test_checkpoint_names_are_names_mlflow_accepts_whatever_the_user_named():
    """A study or run named with quotes, dots, percent signs, slashes or colons still logs its checkpoints:
    MLflow refuses those characters in LoggedModel names (only there), so they are spelled out or dashed."""
    from mlflow.utils.validation import _validate_logged_model_name

    names = {
        "it's a\\b é✓-resnet18-trial000": "e01-trial000-it-s a\\b é✓-resnet18",
        "d3 0.1% e2e moco dn121": "e01-d3 0p1pct e2e moco dn121",
        'a/b:c"d': "e01-a-b-c-d",
    }
    for label, expected in names.items():
        assert ma.checkpoint_name(label, 1) == expected
        _validate_logged_model_name(expected)  # raises on a name MLflow refuses
    assert lineage.link("a_b [c]", "#/x") == r"[a\_b \[c\]](#/x)"
