"""Mixed precision and channels_last: CUDA-only switches that resolve to off on CPU, and say so.

The CUDA test runs only where a GPU is present; nothing here needs one to pass.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from mococxr.config import PretrainConfig, build
from mococxr.data.phantom import synthesize
from mococxr.train import checkpoints
from mococxr.train import pretrain as pretrain_module
from mococxr.train.precision import Precision, load_scaler_state, resolve

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "device" / "throughput.py"
FLAGS = {
    "init": "random",
    "image_size": 32,
    "batch_size": 8,
    "epochs": 1,
    "moco_k": 16,
    "lr": 1e-3,
    "scheduler": "constant",
    "workers": 0,
    "seed": 0,
    "resume_state": "keep",
}


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_on_cpu_amp_resolves_to_off_with_a_reason_and_channels_last_stays(amp, channels_last):
    prec = resolve(amp, channels_last, torch.device("cpu"))
    assert (prec.amp, prec.channels_last, prec.device_type, prec.dtype) == ("off", channels_last, "cpu", None)
    assert prec.params() == {"amp_effective": "off", "channels_last_effective": str(channels_last)}
    if amp == "off":
        assert prec.reason == ""  # nothing refused
    else:
        assert prec.reason == f"amp={amp} ignored on cpu: mixed precision is CUDA-only"


def test_an_unknown_amp_is_refused():
    with pytest.raises(ValueError, match="amp='fp8'"):
        resolve("fp8", False, "cpu")
    with pytest.raises(ValueError, match="amp='fp8'"):
        Precision("fp8")


def test_autocast_scaler_and_formats_are_no_ops_when_off():
    prec = resolve("fp16", False, "cpu")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with prec.autocast():
        assert not torch.is_autocast_enabled("cpu")
        assert (a @ b).dtype == torch.float32
    scaler = prec.grad_scaler()
    assert not scaler.is_enabled() and scaler.state_dict() == {}
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.5)
    loss = (w * 2).sum()
    assert scaler.scale(loss) is loss  # unscaled
    loss.backward()
    scaler.step(opt)  # a plain optimizer step
    scaler.update()
    assert torch.equal(w.detach(), torch.zeros(3))
    x = torch.randn(2, 3, 8, 8)
    assert prec.batch(x) is x  # nothing to copy: same device, same format
    conv = torch.nn.Conv2d(3, 4, 3)
    assert prec.model(conv).weight.is_contiguous()
    on = resolve("fp16", True, "cpu")  # channels_last is honoured on CPU (faster ResNet steps there)
    assert on.batch(x).is_contiguous(memory_format=torch.channels_last)
    assert on.model(torch.nn.Conv2d(3, 4, 3)).weight.is_contiguous(memory_format=torch.channels_last)


def test_precision_built_directly_applies_what_it_says():
    """The device benchmark builds Precision directly: its autocast and formats work on any device."""
    prec = Precision("bf16", True, "cpu")
    with prec.autocast():
        assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype == torch.bfloat16
    x = prec.batch(torch.randn(2, 3, 8, 8))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert prec.batch(torch.randn(2, 3)).shape == (2, 3)  # not an image batch: left as it is
    conv = prec.model(torch.nn.Conv2d(3, 4, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not prec.grad_scaler().is_enabled()  # bf16 needs no scaler
    assert prec.params() == {"amp_effective": "bf16", "channels_last_effective": "True"}


def test_a_scaler_state_from_another_precision_resumes():
    enabled = torch.amp.GradScaler("cpu", enabled=True, init_scale=128.0)
    load_scaler_state(enabled, {})  # saved by a disabled scaler (a CPU run resumed on a GPU): initial scale
    assert enabled.get_scale() == 128.0
    load_scaler_state(enabled, {**enabled.state_dict(), "scale": 8.0})
    assert enabled.get_scale() == 8.0
    disabled = Precision().grad_scaler()
    load_scaler_state(disabled, {"scale": 8.0})  # saved under fp16 on a GPU, resumed on CPU: ignored
    assert disabled.state_dict() == {}


@pytest.fixture()
def phantom(tmp_path, tracking_uri):
    return synthesize(tmp_path / "phantom", 40, size=32, seed=1)


def test_pretrain_with_amp_on_cpu_runs_in_full_precision_and_says_so(phantom, capfd):
    cfg = build(
        PretrainConfig,
        {
            **FLAGS,
            "amp": "bf16",
            "channels_last": True,
            "experiment": "precision",
            "data": {"root": str(phantom)},
        },
    )
    result = pretrain_module.pretrain(cfg, progress=False)
    params = MlflowClient().get_run(result.run_id).data.params
    assert (params["amp"], params["channels_last"]) == ("bf16", "True")  # what was asked
    assert (params["amp_effective"], params["channels_last_effective"]) == ("off", "True")  # what ran
    assert "amp=bf16 ignored on cpu" in capfd.readouterr().err
    assert checkpoints.load_resume_state(result.run_id)["scaler"] == {}  # torch's disabled scaler


def test_a_resume_under_another_precision_keeps_both_in_params(phantom, monkeypatch):
    """A resume on another device runs another precision: the run keeps what it began with and adds
    ``<param>_from_epoch_<N>`` (channels_last off stands in for another device here)."""
    cfg = build(PretrainConfig, {**FLAGS, "experiment": "precision-resume", "data": {"root": str(phantom)}})
    first = pretrain_module.pretrain(cfg, progress=False)
    monkeypatch.setattr(pretrain_module, "resolve", lambda amp, cl, device: Precision("off", False, "cpu"))
    again = pretrain_module.pretrain(cfg, resume=first.run_id, resume_epochs=2, progress=False)
    assert again.run_id == first.run_id and sorted(again.history) == [1, 2]
    params = MlflowClient().get_run(first.run_id).data.params
    assert params["channels_last_effective"] == "True"  # pretraining's default
    assert params["channels_last_effective_from_epoch_2"] == "False"
    assert params["amp_effective"] == "off" and "amp_effective_from_epoch_2" not in params


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_switches_take_effect():
    prec = resolve("fp16", True, "cuda")
    assert (prec.amp, prec.channels_last, prec.reason) == ("fp16", True, "")
    model = prec.model(
        torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.LazyLinear(1)), "cuda"
    )
    x = prec.batch(torch.randn(4, 3, 16, 16), "cuda")
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
    model(x)  # materialise the lazy layer before the optimizer sees it
    opt = torch.optim.Adam(model.parameters())
    scaler = prec.grad_scaler()
    assert scaler.is_enabled()
    with prec.autocast():
        out = model(x)
        assert out.dtype == torch.float16
    scaler.scale(out.float().mean()).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.state_dict()["scale"] > 0
    bf16 = resolve("bf16", False, "cuda")
    assert bf16.amp == ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "off")


def _bench_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("device_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the checkout on sys.path
    spec.loader.exec_module(module)
    return module


def test_the_device_benchmark_runs_on_cpu_with_tiny_settings(tmp_path):
    rows = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--device",
            "cpu",
            "--backbones",
            "resnet18",
            "--image-size",
            "32",
            "--batch",
            "2",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--repeats",
            "1",
            "--channels-last",
            "off",
            "--json",
            str(rows),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "| resnet18 | fp32+nchw | 2 | 32 |" in done.stdout
    (row,) = json.loads(rows.read_text())["rows"]
    assert row["train"]["img_s"] > 0 and row["infer"]["img_cpu_s"] > 0


def test_the_benchmark_writes_a_cost_section_the_plan_accepts(monkeypatch):
    from mococxr.flows.plan import Cost

    bench = _bench_module(monkeypatch)
    rows = [
        bench.Row(
            b,
            bench.setting_name(amp, cl),
            amp,
            cl,
            64,
            224,
            bench.Rate(rate, rate, rate),
            bench.Rate(1, 1, 1),
        )
        for b, base in (("resnet18", 1000.0), ("densenet121", 400.0))
        for amp, cl, rate in (("off", False, base), ("bf16", True, 2 * base))
    ]
    best = yaml.safe_load(bench.cost_snippet(rows, "NVIDIA H100", "best"))["cost"]
    assert best == {
        "gpu": "NVIDIA H100, bf16+cl, batch 64",
        "gpu_img_s_resnet18": 2000.0,
        "gpu_img_s_densenet121": 800.0,
    }
    assert build(Cost, best).gpu_img_s_densenet121 == 800.0
    fp32 = yaml.safe_load(bench.cost_snippet(rows, "NVIDIA H100", "fp32+nchw"))["cost"]
    assert (fp32["gpu_img_s_resnet18"], fp32["gpu_img_s_densenet121"]) == (1000.0, 400.0)
    with pytest.raises(SystemExit, match="densenet121"):
        bench.cost_snippet(rows[:2], "NVIDIA H100", "best")
