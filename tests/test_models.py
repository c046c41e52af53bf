"""Tests of models/backbones.py and models/moco.py: all on CPU, tiny encoders or resnet18 at 32 px."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm

from mococxr.errors import ConfigError, DataError
from mococxr.models.backbones import (
    Encoder,
    available_imagenet_weights,
    build_encoder,
    encoder_state_dict,
    imagenet_weights_filename,
    load_state_dict_file,
)
from mococxr.models.moco import MoCo, _pretext_accuracy


def flat_encoder(width: int = 4) -> Encoder:
    """Features = the input itself: lets a test pick q and k by hand."""
    return Encoder("flat", nn.Flatten(), width)


def bn_encoder() -> Encoder:
    """A conv + BN trunk: its output depends on which images share a batch."""
    trunk = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    return Encoder("tiny_bn", trunk, 4)


def identity_head(model: MoCo) -> None:
    with torch.no_grad():
        for head in (model.head_q, model.head_k):
            head.weight.copy_(torch.eye(head.weight.shape[0]))
            head.bias.zero_()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub dir, and no MOCOCXR_IMAGENET_WEIGHTS: nothing on this machine leaks in."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.delenv("MOCOCXR_IMAGENET_WEIGHTS", raising=False)
    return tmp_path / "hub" / "checkpoints"


# ---------------------------------------------------------------- queue, momentum, loss


def test_queue_wraps_around_including_short_last_batch():
    model = MoCo(flat_encoder(), dim=4, K=6, mlp=False, batch_size=3)
    assert torch.allclose(model.queue.norm(dim=0), torch.ones(6))  # starts as random unit vectors
    keys = torch.arange(4 * 8, dtype=torch.float32).view(8, 4)

    model._dequeue_and_enqueue(keys[:3])
    assert int(model.queue_ptr) == 3
    torch.testing.assert_close(model.queue[:, :3], keys[:3].T)

    model._dequeue_and_enqueue(keys[3:5])  # short batch, still fits
    assert int(model.queue_ptr) == 5
    model._dequeue_and_enqueue(keys[5:8])  # short batch crossing the end: column 5, then 0 and 1
    assert int(model.queue_ptr) == 2
    torch.testing.assert_close(model.queue[:, 5], keys[5])
    torch.testing.assert_close(model.queue[:, :2], keys[6:8].T)
    torch.testing.assert_close(model.queue[:, 2:5], keys[2:5].T)  # the untouched, older keys

    with pytest.raises(ConfigError, match="larger than the queue"):
        model._dequeue_and_enqueue(torch.zeros(7, 4))


def test_enqueue_casts_keys_to_queue_dtype():
    model = MoCo(flat_encoder(), dim=4, K=4, mlp=False)
    model._dequeue_and_enqueue(torch.ones(2, 4, dtype=torch.bfloat16))
    assert model.queue.dtype == torch.float32
    torch.testing.assert_close(model.queue[:, :2], torch.ones(4, 2))


def test_k_not_multiple_of_batch_size_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"K=100 is not a multiple of the batch size 32.*K=96"):
        MoCo(flat_encoder(), dim=4, K=100, batch_size=32)
    MoCo(flat_encoder(), dim=4, K=96, batch_size=32)


def test_momentum_update_exact_numbers():
    model = MoCo(flat_encoder(2), dim=2, K=4, m=0.75, mlp=False)
    with torch.no_grad():
        model.head_q.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        model.head_q.bias.copy_(torch.tensor([8.0, -4.0]))
        model.head_k.weight.copy_(torch.tensor([[5.0, 6.0], [7.0, 8.0]]))
        model.head_k.bias.copy_(torch.tensor([0.0, 4.0]))
    model._momentum_update_key_encoder()
    # 0.75 * k + 0.25 * q
    torch.testing.assert_close(model.head_k.weight, torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    torch.testing.assert_close(model.head_k.bias, torch.tensor([2.0, 2.0]))
    assert not any(p.requires_grad for p in model.head_k.parameters())
    assert all(p.requires_grad for p in model.head_q.parameters())


def test_key_encoder_starts_as_copy_of_query_encoder():
    enc_q, enc_k = bn_encoder(), bn_encoder()
    model = MoCo(enc_q, enc_k, dim=3, K=4)
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters(), strict=True):
        assert torch.equal(pq, pk) and pk is not pq and not pk.requires_grad


def test_infonce_logits_and_loss_match_hand_computation():
    T = 0.5
    model = MoCo(flat_encoder(), dim=4, K=3, m=0.0, T=T, mlp=False, shuffle="none")
    identity_head(model)
    queue = F.normalize(
        torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]), dim=1
    )
    model.queue.copy_(queue.T)
    im_q = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    im_k = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])

    logits, labels = model(im_q, im_k)

    q = [[0.6, 0.8, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
    k = [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1 / math.sqrt(2), 1 / math.sqrt(2)]]
    expected = (
        torch.tensor(
            [
                [sum(a * b for a, b in zip(qi, vec, strict=True)) for vec in [ki, *queue.tolist()]]
                for qi, ki in zip(q, k, strict=True)
            ]
        )
        / T
    )
    torch.testing.assert_close(logits, expected)
    assert labels.tolist() == [0, 0]
    loss = F.cross_entropy(logits, labels)
    manual = -sum(row[0] - math.log(sum(math.exp(v) for v in row)) for row in expected.tolist()) / 2
    assert loss.item() == pytest.approx(manual, rel=1e-6)
    # positives 0.8/T vs best negative 0.6/T (row 0), 0.707/T vs 0.5/T (row 1): both correct
    assert _pretext_accuracy(logits, labels).item() == 1.0
    # the keys were enqueued after the logits were made
    torch.testing.assert_close(model.queue[:, :2], torch.tensor(k).T)
    assert int(model.queue_ptr) == 2


# ---------------------------------------------------------------- shuffle BN


def test_split_bn_equals_separate_sub_batches_and_differs_from_full_batch():
    model = MoCo(bn_encoder(), dim=3, K=8, shuffle="split_bn", split_groups=2).train()
    im_k = torch.randn(8, 3, 6, 6)

    torch.manual_seed(123)
    k_split = model._split_bn_keys(im_k)

    torch.manual_seed(123)
    idx = torch.randperm(8)  # the permutation the emulation drew
    first, second = model._encode_k(im_k[idx[:4]]), model._encode_k(im_k[idx[4:]])
    expected = torch.empty_like(k_split)
    expected[idx[:4]], expected[idx[4:]] = first, second
    torch.testing.assert_close(k_split, expected)

    k_full = model._encode_k(im_k)
    assert (k_split - k_full).abs().max() > 1e-3  # per-sub-batch BN statistics really differ

    model.split_groups = 1  # one group is a plain full-batch forward (BN is permutation invariant)
    torch.testing.assert_close(model._split_bn_keys(im_k), k_full)


def test_auto_shuffle_is_split_bn_in_one_process_and_ddp_needs_a_process_group():
    assert MoCo(bn_encoder(), dim=3, K=4).shuffle_mode() == "split_bn"
    with pytest.raises(ConfigError, match="split_bn"):
        MoCo(bn_encoder(), dim=3, K=4, shuffle="ddp").shuffle_mode()
    with pytest.raises(ConfigError, match="shuffle="):
        MoCo(bn_encoder(), dim=3, K=4, shuffle="bogus")


def _ddp_worker(rank: int, world: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same weights in every process, as DDP would broadcast them
    model = MoCo(flat_encoder(), dim=4, K=8, T=0.5, mlp=False, batch_size=4)
    torch.manual_seed(10 + rank)  # different images in every process
    images = torch.randn(2, 4)
    logits, _ = model(images, images)
    out[rank] = (
        model.shuffle_mode(),
        logits[:, 0].tolist(),
        model.queue[:, :4].T.tolist(),
        F.normalize(model.head_k(images), dim=1).tolist(),
    )
    dist.destroy_process_group()


def test_ddp_shuffle_unshuffles_keys_and_keeps_queues_equal(tmp_path):
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "pg"), out), nprocs=2)
    modes, pos0, queue0, keys0 = out[0]
    _, pos1, queue1, keys1 = out[1]
    assert modes == "ddp"
    # query == key image and equal encoders: every positive logit is 1/T only if unshuffle is right
    assert pos0 == pytest.approx([2.0, 2.0]) and pos1 == pytest.approx([2.0, 2.0])
    assert queue0 == queue1  # both processes enqueued the gathered global batch
    assert torch.allclose(torch.tensor(queue0), torch.tensor(keys0 + keys1))


def test_resnet18_moco_step_channels_last_and_autocast():
    torch.manual_seed(0)
    model = MoCo(build_encoder("resnet18"), dim=16, K=12, split_groups=2, batch_size=4).train()
    model = model.to(memory_format=torch.channels_last)
    im = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before_k = model.encoder_k.trunk.conv1.weight.clone()

    logits, labels = model(im, im + 0.1 * torch.randn_like(im))
    assert logits.shape == (4, 13) and logits.dtype == torch.float32
    F.cross_entropy(logits, labels).backward()
    assert model.encoder_q.trunk.conv1.weight.grad is not None
    assert all(p.grad is None for p in model.encoder_k.parameters())
    opt.step()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(im[:3], im[:3])  # a short last batch: 3 keys wrap around the queue end
    assert logits.dtype == torch.float32 and model.queue.dtype == torch.float32
    assert int(model.queue_ptr) == 7
    assert not torch.equal(model.encoder_k.trunk.conv1.weight, before_k)  # moved by momentum


# ---------------------------------------------------------------- backbones


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("densenet121", 1024)])
def test_backbone_feature_dims(name, dim):
    encoder = build_encoder(name).eval()
    assert encoder.name == name and encoder.feature_dim == dim
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        features = encoder.features(x)
        assert features.shape == (2, dim)
        torch.testing.assert_close(encoder(x), features)
    if name == "densenet121":  # pooled after the final BN and ReLU
        assert (features >= 0).all()


def test_unknown_backbone_and_init_are_config_errors():
    with pytest.raises(ConfigError, match="resnet18"):
        build_encoder("vgg11")
    with pytest.raises(ConfigError, match="init"):
        build_encoder("resnet18", init="imgnet")
    with pytest.raises(ConfigError, match="state_dict"):
        build_encoder("resnet18", init="checkpoint")


def test_random_init_is_seeded_by_caller():
    torch.manual_seed(5)
    a = build_encoder("resnet18")
    torch.manual_seed(5)
    b = build_encoder("resnet18")
    assert torch.equal(a.trunk.conv1.weight, b.trunk.conv1.weight)
    assert "trunk.conv1.weight" in a.state_dict() and not any(".fc." in k for k in a.state_dict())


def _assert_same_trunk(a: Encoder, b: Encoder) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_round_trip_through_moco_state_dict(tmp_path):
    torch.manual_seed(1)
    model = MoCo(build_encoder("resnet18"), dim=8, K=8)
    with torch.no_grad():
        model.encoder_q.trunk.conv1.weight.add_(1.0)  # query and key encoders now differ
        model.encoder_q.trunk.bn1.running_mean.fill_(0.5)
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "state.pt")

    loaded = build_encoder(
        "resnet18", init="checkpoint", state_dict=load_state_dict_file(tmp_path / "state.pt")
    )
    _assert_same_trunk(loaded, model.encoder_q)

    # FAIR's layout: DDP "module." prefix, torchvision keys, MLP head in fc, under "state_dict"
    fair = {f"module.encoder_q.{k}": v for k, v in tvm.resnet18().state_dict().items()}
    fair["module.encoder_q.fc.0.weight"] = torch.zeros(512, 512)
    fair["module.encoder_k.conv1.weight"] = torch.zeros(64, 3, 7, 7)
    fair["module.queue"] = torch.zeros(128, 8)
    torch.save({"state_dict": fair, "arch": "resnet18", "epoch": 200}, tmp_path / "fair.pth.tar")
    loaded = build_encoder(
        "resnet18", init="checkpoint", state_dict=load_state_dict_file(tmp_path / "fair.pth.tar")
    )
    torch.testing.assert_close(loaded.trunk.conv1.weight, fair["module.encoder_q.conv1.weight"])

    # a fine-tuned model holding the encoder as `encoder`, next to its own head
    finetuned = {f"encoder.{k}": v for k, v in model.encoder_q.state_dict().items()} | {
        "head.weight": torch.ones(2)
    }
    _assert_same_trunk(build_encoder("resnet18", init="checkpoint", state_dict=finetuned), model.encoder_q)


def test_checkpoint_missing_or_foreign_keys_are_clear_errors(tmp_path):
    sd = tvm.resnet18().state_dict()
    del sd["layer4.1.conv2.weight"]
    with pytest.raises(ConfigError, match=r"1 missing keys.*layer4\.1\.conv2\.weight"):
        build_encoder("resnet18", init="checkpoint", state_dict=sd)
    with pytest.raises(ConfigError, match="does not fit backbone resnet18"):
        build_encoder("resnet18", init="checkpoint", state_dict=tvm.resnet50().state_dict())
    with pytest.raises(DataError, match="not found"):
        load_state_dict_file(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(DataError, match=r"junk\.pt\) is not a usable checkpoint: it is not a PyTorch file"):
        load_state_dict_file(tmp_path / "junk.pt")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="model, state_dict"):
        load_state_dict_file(tmp_path / "other.pt")


def test_imagenet_missing_file_names_path_and_how_to_get_it(hub):
    expected = hub / "resnet18-f37072fd.pth"
    assert imagenet_weights_filename("resnet18") == "resnet18-f37072fd.pth"
    assert available_imagenet_weights("resnet18") is None
    with pytest.raises(ConfigError) as info:
        build_encoder("resnet18", init="imagenet")
    message = str(info.value)
    assert str(expected) in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "MOCOCXR_IMAGENET_WEIGHTS" in message


def test_imagenet_loads_local_file_from_hub_cache_env_and_path(hub, tmp_path, monkeypatch):
    torch.manual_seed(2)
    reference = tvm.resnet18()
    hub.mkdir(parents=True)
    torch.save(reference.state_dict(), hub / imagenet_weights_filename("resnet18"))
    torch.manual_seed(3)  # a different random init, so equality below comes from the file
    encoder = build_encoder("resnet18", init="imagenet")
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(encoder.trunk.state_dict()[k], v) for k, v in expected.items())

    elsewhere = tmp_path / "weights"
    elsewhere.mkdir()
    (hub / imagenet_weights_filename("resnet18")).rename(elsewhere / imagenet_weights_filename("resnet18"))
    with pytest.raises(ConfigError, match="not found"):
        build_encoder("resnet18", init="imagenet")
    monkeypatch.setenv("MOCOCXR_IMAGENET_WEIGHTS", str(elsewhere))  # a folder holding the file
    assert available_imagenet_weights("resnet18") == elsewhere / "resnet18-f37072fd.pth"
    loaded = build_encoder("resnet18", init="imagenet", weights_path=elsewhere / "resnet18-f37072fd.pth")
    assert torch.equal(loaded.trunk.conv1.weight, reference.conv1.weight)


def test_imagenet_densenet_legacy_key_names(hub):
    torch.manual_seed(4)
    reference = tvm.densenet121()
    legacy = {}
    for key, value in reference.state_dict().items():
        if key.endswith("num_batches_tracked"):  # like the real file, written before torch 0.4.1
            continue
        for old, new in (("norm1", "norm.1"), ("conv1", "conv.1"), ("norm2", "norm.2"), ("conv2", "conv.2")):
            if ".denselayer" in key and f".{old}." in key:
                key = key.replace(f".{old}.", f".{new}.")
        legacy[key] = value
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    hub.mkdir(parents=True)
    torch.save(legacy, hub / imagenet_weights_filename("densenet121"))
    encoder = build_encoder("densenet121", init="imagenet")
    torch.testing.assert_close(
        encoder.trunk.features.denseblock1.denselayer1.norm1.weight,
        reference.features.denseblock1.denselayer1.norm1.weight,
    )
    assert set(encoder_state_dict(legacy)) == {
        k for k in reference.state_dict() if not k.startswith("classifier.") and "num_batches" not in k
    }
