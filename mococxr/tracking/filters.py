"""Every MLflow search filter the project sends is built here, so a name holding a quote, a backslash or
any unicode is matched as itself and never breaks (or changes) the filter it is put in.

MLflow's filter parser (sqlparse underneath) knows no escapes inside a string literal: ``'a\\b'`` is the
three characters ``a\\b``, and a single quote cannot appear inside ``'...'`` in any spelling (``''`` and
``\\'`` both match nothing). A value with a single quote is therefore written in double quotes, and a
value holding both kinds cannot be searched at all: :func:`literal` refuses it with an error that names
it, and :func:`mococxr.tracking.mlflow.check_experiment_name` refuses such a name before anything is
logged under it. Measured on MLflow's sqlite store for ``a'b``, ``a"b``, ``a\\b``, ``a\\``, ``é✓ü``:
each literal below matches exactly its own run (tests/test_tracking.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mococxr.errors import TrackingError


def literal(value: Any) -> str:
    """``value`` as a string literal of an MLflow search filter: ``'it'``, or ``"it's"`` when it holds a
    single quote."""
    text = str(value)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise TrackingError(
        f"{text!r} holds both a single and a double quote, which an MLflow search filter cannot express; "
        "rename it"
    )


def searchable(value: Any) -> bool:
    """Whether ``value`` can be put in a filter (it does not hold both quote kinds)."""
    text = str(value)
    return not ("'" in text and '"' in text)


def equal(field: str, value: Any) -> str:
    """``field = 'value'``: ``field`` is a filter key as MLflow spells it (``name``, ``run_id``,
    ``source_run_id``, ``attributes.status``, ``params.x``); use :func:`tag` for tags."""
    return f"{field} = {literal(value)}"


def tag(key: str, value: Any) -> str:
    """``tags.`key` = 'value'`` (back-quoted, since project tags hold dots: ``mococxr.kind``)."""
    if "`" in key:
        raise TrackingError(f"tag key {key!r} holds a back-quote, which a search filter cannot express")
    return f"tags.`{key}` = {literal(value)}"


def tags(pairs: Mapping[str, Any]) -> str:
    """Every ``pairs`` key = value, joined by AND (``None`` values are left out)."""
    return both(*(tag(k, v) for k, v in pairs.items() if v is not None))


def one_of(field: str, values: Iterable[Any]) -> str:
    """``field IN ('a', 'b')``."""
    return f"{field} IN ({', '.join(literal(v) for v in values)})"


def status(state: str) -> str:
    """``attributes.status = 'FINISHED'`` (or RUNNING, FAILED, KILLED)."""
    return equal("attributes.status", state)


def ended() -> str:
    """Runs that have an end time (ended at least once; a reopened parent keeps its last one)."""
    return "attributes.end_time > 0"


def both(*clauses: str) -> str:
    """The clauses joined by AND; empty ones are left out."""
    return " AND ".join(c for c in clauses if c)


__all__ = ["both", "ended", "equal", "literal", "one_of", "searchable", "status", "tag", "tags"]
