"""What study, grid and plan specs share: key checks, names, counts, per-fraction counts, the heartbeat,
storage URLs. Each check names the file and the dotted key (``p.yaml: stages.chexpert.draws.0.1``) and
says what was expected, so a spec is refused when it is read, before any run or study exists."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mococxr.config import Validated, coerce, opt
from mococxr.errors import ConfigError
from mococxr.tracking.filters import searchable


@dataclass(frozen=True)
class Heartbeat(Validated):
    """How a dead worker is noticed: its RUNNING trial stops beating and is retried after the grace period."""

    interval: int = opt(10, "seconds between a running trial's heartbeats", check="positive")
    grace_period: int | None = opt(
        None, "silent seconds before a trial is FAIL (3 x interval)", check="positive"
    )
    max_retry: int = opt(2, "times a dead worker's trial is queued again", check="nonnegative")

    def validate(self) -> None:
        if self.grace_period is not None and self.grace_period <= self.interval:
            raise ConfigError(f"grace_period={self.grace_period} must exceed interval={self.interval}")

    @property
    def grace(self) -> int:
        return self.grace_period if self.grace_period is not None else 3 * self.interval


def mask_password(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``, for logs and params."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


# -- names and counts ------------------------------------------------------------------------------------
NAME_MAX = 250  # MLflow's longest run name and key; a plan adds a stage and a backbone to its name
STORAGE_SCHEMES = ("sqlite:", "postgresql", "mysql")  # the RDB storages sweep/storage.py opens


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters for a one-line error."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def text(value: Any, where: str, *, what: str = "a name") -> str:
    """A name or other one-line text given in a spec: a YAML string (or number), not blank, at most
    :data:`NAME_MAX` characters, with no control character (a newline would split logs and filters)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{where}={shown(value)}: expected {what} (text), got a {type(value).__name__}")
    name = str(value)
    problem = (
        "it is empty"
        if not name.strip()
        else f"it is longer than {NAME_MAX} characters"
        if len(name) > NAME_MAX
        else "it holds a control character (a newline?)"
        if any(ord(c) < 32 or ord(c) == 127 for c in name)
        else None
    )
    if problem:
        raise ConfigError(f"{where}={shown(value)}: expected {what}, but {problem}")
    return name


def study_name(value: Any, where: str, *, what: str = "a name") -> str:
    """A name a user chooses for a plan, study, grid or registered model: experiments, Optuna studies,
    registered models, run names and report folders are named after it. Quotes of one kind, backslashes,
    spaces and unicode are fine (tracking/filters.py quotes them in every search); refused is what no
    store can hold or find: both quote kinds together (no MLflow filter can match it), '/' and ':' (a
    registered model's name cannot hold them; '/' would also make a folder a path), a leading '.' (a
    path component, or a hidden folder), control characters, blank or over-long names."""
    name = text(value, where, what=what)
    problem = (
        "it holds both a single and a double quote, which no MLflow search filter can match"
        if not searchable(name)
        else "it holds '/' or ':', which a registered model's name and a folder's cannot"
        if "/" in name or ":" in name
        else "it starts with '.', so it would be a path component or a hidden folder"
        if name.startswith(".")
        else None
    )
    if problem:
        raise ConfigError(f"{where}={shown(value)}: refused: {problem}")
    return name


def experiment_name(value: Any, where: str) -> str:
    """An MLflow experiment name, checked as :func:`mococxr.tracking.mlflow.ensure_experiment` would."""
    from mococxr.tracking.mlflow import check_experiment_name

    name = text(value, where, what="an experiment name")
    try:
        return check_experiment_name(name)
    except ConfigError as exc:
        why = str(exc).partition("is refused: ")[2] or str(exc)
        raise ConfigError(f"{where}={shown(value)}: refused: {why}") from None


def model_name(value: Any, where: str) -> str:
    """A registered model's name (MLflow's own rules and the project's, as :func:`study_name`)."""
    return study_name(value, where, what="a registered model name")


def storage_url(value: Any, where: str) -> str:
    """An Optuna RDB storage URL (the scheme only: the database is opened when the work starts)."""
    try:
        url = text(value, where, what="a storage URL")
    except ConfigError as exc:  # the message quotes the URL: its password is masked there too
        raise ConfigError(mask_password(str(exc))) from None
    if not url.startswith(STORAGE_SCHEMES):
        raise ConfigError(
            f"{where}={mask_password(url)!r}: use sqlite:///PATH for one machine or "
            "postgresql://USER:PASSWORD@HOST/DB for several"
        )
    return url


def count(value: Any, where: str, *, high: int | None = None) -> int:
    """An integer >= 1 (and <= ``high``): draws, epochs, replicates."""
    n = coerce(value, int, where)
    if n < 1 or (high is not None and n > high):
        limit = f"from 1 to {high:,}" if high is not None else "of at least 1"
        raise ConfigError(f"{where}={shown(value)}: expected an integer {limit}")
    return n


def refuse_keys(data: Mapping[str, Any], keys: tuple[str, ...], where: str, why: str) -> None:
    """Known config keys that a spec sets itself (per cell, per backbone): given here, they would be
    overwritten without a word. A dotted key (``data.root``) counts as its first part."""
    given = [str(k) for k in data if str(k).split(".")[0] in keys]
    if given:
        raise ConfigError(f"{where}: {', '.join(given)} may not be set here: {why}")


def _check_keys(
    data: Mapping[str, Any], known: set[str] | frozenset[str], required: tuple, where: str
) -> None:
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(sorted(known))}"
        )
    for key in required:
        if key not in data:
            raise ConfigError(f"{where}: missing required key `{key}`")


def _mapping(data: Mapping[str, Any], key: str, source: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key_of(source, key)}={shown(value)}: expected a mapping")
    return dict(value)


def key_of(where: str | Path, key: str) -> str:
    """Where ``key`` of ``where`` is: ``g.yaml: fractions`` in a file, ``p.yaml: stages.chexpert.fractions``
    in a key of one."""
    return f"{where}.{key}" if ": " in str(where) else f"{where}: {key}"


def _fractions(raw: Any, where: str | Path) -> list[float]:
    """The ``fractions`` of ``where`` (a file or a key in one): fractions in (0, 1], each once, sorted."""
    at = key_of(where, "fractions")
    if not isinstance(raw, list):
        raise ConfigError(f"{at}={shown(raw)}: expected a list of label fractions in (0, 1]")
    fractions = sorted(coerce(f, float, at) for f in raw)
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ConfigError(f"{at}={shown(raw)}: expected label fractions in (0, 1]")
    if len(set(fractions)) < len(fractions):
        raise ConfigError(f"{at}={shown(raw)}: a fraction is listed twice")
    return fractions


def _per_fraction(raw: Any, fractions: list[float], where: str, *, complete: bool) -> dict[float, int]:
    """One count for every fraction, or a mapping fraction -> count (``complete``: every fraction named);
    every count >= 1, every key one of ``fractions``."""
    if not isinstance(raw, Mapping):
        return dict.fromkeys(fractions, count(raw, where))
    out = {}
    for key, value in raw.items():
        fraction = coerce(key, float, f"{where}.{key}")
        if fraction not in fractions:
            raise ConfigError(f"{where}.{key}: {key} is not one of the fractions {fractions}")
        out[fraction] = count(value, f"{where}.{key}")
    missing = [f for f in fractions if f not in out]
    if complete and missing:
        raise ConfigError(f"{where} gives no count for fraction(s) {missing}")
    return out


__all__ = [
    "NAME_MAX",
    "STORAGE_SCHEMES",
    "Heartbeat",
    "count",
    "key_of",
    "experiment_name",
    "mask_password",
    "model_name",
    "refuse_keys",
    "shown",
    "storage_url",
    "study_name",
    "text",
]
