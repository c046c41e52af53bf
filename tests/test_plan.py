"""`mococxr paper`: the paper as one plan (sweep/plan.py, sweep/stages.py, sweep/cost.py,
report/paper_plan.py)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from browser import CHROMIUM, look_at_the_paper
from mlflow.tracking import MlflowClient

from mococxr.cli import main
from mococxr.config import load_yaml
from mococxr.errors import ConfigError
from mococxr.flows.paper import run_paper
from mococxr.flows.plan import load_plan, parse_plan, select_stages
from mococxr.report.record import report_dir
from mococxr.sweep.storage import make_sampler

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "sweeps" / "paper.yaml"
PHANTOM = REPO / "sweeps" / "paper_phantom.yaml"

ITEMS = {  # report family -> the paper's items it must hold
    "paper-chexpert": {
        "table1.md",
        "appendix_table1.md",
        "figure3.png",
        "figure4.png",
        "appendix_figure3.png",
    },
    "paper-shenzhen": {"appendix_table2.md", "appendix_table3.md", "figure5.png", "appendix_figure4.png"},
    "paper-table2": {"table2.md", "table2.csv", "table2.json"},
    "paper-competition": {"appendix_table4.md", "appendix_table5.md"},
}


def _runs(experiment: str, kind: str):
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`mococxr.kind` = '{kind}'") if exp else []


@pytest.mark.slow
def test_paper_phantom_makes_every_item_and_a_second_run_trains_nothing(
    tmp_path, tracking_uri, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    plan = load_plan(PHANTOM)
    result = run_paper(PHANTOM)
    assert set(result.reports) == {"chexpert", "shenzhen", "table2", "competition"}
    client = MlflowClient()
    for family, run_id in result.reports.items():
        run = client.get_run(run_id)
        assert run.info.run_name == f"paper-{family}" and run.data.tags["mococxr.kind"] == "report"
        files = {Path(a.path).name for a in client.list_artifacts(run_id, report_dir(run_id))}
        assert ITEMS[run.info.run_name] <= files, (family, files)

    # both backbones where the paper has both; the phantom's stand-in baseline is named as such
    table1 = Path(f"reports/{plan.name}/chexpert/table1.md").read_text()
    assert "| ResNet18 |" in table1 and "| DenseNet121 |" in table1 and "Random-init" in table1
    assert (
        "layout only" in table1
        and "Linear head: a plain linear layer on the frozen features, as in the paper" in table1
    )
    assert "| DenseNet121 |" in Path(f"reports/{plan.name}/shenzhen/appendix_table3.md").read_text()
    # every deviation named (issue 18): the per-cell linear lr, epochs in numeric order, augmentation,
    # pretraining data, policy, probe gap, best-at-last counts; no mark where nothing is comparable
    for line in (
        "- Linear: learning rate chosen per run (backbone x init x fraction x draw) on validation AUC "
        "from {3e-5, 1e-4, 1e-3}, the test set read for the chosen one only:",
        "- Linear: augmentation none",
        "- End-to-end: augmentation random rotation",
        "- MoCo pretraining data: frontal images only",
        "- Uncertainty policy (data.policy): ignore",
        "- Linear: largest probe gap",
        "- Linear: the best validation epoch was the last one in",
        "- End-to-end: the best validation epoch was the last one in",
        "- Test set: 69 images of 59 patients",
        "no cell is marked.",
    ):
        assert line in table1, line
    assert re.search(
        r"- Linear: epochs per label fraction \(set per fraction by the spec's epochs\): "
        r"10%: \d+ \(\d+ steps\), 100%: \d+ \(\d+ steps\)",
        table1,
    )
    assert "≠" not in table1 and "†" not in table1
    linear_runs = [
        r
        for r in _runs(plan.experiment("chexpert"), "finetune")
        if r.data.tags["mococxr.protocol"] == "linear"
    ]
    assert linear_runs and all(
        r.data.params["linear_lr"] == "select"
        and "lr_select/val_auc/3e-05" in r.data.metrics
        and float(r.data.params["linear_lr_chosen"]) in (3e-5, 1e-4, 1e-3)
        for r in linear_runs
    )
    assert (
        "Corrected published cells" in Path(f"reports/{plan.name}/competition/appendix_table5.md").read_text()
    )
    table4 = Path(
        f"reports/{plan.name}/competition/appendix_table4.md"
    ).read_text()  # ResNet18 only, as the paper
    assert "| Cardiomegaly |" in table4 and "| pleural_effusion |" in table4 and "DenseNet121" not in table4

    # every Table 2 row is linked to a pretraining trial of the ResNet18 study
    trials = {
        r.info.run_id: r
        for r in _runs(plan.experiment("pretrain"), "pretrain")
        if r.data.tags.get("mococxr.optuna_study") == plan.study_name("resnet18")
    }
    rows = yaml.safe_load(Path(f"reports/{plan.name}/table2/table2.json").read_text())["rows"]
    assert len(rows) == 2 and {r["pretrain_run_id"] for r in rows} == set(trials)
    # one Markdown row per learning rate, in the paper's order (largest first)
    table2 = Path(f"reports/{plan.name}/table2/table2.md").read_text()
    assert re.findall(r"^\| (1e-\d) \|", table2, flags=re.M) == ["1e-3", "1e-4"]
    assert {(r["lr"], r["scheduler"]) for r in rows} == {(1e-3, "cosine"), (1e-4, "cosine")}
    # every trial's checkpoint is registered with its values; production is the study's best
    versions = client.search_model_versions(f"name = '{plan.registered_model('resnet18')}'")
    assert sorted(v.tags["mococxr.optuna_trial"] for v in versions) == ["0", "1"]
    assert all(
        {"mococxr.lr", "mococxr.scheduler", "mococxr.backbone", "mococxr.checkpoint_epoch"} <= set(v.tags)
        for v in versions
    )
    assert client.get_model_version_by_alias(plan.registered_model("densenet121"), "production")

    # the second run finds everything: no training run starts, the reports update in place
    n_finetune = len(_runs(plan.experiment("chexpert"), "finetune"))
    capsys.readouterr()
    assert main(["paper", str(PHANTOM)]) == 0
    out = capsys.readouterr().out
    assert "0 training run(s) started by this call" in out
    assert len(_runs(plan.experiment("chexpert"), "finetune")) == n_finetune
    assert len(_runs(plan.experiment("chexpert"), "report")) == 2  # paper-chexpert and paper-competition

    # what a user sees in the MLflow UI: lineage to click, the report page with Figure 3 and Table 1 whole
    assert CHROMIUM, "the browser checks need Chromium (`apt-get install chromium`; .ci/run installs it)"
    measured = look_at_the_paper(tracking_uri, plan.experiment("chexpert"), tmp_path / "shots")
    table1_rows = len(Path(f"reports/{plan.name}/chexpert/table1.csv").read_text().strip().splitlines()) - 1
    assert measured["tables"][0]["rows"] == table1_rows == 6  # 2 backbones x 3 comparisons, none cut


def _imagenet_files(folder: Path) -> None:
    """ImageNet weight files in torchvision's own format and name, as a user would download them."""
    from mococxr.models.backbones import imagenet_weights_filename

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), folder / imagenet_weights_filename("resnet18"))


def _tiny_imagenet_plan() -> dict:
    raw = copy.deepcopy(load_yaml(PHANTOM))
    raw["name"] = "mococxr-paper-imagenet-test"
    raw["pretrain"]["backbones"] = ["resnet18"]
    raw["pretrain"]["study"]["base"]["init"] = "imagenet"
    raw["pretrain"]["study"]["budget"] = {"n_trials": 1, "epochs": 1}
    raw["pretrain"]["study"]["search_space"] = {
        "lr": {"choices": [1e-3]},
        "scheduler": {"choices": ["cosine"]},
    }
    raw["finetune"]["baseline"] = "imagenet"
    raw["stages"] = {"chexpert": {"fractions": [1.0], "draws": 1, "epochs": {1.0: 1}}}
    return raw


def test_imagenet_path_loads_torchvision_weight_files(tmp_path, tracking_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "weights"
    weights.mkdir()
    _imagenet_files(weights)
    monkeypatch.setenv("MOCOCXR_IMAGENET_WEIGHTS", str(weights))
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(_tiny_imagenet_plan()))
    result = run_paper(path, only=["data", "pretrain", "chexpert"])
    plan = load_plan(path)
    pretrain = _runs(plan.experiment("pretrain"), "pretrain")
    assert len(pretrain) == 1 and pretrain[0].data.params["init"] == "imagenet"
    finetunes = _runs(plan.experiment("chexpert"), "finetune")
    assert {r.data.tags["mococxr.init"] for r in finetunes} == {"imagenet", "moco"}
    assert {
        r.data.params["init_resolved"] for r in finetunes if r.data.tags["mococxr.init"] == "imagenet"
    } == {"imagenet"}
    assert result.started == 1 + 4


def test_missing_imagenet_weights_stop_the_paper_before_anything_runs(
    tmp_path, tracking_uri, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOCOCXR_IMAGENET_WEIGHTS", str(tmp_path / "nowhere"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert main(["paper", str(PAPER), "--only", "pretrain"]) == 2
    err = capsys.readouterr().err
    assert "resnet18-f37072fd.pth" in err and "Traceback" not in err
    assert not _runs("mococxr-paper-pretrain", "pretrain")


@pytest.mark.slow
def test_plan_lists_every_run_and_its_cost_without_training(tmp_path, monkeypatch, capsys):
    from mococxr.data.phantom import synthesize

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'never.db'}")
    chexpert = synthesize(tmp_path / "chexpert", 300, size=32, layout="chexpert", n_valid=60)
    shenzhen = synthesize(tmp_path / "shenzhen", 120, size=32, layout="shenzhen")
    code = main(
        ["paper", str(PAPER), "--plan", "--chexpert-root", str(chexpert), "--shenzhen-root", str(shenzhen)]
    )
    out = capsys.readouterr().out
    assert code == 0
    # 16 trials; CheXpert 2 backbones x 2 inits x 2 protocols x 14 draws; Shenzhen x 9 draws; Table 2: 8
    # checkpoints; competition 5 tasks x 4 x 14, less the 56 effusion cells CheXpert's stage already runs
    expected = {"pretrain": 16, "chexpert": 112, "shenzhen": 72, "table2": 8, "competition": 224}
    for stage, n in expected.items():
        assert re.search(rf"^{stage}\s+{n}\s", out, re.M), (stage, out[-2000:])
    assert re.search(r"^total\s+432\s", out, re.M)
    assert len(re.findall(r"^  \[\d+\] ", out, re.M)) == 432
    assert "measured here" in out and "GPU" in out
    assert not (tmp_path / "never.db").exists() and not (tmp_path / "mlruns").exists()


def test_plan_errors_name_the_key():
    raw = load_yaml(PHANTOM)
    bad = copy.deepcopy(raw)
    bad["stages"]["competition"]["tasks"]["Edema"] = "maybe"
    with pytest.raises(ConfigError, match=r"stages.competition.tasks.Edema"):
        parse_plan(bad, source="p.yaml")
    bad = copy.deepcopy(raw)
    bad["finetune"]["base"]["head"] = "mlp"
    with pytest.raises(ConfigError, match=r"finetune.base.head"):
        parse_plan(bad, source="p.yaml")
    bad = copy.deepcopy(raw)
    bad["stages"]["table2"]["backbone"] = "resnet50"
    with pytest.raises(ConfigError, match=r"not pretrained by this plan"):
        parse_plan(bad, source="p.yaml")
    with pytest.raises(ConfigError, match=r"--only pretrian: unknown stage"):
        select_stages(["pretrian"])


def test_shipped_plans_are_valid_and_the_paper_spec_is_the_papers():
    paper, phantom = load_plan(PAPER), load_plan(PHANTOM)
    assert paper.backbones == phantom.backbones == ("resnet18", "densenet121")
    assert paper.baseline == "imagenet" and paper.moco_start == "imagenet"
    assert phantom.baseline == "random" and phantom.moco_start == "random"
    spec = paper.study_spec("resnet18")
    assert spec.pruner.name == "none" and spec.sampler.name == "grid" and spec.budget.n_trials == 8
    assert paper.grids["chexpert"].fractions == [0.001, 0.01, 0.1, 1.0]
    assert paper.grids["shenzhen"].fractions == [0.0625, 0.25, 1.0]
    assert set(paper.grids["competition"].tasks) == {
        "Atelectasis",
        "Cardiomegaly",
        "Consolidation",
        "Edema",
        "pleural_effusion",
    }
    assert paper.finetune.head == "plain"
    # the competition stage's effusion grid is the CheXpert stage's ResNet18 grid: the same cells
    from mococxr.config import config_hash

    chexpert = {config_hash(c) for g in paper.grid_specs("chexpert") for _, c in g.configs()}
    effusion = [g for g in paper.grid_specs("competition") if g.base.data.task == "pleural_effusion"][0]
    assert {config_hash(c) for _, c in effusion.configs()} <= chexpert


PROTOCOL_FIELDS = (
    "protocol",
    "head",
    "lr",
    "linear_lr",
    "linear_lrs",
    "epochs_rule",
    "min_steps",
    "preset",
    "val_every",
    "batch_size",
    "image_size",
    "epochs",
    "epochs_scale",
    "weight_decay",
    "fraction",
    "draw",
    "seed",
)
DATA_FIELDS = ("dataset", "csv", "test_csv", "task", "policy", "frontal_only", "val", "test", "split_seed")


@pytest.mark.parametrize(
    ("grid_file", "stage"), [("finetune_grid.yaml", "chexpert"), ("finetune_grid_shenzhen.yaml", "shenzhen")]
)
def test_standalone_grids_run_the_paper_specs_protocol(grid_file, stage):
    """The README's real-data recipe (the standalone grids) trains every cell exactly as sweeps/paper.yaml's
    stage does, init aside: same head, learning-rate rule, budget rule, floor, augmentation and cadence."""
    from mococxr.sweep.spec import load_grid

    def cells(configs):
        return {(c.protocol, c.fraction, c.draw): c for _, c in configs}

    paper = next(g for g in load_plan(PAPER).grid_specs(stage) if g.base.backbone == "resnet18")
    ours, theirs = cells(load_grid(REPO / "sweeps" / grid_file).configs()), cells(paper.configs())
    assert set(ours) == set(theirs)
    for key, cfg in ours.items():
        for name in PROTOCOL_FIELDS:
            assert getattr(cfg, name) == getattr(theirs[key], name), (grid_file, key, name)
        for name in DATA_FIELDS:
            assert getattr(cfg.data, name) == getattr(theirs[key].data, name), (
                grid_file,
                key,
                f"data.{name}",
            )


def test_grid_sampler_visits_every_point_once(tmp_path):
    import optuna

    spec = load_plan(PAPER).study_spec("resnet18", storage=f"sqlite:///{tmp_path / 'o.db'}")
    study = optuna.create_study(sampler=make_sampler(spec), storage=spec.storage)
    study.optimize(lambda t: {n: p.suggest(t) for n, p in spec.search_space.items()}["lr"], n_trials=8)
    points = {(t.params["lr"], t.params["scheduler"]) for t in study.trials}
    assert len(points) == 8


@pytest.mark.realdata
@pytest.mark.slow
def test_plan_pieces_on_nih_radiographs_make_a_table1(
    tmp_path, tracking_uri, monkeypatch, nih_sample, capsys
):
    """A miniature Table 1 on real radiographs: MoCo (a 2-trial study) vs random init, linear and e2e."""
    monkeypatch.chdir(tmp_path)
    raw = copy.deepcopy(load_yaml(PHANTOM))
    raw["name"] = "mococxr-paper-nih-test"
    del raw["phantom"]
    nih = {
        "dataset": "nih",
        "root": str(nih_sample),
        "task": "pleural_effusion",
        "val": 0.15,
        "test": 0.3,
        "split_seed": 0,
        "cache": str(tmp_path / "cache"),
    }
    raw["data"] = {"chexpert": nih, "shenzhen": nih}
    raw["pretrain"]["backbones"] = ["resnet18"]
    raw["pretrain"]["study"]["budget"] = {"n_trials": 2, "epochs": 2}
    raw["pretrain"]["study"]["search_space"] = {
        "lr": {"choices": [1e-3, 1e-4]},
        "scheduler": {"choices": ["cosine"]},
    }
    raw["pretrain"]["study"]["base"].update(image_size=64, moco_k=512)
    raw["finetune"]["base"]["image_size"] = 64
    raw["stages"] = {
        "chexpert": {"fractions": [0.1, 1.0], "draws": {0.1: 2, 1.0: 1}, "epochs": {0.1: 4, 1.0: 3}}
    }
    path = tmp_path / "nih.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = run_paper(path)
    table1 = Path("reports/mococxr-paper-nih-test/chexpert/table1.md").read_text()
    print(table1)  # pasted in the closing note of issue 13
    assert (
        "| ResNet18 | Linear Model | Linear Model |" in table1
        and "| ResNet18 | End-to-End | End-to-End |" in table1
    )
    assert "dataset nih" in table1 and "synthetic phantom" not in table1
    run = MlflowClient().get_run(result.reports["chexpert"])
    folder = report_dir(run.info.run_id)
    assert f"{folder}/table1.md" in {a.path for a in MlflowClient().list_artifacts(run.info.run_id, folder)}
    with capsys.disabled():
        print("\n" + table1)
