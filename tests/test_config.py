"""One config system: the same object from flags, YAML, a study's base and a grid's base; bad values
fail when the config is built, naming the key, before any work."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from mococxr import config
from mococxr.cli import build_parser, main
from mococxr.config import FinetuneConfig, PretrainConfig, build, from_flags, override
from mococxr.errors import ConfigError

PRETRAIN = {
    "data": {"dataset": "chexpert", "root": "/tmp/ph", "policy": "ones", "val": 0.15},
    "backbone": "resnet18",
    "lr": 1e-3,
    "scheduler": "milestone",
    "milestones": [0.5, 0.75],
    "image_size": 64,
    "batch_size": 8,
    "moco_k": 64,
    "epochs": 3,
    "monitor": True,
    "keep": "best:1:val/linear_auc",
    "mlp": False,
}
FLAGS = [
    "--dataset",
    "chexpert",
    "--root",
    "/tmp/ph",
    "--policy",
    "ones",
    "--val",
    "0.15",
    "--backbone",
    "resnet18",
    "--lr",
    "1e-3",
    "--scheduler",
    "milestone",
    "--milestones",
    "0.5,0.75",
    "--image-size",
    "64",
    "--batch-size",
    "8",
    "--moco-k",
    "64",
    "--epochs",
    "3",
    "--monitor",
    "--keep",
    "best:1:val/linear_auc",
    "--no-mlp",
]


def test_flags_yaml_and_study_base_build_equal_configs(tmp_path):
    from_yaml_file = tmp_path / "pretrain.yaml"
    from_yaml_file.write_text(yaml.safe_dump(PRETRAIN))
    args = build_parser().parse_args(["pretrain", *FLAGS])
    by_flags = from_flags(PretrainConfig, args)
    by_yaml = from_flags(
        PretrainConfig,
        build_parser().parse_args(["pretrain", "--config", str(from_yaml_file)]),
        yaml_path=str(from_yaml_file),
    )
    by_dict = build(PretrainConfig, PRETRAIN)

    from mococxr.sweep.study import parse_spec

    base = {k: v for k, v in PRETRAIN.items() if k not in ("epochs", "monitor")}
    spec = parse_spec(
        {
            "name": "s",
            "budget": {"n_trials": 2, "epochs": 3},
            "base": base,
            "search_space": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}},
        }
    )
    assert by_flags == by_yaml == by_dict == spec.base
    assert by_flags.milestones == (0.5, 0.75) and by_flags.mlp is False and by_flags.data.policy == "ones"


def test_grid_base_and_flags_build_equal_configs(tmp_path):
    from mococxr.sweep.grid import load_grid

    base = {"data": {"root": "/tmp/ph", "task": "competition5"}, "lr": 1e-4, "image_size": 32}
    spec = tmp_path / "grid.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "experiment": "e",
                "base": base,
                "inits": ["random"],
                "protocols": ["linear"],
                "fractions": [1.0],
            }
        )
    )
    args = build_parser().parse_args(
        ["finetune", "--root", "/tmp/ph", "--task", "competition5", "--lr", "1e-4", "--image-size", "32"]
    )
    assert load_grid(spec).base == from_flags(FinetuneConfig, args) == build(FinetuneConfig, base)


def test_configs_are_frozen_and_replace_validates():
    cfg = PretrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]
    with pytest.raises(ConfigError, match="keep='best:2'"):
        dataclasses.replace(cfg, keep="best:2")
    with pytest.raises(ConfigError, match="moco_k=40 is not a multiple of batch_size=16"):
        dataclasses.replace(cfg, moco_k=40)
    assert override(cfg, {"lr": "1e-3", "data.root": "x"}) == dataclasses.replace(
        cfg, lr=1e-3, data=dataclasses.replace(cfg.data, root="x")
    )


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"data": {"policy": "ignroe"}}, "base.data.policy='ignroe': expected one of ignore, ones, zeros"),
        ({"optimizer": "adamw"}, "base.optimizer='adamw': expected one of sgd, adam"),
        ({"batch_size": 0}, "base.batch_size=0: expected a positive number"),
        ({"lr": "fast"}, "base.lr='fast': expected a number"),
        ({"data": {"val": 1.5}}, r"base.data.val=1.5: expected a fraction in \[0, 1\)"),
        ({"keep": "best:2"}, "base.keep='best:2'"),
        ({"lrr": 1}, "base: unknown key.*lrr"),
    ],
)
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key):
        build(PretrainConfig, data, where="base")


def test_bad_enum_fails_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--policy", "ignroe"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "argument --policy: invalid choice: 'ignroe'" in err[-1]
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {policy: ignroe}\n")
    assert main(["pretrain", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mococxr: error: {bad}.data.policy='ignroe': expected one of ignore, ones, zeros"]
    assert not (tmp_path / "mlruns").exists()  # nothing was opened or written


def test_every_field_has_a_documented_flag():
    """Flags are generated from the fields, so each field has exactly one flag with its help text."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command, cls in (("pretrain", PretrainConfig), ("finetune", FinetuneConfig)):
        actions = {a.dest: a for a in sub.choices[command]._actions}
        for key, _, _ in config.flag_fields(cls):
            assert key in actions and actions[key].help, f"{command}: {key} has no documented flag"
    assert config.PROTOCOLS == ("linear", "e2e") and "chexpert" in config.DATASETS


# The hash of a default FinetuneConfig before the head and min_steps fields existed: grid cells run
# with it must stay finished (config_hash is what makes a grid idempotent).
DEFAULT_FINETUNE_HASH = "22e6047f107da07c2ab6ff6c13a57b9b94ac053473fa359e0e19757daecaad54"


def test_new_fields_at_their_default_leave_the_hash_unchanged():
    cfg = FinetuneConfig()
    assert cfg.head == "standardized" and cfg.min_steps == 0 and config.HEADS == ("standardized", "plain")
    assert config.config_hash(cfg) == DEFAULT_FINETUNE_HASH
    explicit = build(FinetuneConfig, {"head": "standardized", "min_steps": 0})
    assert config.config_hash(explicit) == DEFAULT_FINETUNE_HASH
    changed = {
        config.config_hash(dataclasses.replace(cfg, **kw))
        for kw in ({"head": "plain"}, {"min_steps": 500}, {"head": "plain", "min_steps": 500}, {"lr": 1e-3})
    }
    assert len(changed) == 4 and DEFAULT_FINETUNE_HASH not in changed
    # the fields are logged as parameters all the same
    assert {"head": "standardized", "min_steps": "0"}.items() <= config.flat_params(cfg).items()


def test_head_and_min_steps_flags():
    args = build_parser().parse_args(["finetune", "--head", "plain", "--min-steps", "500", "--lr", "1e-3"])
    cfg = from_flags(FinetuneConfig, args)
    assert (cfg.head, cfg.min_steps, cfg.lr) == ("plain", 500, 1e-3)
    with pytest.raises(ConfigError, match="min_steps=-1: expected a number >= 0"):
        build(FinetuneConfig, {"min_steps": -1})
    with pytest.raises(ConfigError, match="head='mlp': expected one of standardized, plain"):
        build(FinetuneConfig, {"head": "mlp"})


def test_linear_lr_and_epochs_rule_at_their_default_leave_the_hash_unchanged():
    """Issue 18's fields: a config at their defaults keeps the hash of the runs already in users' stores."""
    cfg = FinetuneConfig()
    assert (cfg.linear_lr, cfg.linear_lrs, cfg.epochs_rule) == ("paper", (3e-5, 1e-4, 1e-3), "fraction")
    explicit = build(
        FinetuneConfig, {"linear_lr": "paper", "linear_lrs": "3e-5,1e-4,1e-3", "epochs_rule": "fraction"}
    )
    assert explicit == cfg and config.config_hash(explicit) == DEFAULT_FINETUNE_HASH
    changed = {
        config.config_hash(dataclasses.replace(cfg, **kw))
        for kw in ({"linear_lr": "select"}, {"linear_lrs": (1e-3,)}, {"epochs_rule": "size"})
    }
    assert len(changed) == 3 and DEFAULT_FINETUNE_HASH not in changed
    assert {"linear_lr": "paper", "epochs_rule": "fraction"}.items() <= config.flat_params(cfg).items()
    assert config.LINEAR_LRS == ("paper", "select") and config.EPOCHS_RULES == ("fraction", "size")


def test_linear_lrs_are_checked_and_have_flags():
    args = build_parser().parse_args(
        ["finetune", "--linear-lr", "select", "--linear-lrs", "1e-4,1e-2", "--epochs-rule", "size"]
    )
    cfg = from_flags(FinetuneConfig, args)
    assert (cfg.linear_lr, cfg.linear_lrs, cfg.epochs_rule) == ("select", (1e-4, 1e-2), "size")
    for bad, match in (
        ("", "linear_lrs is empty"),
        ("1e-3,0", "must be positive"),
        ("1e-3,-1e-2", "must be positive"),
        ("1e-3,1e-3", "listed twice"),
    ):
        with pytest.raises(ConfigError, match=match):
            build(FinetuneConfig, {"linear_lrs": bad})
    with pytest.raises(ConfigError, match="linear_lr='best': expected one of paper, select"):
        build(FinetuneConfig, {"linear_lr": "best"})
    with pytest.raises(ConfigError, match="epochs_rule='steps': expected one of fraction, size"):
        build(FinetuneConfig, {"epochs_rule": "steps"})
