"""The CLI, generated from the config fields: one ``--flag`` per field, spelled once in the config."""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Literal, TypeVar

from mococxr.config.schema import _hints, _options, build, load_yaml
from mococxr.errors import ConfigError

T = TypeVar("T")


def flag_fields(cls: type, only: tuple[str, ...] | None = None) -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, annotation) of every field that has a flag; nested configs flattened.

    ``only`` selects keys: ``"data.*"`` for every field of ``data``, or exact dotted keys.
    """
    out = []
    hints = _hints(cls)
    for f in fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += [(f"{f.name}.{key}", sub, h) for key, sub, h in flag_fields(hint)]
        elif f.metadata.get("flag", True):
            out.append((f.name, f, hint))
    if only is not None:
        out = [row for row in out if row[0] in only or f"{row[0].split('.')[0]}.*" in only]
    return out


def flag_name(key: str) -> str:
    """The CLI flag of a dotted config key: ``data.split_seed`` -> ``--split-seed``."""
    return "--" + key.rsplit(".", 1)[-1].replace("_", "-")


def add_flags(
    parser: Any, cls: type, only: tuple[str, ...] | None = None, *, show_defaults: bool = True
) -> None:
    """One ``--flag`` per config field (``data.root`` -> ``--root``), help and choices from the field.

    ``show_defaults=False`` where the defaults come from elsewhere (a grid's base)."""
    import argparse

    for key, f, hint in flag_fields(cls, only):
        base, _ = _options(hint)
        flag = flag_name(key)
        kwargs: dict[str, Any] = {"dest": key, "default": None}
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is Literal:
            kwargs["choices"] = typing.get_args(base)
        else:
            kwargs["metavar"] = {int: "N", float: "X"}.get(base, key.rsplit(".", 1)[-1].upper())
        parser.add_argument(
            flag,
            help=f"{help_text} (default: {default})" if default is not None and show_defaults else help_text,
            **kwargs,
        )


def from_flags(
    cls: type[T], args: Any, *, yaml_path: str | None = None, only: tuple[str, ...] | None = None
) -> T:
    """The config the command line asks for: the YAML (if any), then every flag that was given."""
    flags: dict[str, Any] = {}
    for key, _, _ in flag_fields(cls, only):
        if (value := getattr(args, key, None)) is not None:
            *path, leaf = key.split(".")
            node = flags
            for p in path:
                node = node.setdefault(p, {})
            node[leaf] = value
    data = _merge(load_yaml(yaml_path), flags) if yaml_path else flags
    try:
        return build(cls, data, where=yaml_path or "flags")
    except (
        ConfigError
    ) as exc:  # name a flag's value as the user typed it: --batch-size=0, not flags.batch_size
        raise ConfigError(
            re.sub(r"^flags\.((?:\w+\.)*\w+)=", lambda m: flag_name(m.group(1)) + "=", str(exc))
        ) from None


def _merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out
