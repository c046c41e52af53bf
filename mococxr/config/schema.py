"""How a config is made and checked: fields with type, default, help and range; one ``build`` for
CLI flags, YAML, a study's or a grid's base alike; ``to_dict``/``flat_params`` for what runs log and
``config_hash`` for what makes grid cells idempotent. The configs themselves are in ``mococxr.config``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import field, fields
from typing import Any, Literal, TypeVar

from mococxr.config.yaml_limits import load_yaml as load_yaml  # every YAML is read there
from mococxr.errors import ConfigError

T = TypeVar("T")


def opt(
    default: Any,
    help: str,
    *,
    check: str | None = None,
    flag: bool = True,
    hash_default: bool = True,
    hash: bool = True,
) -> Any:
    """A config field: its default, the help text its CLI flag shows, and a range ``check``.

    ``check`` is one of ``positive``, ``nonnegative``, ``fraction`` (0 <= x < 1), ``label_fraction``
    (0 < x <= 1), ``keep``. ``flag=False`` keeps a field out of the CLI; ``hash_default=False`` keeps it
    out of :func:`config_hash` while it holds its default (a field added after configs were hashed);
    ``hash=False`` keeps it out always (a switch that changes how a result is computed, not what it is).
    """
    meta = {"help": help, "check": check, "flag": flag, "hash_default": hash_default, "hash": hash}
    if isinstance(default, (list, dict)):
        raise TypeError("mutable defaults are not allowed in a frozen config")
    return field(default=default, metadata=meta)


_KEEP = re.compile(r"^(all|every:[1-9]\d*|best:[1-9]\d*:\S+)$")


def parse_keep(keep: str) -> tuple[str, int, str | None]:
    """``all`` | ``every:K`` | ``best:K:metric`` -> (mode, k, metric)."""
    if not isinstance(keep, str) or not _KEEP.match(keep):
        raise ConfigError(
            f"keep={keep!r}: use all, every:K (e.g. every:5) or best:K:metric (e.g. best:3:val/auc)"
        )
    parts = keep.split(":", 2)
    if parts[0] == "all":
        return "all", 0, None
    return parts[0], int(parts[1]), (parts[2] if len(parts) == 3 else None)


def _check_range(name: str, value: Any, check: str | None) -> str | None:
    if value is None or check is None:
        return None
    if check == "positive" and not value > 0:
        return "expected a positive number"
    if check == "nonnegative" and not value >= 0:
        return "expected a number >= 0"
    if check == "fraction" and not 0 <= value < 1:
        return "expected a fraction in [0, 1)"
    if check == "label_fraction" and not 0 < value <= 1:
        return "expected a label fraction in (0, 1]"
    if check == "keep":
        try:
            parse_keep(value)
        except ConfigError as exc:
            return str(exc).split(": ", 1)[1]
    return None


class Validated:
    """Checks every field against its annotation and range when an instance is made (or replaced)."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            problem = _type_problem(value, hints[f.name]) or _check_range(
                f.name, value, f.metadata.get("check")
            )
            if problem:
                raise ConfigError(f"{f.name}={value!r}: {problem}")
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses override."""


# -- building ---------------------------------------------------------------------------------------------
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _options(hint: Any) -> tuple[Any, bool]:
    """(the non-None type of an annotation, whether None is allowed)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def _type_problem(value: Any, hint: Any) -> str | None:
    base, optional = _options(hint)
    if value is None:
        return None if optional else "may not be empty"
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        return None if value in choices else f"expected one of {', '.join(map(str, choices))}"
    if dataclasses.is_dataclass(base):
        return None if isinstance(value, base) else "expected a mapping"
    if base is bool:
        return None if isinstance(value, bool) else "expected true or false"
    if base is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "expected an integer"
    if base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "expected a finite number"
    if typing.get_origin(base) is tuple:
        return None if isinstance(value, tuple) else "expected a list"
    return None if isinstance(value, str) else "expected text"


def coerce(value: Any, hint: Any, where: str) -> Any:
    """A YAML/CLI value as a field's type (``"1e-3"`` -> 1e-3, ``"true"`` -> True, ``"0.6,0.8"`` -> tuple)."""
    base, optional = _options(hint)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        return None
    try:
        if typing.get_origin(base) is Literal:
            choices = typing.get_args(base)
            if str(value) not in choices:
                raise ConfigError(f"{where}={value!r}: expected one of {', '.join(choices)}")
            return str(value)
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return text in ("true", "1", "yes")
        if base is int:
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if not math.isfinite(number) or number != int(number):
                raise ValueError(value)
            return int(number)
        if base is float:
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number
        if typing.get_origin(base) is tuple:
            items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
            return tuple(float(v) for v in items)
        if isinstance(value, (dict, list)):
            raise ValueError(value)
        return str(value)
    except (TypeError, ValueError):
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(
            base, "a list of numbers" if typing.get_origin(base) is tuple else "text"
        )
        raise ConfigError(f"{where}={value!r}: expected {kind}") from None


def build(cls: type[T], data: Mapping[str, Any] | None = None, *, where: str = "config") -> T:
    """Make config ``cls`` from a (nested) mapping: unknown keys, wrong types and bad values are one
    ``ConfigError`` naming the key (``where.key``). The one way every config is made."""
    data = dict(data or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
        )
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if isinstance(value, hint):
                kwargs[name] = value
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}.{name}: expected a mapping, got {value!r}")
            kwargs[name] = build(hint, value, where=f"{where}.{name}")
        else:
            kwargs[name] = coerce(value, hint, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc}" if "=" in str(exc).split(":")[0] else f"{where}: {exc}") from None


def override(cfg: T, dotted: Mapping[str, Any], *, where: str = "config") -> T:
    """A copy of ``cfg`` with ``{"lr": "1e-3", "data.root": "x"}`` applied (``None`` values skipped),
    validated."""
    data = to_dict(cfg)
    for key, value in dotted.items():
        if value is None:
            continue
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"{where}: unknown config key {key!r}")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"{where}: unknown config key {key!r}")
        node[parts[-1]] = value
    return build(type(cfg), data, where=where)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON-able data (nested dataclasses become dicts, tuples lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def flat_params(cfg: Any) -> dict[str, str]:
    """``{"data.root": ..., "lr": ...}``: what runs log as MLflow parameters."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = str(value)

    walk("", to_dict(cfg))
    return out


def config_hash(cfg: Any) -> str:
    """sha256 of the canonical JSON of a config (key order, formatting, unhashed defaults do not matter)."""
    return hashlib.sha256(json.dumps(_hashed(cfg, to_dict(cfg)), sort_keys=True).encode()).hexdigest()


def _hashed(cfg: Any, data: dict[str, Any]) -> dict[str, Any]:
    """``to_dict(cfg)`` less the ``hash=False`` fields and the ``hash_default=False`` fields at their default
    (hashed as before they existed)."""
    for f in fields(cfg):
        if dataclasses.is_dataclass(value := getattr(cfg, f.name)):
            _hashed(value, data[f.name])
        elif not f.metadata.get("hash", True) or (
            not f.metadata.get("hash_default", True) and value == f.default
        ):
            del data[f.name]
    return data
