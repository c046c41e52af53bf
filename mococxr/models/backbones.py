"""Image encoders behind one small factory: ``build_encoder(name, init=...)``.

An :class:`Encoder` wraps a torchvision model with its classifier replaced by ``nn.Identity``, so
``forward`` returns the global-pooled features ``[B, feature_dim]`` and the state dict keys stay the
torchvision ones under ``trunk.`` (``trunk.conv1.weight``). Keeping torchvision's own module tree
means ImageNet files, FAIR MoCo checkpoints and our checkpoints all load by renaming keys only.

Three initialisations:

- ``"random"``: torchvision's default init; seed it with ``torch.manual_seed`` before the call.
- ``"imagenet"``: torchvision's ImageNet weights from a *local* file, never downloaded, so runs behave
  the same on machines without internet. The file is looked up in this order: ``weights_path``; the
  environment variable ``MOCOCXR_IMAGENET_WEIGHTS`` (a file, or a folder holding the torchvision file
  name); the torch hub cache ``torch.hub.get_dir()/checkpoints/<file name>`` where torchvision itself
  would have saved it.
- ``"checkpoint"``: a state dict the caller already loaded (models/ knows nothing of MLflow; the caller
  resolves ``models:/`` and ``runs:/`` URIs). See :func:`encoder_state_dict` for the layouts accepted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torchvision.models as tvm

from mococxr.errors import ConfigError, DataError

IMAGENET_ENV = "MOCOCXR_IMAGENET_WEIGHTS"
INITS = ("random", "imagenet", "checkpoint")

# name -> (torchvision builder, ImageNet weights, name of the classifier attribute). IMAGENET1K_V1 is
# what torchvision's old ``pretrained=True`` gave, i.e. what MoCo-CXR and most CXR papers started from.
_ARCHS = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, "fc"),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, "fc"),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1, "fc"),
    "densenet121": (tvm.densenet121, tvm.DenseNet121_Weights.IMAGENET1K_V1, "classifier"),
}
BACKBONES = tuple(_ARCHS)

# Files written before torchvision 0.3 (the ImageNet DenseNet files among them) name the dense layers'
# modules "norm.1", "conv.2"; torchvision renames them the same way in densenet._load_state_dict.
_DENSENET_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
# Wrappers that only add a prefix: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# The module path up to the first module named "trunk" (the Encoder's), e.g. "encoder." or "".
_TRUNK_KEY = re.compile(r"^((?:[^.]+\.)*?)trunk\.")
# Keys of a full training-state file that hold the model's state dict, tried in this order.
NESTED_STATE_KEYS = ("model", "state_dict")


class Encoder(nn.Module):
    """A torchvision trunk without its classifier: images ``[B, 3, H, W]`` -> features ``[B, feature_dim]``.

    Attributes: ``name`` (the factory name), ``feature_dim`` (512 for resnet18/34, 2048 for resnet50,
    1024 for densenet121) and ``trunk`` (the torchvision model, classifier set to ``nn.Identity``).
    """

    def __init__(self, name: str, trunk: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.name = name
        self.feature_dim = feature_dim
        self.trunk = trunk

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled features (after DenseNet's final BN and ReLU), shape ``[B, feature_dim]``."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _check_name(name: str) -> None:
    if name not in _ARCHS:
        raise ConfigError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")


def imagenet_weights_filename(name: str) -> str:
    """The file name torchvision gives the ImageNet weights of ``name``, e.g. ``resnet18-f37072fd.pth``."""
    _check_name(name)
    return Path(_ARCHS[name][1].url).name


def imagenet_candidates(name: str, weights_path: str | os.PathLike | None = None) -> list[Path]:
    """Where the ImageNet file of ``name`` is looked for, in order (see the module docstring)."""
    filename = imagenet_weights_filename(name)
    if weights_path is not None:
        return [Path(weights_path).expanduser()]
    paths = []
    env = os.environ.get(IMAGENET_ENV)
    if env:
        env_path = Path(env).expanduser()
        paths.append(env_path / filename if env_path.is_dir() else env_path)
    paths.append(Path(torch.hub.get_dir()) / "checkpoints" / filename)
    return paths


def available_imagenet_weights(name: str, weights_path: str | os.PathLike | None = None) -> Path | None:
    """The local ImageNet weights file that ``build_encoder(name, init="imagenet")`` would load, or None."""
    return next((p for p in imagenet_candidates(name, weights_path) if p.is_file()), None)


def load_state_dict_file(
    path: str | os.PathLike, *, what: str = "state dict file", nested: bool = True
) -> dict[str, Any]:
    """Load a file saved with ``torch.save`` on the CPU, without unpickling arbitrary objects.

    The one loader of checkpoint files: ImageNet weights, ``models:/``/``runs:/`` downloads and resume
    points all come through here, so every bad file fails the same way, with a :class:`DataError`
    naming ``what`` and the path. With ``nested`` (the default) a full training-state file
    (``{"model": state_dict, "optimizer": ..., "epoch": ...}``, or FAIR's ``{"state_dict": ..., "arch":
    ...}``) is accepted too and the state dict nested under the first of ``NESTED_STATE_KEYS`` present
    is returned; without it the whole mapping is returned (a resume point).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{what} not found: {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or pickled objects: refuse rather than unpickle
        where = what if str(path) in what else f"{what} ({path})"
        raise DataError(
            f"{where} is not a usable checkpoint: {_load_problem(path, e)}; expected a file "
            "written by torch.save(model.state_dict())"
        ) from None
    if not isinstance(obj, Mapping):
        raise DataError(
            f"{what} {path} holds a {type(obj).__name__}, expected a state dict (a dict of tensors)"
        )
    if not nested or (obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        return dict(obj)
    for key in NESTED_STATE_KEYS:
        if isinstance(obj.get(key), Mapping):
            return dict(obj[key])
    raise DataError(
        f"{what} {path} is neither a state dict nor a training-state file with one of the keys "
        f"{', '.join(NESTED_STATE_KEYS)}; its top-level keys are {sorted(map(str, obj))[:10]}"
    )


def _load_problem(path: Path, error: Exception) -> str:
    """Why ``torch.load`` refused a file, in one line (not PyTorch's advice to unpickle it anyway)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or a legacy pickle
        kind = next((k for magic, k in _OTHER_FORMATS if head.startswith(magic)), "")
        return f"it is not a PyTorch file{f' (it is {kind})' if kind else ''}"
    if "Weights only load failed" in str(error) or "WeightsUnpickler" in str(error):
        return (
            "it holds pickled Python objects, which are never unpickled from a file (only tensors are read)"
        )
    return f"it is corrupt or truncated ({type(error).__name__}: {str(error).splitlines()[0][:200]})"


_OTHER_FORMATS = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"%PDF", "a PDF"),
    (b"\x89HDF", "an HDF5 file, e.g. Keras weights"),
)


def _strip_wrappers(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def encoder_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reduce any supported state dict to bare torchvision trunk keys (``conv1.weight``), classifier dropped.

    Accepted layouts, after dropping ``module.``/``_orig_mod.`` wrapper prefixes:
    a MoCo state dict (``encoder_q.trunk.*``, or FAIR's ``encoder_q.conv1.*``: only ``encoder_q`` is
    kept, the key encoder, heads and queue are ignored); any model holding one :class:`Encoder`
    (``trunk.*``, ``encoder.trunk.*``: the part before ``trunk.`` is stripped); a bare torchvision
    state dict (``conv1.weight``). ``fc.*``/``classifier.*`` (ImageNet classifier, FAIR's MoCo head)
    are dropped and old DenseNet key names are renamed.
    """
    sd = {_strip_wrappers(k): v for k, v in state_dict.items()}
    if any(k.startswith("encoder_q.") for k in sd):
        sd = {k.removeprefix("encoder_q."): v for k, v in sd.items() if k.startswith("encoder_q.")}
    prefixes = {m.group(1) for k in sd if (m := _TRUNK_KEY.match(k))}
    if len(prefixes) > 1:
        raise ConfigError(
            f"state dict holds several encoders ({', '.join(sorted(p + 'trunk.' for p in prefixes))}); "
            "pass the state dict of one model"
        )
    if prefixes:
        start = prefixes.pop() + "trunk."
        sd = {k.removeprefix(start): v for k, v in sd.items() if k.startswith(start)}
    sd = {k: v for k, v in sd.items() if not k.startswith(("fc.", "classifier."))}
    return {
        (m.group(1) + m.group(2) if (m := _DENSENET_LEGACY_KEY.match(k)) else k): v for k, v in sd.items()
    }


def _load_trunk(encoder: Encoder, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load into ``encoder.trunk``, failing with a ConfigError on missing/unexpected keys or shapes."""
    sd = encoder_state_dict(state_dict)
    try:
        result = encoder.trunk.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise ConfigError(f"{source} does not fit backbone {encoder.name}: {e}") from e
    # num_batches_tracked is absent from files older than torch 0.4.1; BatchNorm fills it in itself.
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"{source} does not fit backbone {encoder.name}: {len(missing)} missing keys "
            f"(e.g. {missing[:5]}), {len(result.unexpected_keys)} unexpected keys "
            f"(e.g. {result.unexpected_keys[:5]}). Is it a checkpoint of a different backbone?"
        )


def require_imagenet_weights(name: str, weights_path: str | os.PathLike | None = None) -> Path:
    """The local ImageNet weights file of ``name``; when there is none, the one clear error that names the
    file and where it goes (a plan checks this before it starts anything)."""
    path = available_imagenet_weights(name, weights_path)
    if path is None:
        looked = "\n  ".join(str(p) for p in imagenet_candidates(name, weights_path))
        raise ConfigError(
            f"ImageNet weights for {name} not found; looked at:\n  {looked}\n"
            f"Expected the torchvision file {imagenet_weights_filename(name)}. Weights are never downloaded "
            f"at run time: on a machine with internet download {_ARCHS[name][1].url} and copy it to one of "
            f"the paths above (or set {IMAGENET_ENV} to the file or its folder)."
        )
    return path


def build_encoder(
    name: str,
    *,
    init: str = "random",
    state_dict: Mapping[str, torch.Tensor] | None = None,
    weights_path: str | os.PathLike | None = None,
) -> Encoder:
    """Build backbone ``name`` (one of ``BACKBONES``) initialised from ``init`` (one of ``INITS``).

    ``state_dict`` is required for, and only used by, ``init="checkpoint"``; ``weights_path`` overrides
    where ``init="imagenet"`` looks for the ImageNet file.
    """
    _check_name(name)
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
    if (state_dict is not None) != (init == "checkpoint"):
        raise ConfigError(f"init={init!r}: pass state_dict exactly when init='checkpoint'")
    builder, _, head = _ARCHS[name]
    trunk = builder(weights=None)
    feature_dim = getattr(trunk, head).in_features
    setattr(trunk, head, nn.Identity())
    encoder = Encoder(name, trunk, feature_dim)
    if init == "imagenet":
        path = require_imagenet_weights(name, weights_path)
        _load_trunk(
            encoder, load_state_dict_file(path, what="ImageNet weights file"), f"ImageNet weights file {path}"
        )
    elif init == "checkpoint":
        _load_trunk(encoder, state_dict, "checkpoint state dict")
    return encoder
