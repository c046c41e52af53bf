"""Augmentation presets: shapes, normalization, the rotation/flip ranges of the CXR preset, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from mococxr.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    ToNormalizedTensor,
    TwoCrops,
    build_transform,
)
from mococxr.errors import ConfigError


def _textured(width: int = 80, height: int = 64, mode: str = "L", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
    return image.convert(mode)


def _bar(size: int = 96) -> Image.Image:
    """A horizontal white bar through the centre: its orientation measures the applied rotation."""
    pixels = np.zeros((size, size), dtype=np.uint8)
    pixels[size // 2 - 2 : size // 2 + 2, 10 : size - 10] = 255
    return Image.fromarray(pixels)


def _orientation_degrees(channel: torch.Tensor) -> float:
    """Angle of the principal axis of the bright pixels (second moments), in degrees."""
    ys, xs = np.nonzero(channel.numpy() > 0.5)
    xs, ys = xs - xs.mean(), ys - ys.mean()
    return math.degrees(0.5 * math.atan2(2 * (xs * ys).mean(), (xs * xs).mean() - (ys * ys).mean()))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_presets_return_float_3_channel_tensors(preset, mode):
    out = build_transform(preset, 48)(_textured(mode=mode))
    assert out.dtype == torch.float32
    assert tuple(out.shape) == (3, 48, 48)
    assert torch.isfinite(out).all()


def test_grayscale_is_repeated_to_three_equal_channels():
    out = build_transform("cxr", 32, normalize="none")(_textured())
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_normalization_imagenet_none_and_custom():
    flat = Image.new("L", (40, 40), 128)
    value = 128 / 255
    raw = build_transform("eval", 32, normalize="none")(flat)
    assert torch.allclose(raw, torch.full_like(raw, value))
    imagenet = build_transform("eval", 32)(flat)
    for channel, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)):
        assert torch.allclose(imagenet[channel], torch.full((32, 32), (value - mean) / std), atol=1e-5)
    custom = build_transform("eval", 32, normalize=(0.5, 0.25))(flat)
    assert torch.allclose(custom, torch.full_like(custom, (value - 0.5) / 0.25), atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_numpy_tensor_step_equals_torchvision_chain(mode):
    image = _textured(width=37, height=29, mode=mode)
    reference = v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )(image)
    ours = ToNormalizedTensor(IMAGENET_MEAN, IMAGENET_STD)(image)
    assert ours.shape == reference.shape == (3, 29, 37) and ours.is_contiguous()
    assert torch.allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("normalize", ["imagenett", (0.5,), ((0.5, 0.5), 0.2), (0.5, 0.0), ("a", 1)])
def test_bad_normalize_is_a_config_error(normalize):
    with pytest.raises(ConfigError, match="normalize"):
        build_transform("eval", 32, normalize=normalize)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        build_transform("simclr", 224)
    for name in PRESETS:
        assert name in str(err.value)


def test_cxr_rotation_is_the_papers_ten_degrees():
    rotations = [t for t in build_transform("cxr", 224).transforms if isinstance(t, v2.RandomRotation)]
    assert len(rotations) == 1 and list(rotations[0].degrees) == [-10.0, 10.0]


def test_cxr_rotates_a_marker_by_at_most_ten_degrees():
    torch.manual_seed(0)
    transform = build_transform("cxr", 96, normalize="none")
    assert abs(_orientation_degrees(build_transform("eval", 96, normalize="none")(_bar())[0])) < 0.5
    angles = [abs(_orientation_degrees(transform(_bar())[0])) for _ in range(40)]
    assert max(angles) <= 10.5
    assert max(angles) > 5  # it does rotate, over most of the range


def test_cxr_flips_sometimes():
    torch.manual_seed(1)
    pixels = np.zeros((64, 64), dtype=np.uint8)
    pixels[:, :24] = 255  # bright left side; a 10 degree rotation cannot move it to the right
    transform = build_transform("cxr", 64, normalize="none")
    left_brighter = []
    for _ in range(40):
        out = transform(Image.fromarray(pixels))[0]
        left_brighter.append(bool(out[:, :32].mean() > out[:, 32:].mean()))
    assert 5 < sum(left_brighter) < 35


def test_eval_is_deterministic():
    image = _textured()
    transform = build_transform("eval", 40)
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(123)
    assert torch.equal(first, transform(image))


def test_eval_resize_matches_a_plain_square_resize():
    image = _textured(width=90, height=60)
    out = build_transform("eval", 30, normalize="none")(image)[0]
    expected = np.asarray(image.resize((30, 30), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    assert np.abs(out.numpy() - expected).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("preset", ["cxr", "mocov2"])
def test_two_crops_gives_two_different_views_of_one_image(preset):
    torch.manual_seed(0)
    views = TwoCrops(build_transform(preset, 48))(_textured())
    assert isinstance(views, list) and len(views) == 2
    q, k = views
    assert q.shape == k.shape == (3, 48, 48)
    assert not torch.equal(q, k)


def test_augmentations_follow_the_torch_seed():
    transform = build_transform("mocov2", 32)
    torch.manual_seed(7)
    first = transform(_textured(mode="RGB"))
    torch.manual_seed(7)
    assert torch.equal(first, transform(_textured(mode="RGB")))
