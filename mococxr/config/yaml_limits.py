"""Reading a YAML file that cannot hurt: every config, study, grid and plan spec is read by :func:`load_yaml`.

PyYAML's safe loader makes no objects from tags, but it follows aliases: nine anchors of nine aliases each
(a "billion laughs") are a few hundred bytes that stand for 9**9 values. The loaded data shares the
repeated lists, so loading is cheap, but the first ``str()``, ``json.dumps`` or loop over it expands them
all and the process grows until the kernel kills it, with no error. :class:`BoundedLoader` counts nodes as
the document is composed, an alias counting as every node of what it names, and stops at
:data:`MAX_NODES`, far above any real spec (the paper's plan has 246 nodes). Aliases themselves stay
allowed: an anchor shared by two stages is a fair use. The loader also refuses what would be refused late
or never: a recursive alias, nesting deeper than :data:`MAX_DEPTH`, and a key given twice in one mapping
(YAML keeps the last silently). A file over :data:`MAX_BYTES` is refused before it is parsed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mococxr.errors import ConfigError

MAX_BYTES = 1_000_000
MAX_NODES = 20_000  # 80x the largest shipped spec (sweeps/paper.yaml: 246); refused in ~1 s
MAX_DEPTH = 64
_MERGE = "tag:yaml.org,2002:merge"


class _Refused(Exception):
    """A document the loader will not build, with the place (a PyYAML mark) where it gave up."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem)
        self.problem, self.line = problem, (mark.line + 1 if mark is not None else None)


class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a document standing for more than ``max_nodes`` nodes once its
    aliases are expanded, recursive aliases, nesting deeper than ``max_depth`` and repeated keys."""

    max_nodes = MAX_NODES
    max_depth = MAX_DEPTH

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0
        self._sizes: dict[str, int] = {}  # anchor -> the nodes it stands for, its own aliases expanded
        self._open: set[str] = set()  # anchors whose node is being composed

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise _Refused(
                    f"alias *{event.anchor} is inside the node it names (a recursive alias)", event.start_mark
                )
            self._count(self._sizes.get(event.anchor, 0), event)  # an undefined one: PyYAML's own error
            return super().compose_node(parent, index)
        if self._depth >= self.max_depth:
            raise _Refused(f"nested more than {self.max_depth} levels deep", event.start_mark)
        before, anchor = self._nodes, event.anchor
        self._count(1, event)
        self._depth += 1
        if anchor is not None:
            self._open.add(anchor)
        node = super().compose_node(parent, index)
        self._depth -= 1
        if anchor is not None:
            self._open.discard(anchor)
            self._sizes[anchor] = self._nodes - before
        if isinstance(node, yaml.MappingNode):
            _check_unique_keys(node)
        return node

    def _count(self, n: int, event: Any) -> None:
        self._nodes += n
        if self._nodes > self.max_nodes:
            at = f" (reached at alias *{event.anchor})" if isinstance(event, yaml.AliasEvent) else ""
            raise _Refused(
                f"it stands for more than {self.max_nodes:,} values once its aliases are expanded{at}; "
                "a spec holds a few hundred, so this looks like an alias bomb",
                event.start_mark,
            )


def _check_unique_keys(node: yaml.MappingNode) -> None:
    seen: dict[tuple[str, str], int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE:
            continue
        if (key.tag, key.value) in seen:
            raise _Refused(
                f"key {key.value!r} is given twice in one mapping (first on line "
                f"{seen[key.tag, key.value]}); YAML would keep only the last",
                key.start_mark,
            )
        seen[key.tag, key.value] = key.start_mark.line + 1


def parse_yaml(text: str | bytes, source: str = "<yaml>") -> Any:
    """The data of one YAML document, read by :class:`BoundedLoader`; any problem is one ``ConfigError``
    that names ``source`` (and the line, where there is one)."""
    loader = BoundedLoader(text)
    loader.name = source  # PyYAML's messages say where: "in t.yaml, line 3, column 5"
    try:
        return loader.get_single_data()
    except _Refused as exc:
        line = f" line {exc.line}:" if exc.line else ""
        raise ConfigError(f"{source}:{line} refused: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. a 5,000-digit integer, 2024-13-01
        raise ConfigError(f"{source}: not valid YAML ({type(exc).__name__}: {exc})") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a clear error for a missing, oversized or malformed file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    if not p.is_file():
        raise ConfigError(f"config file {p} is not a regular file")
    with p.open("rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        size = max(p.stat().st_size, len(data))
        raise ConfigError(
            f"{p}: refused: {size:,} bytes; a spec or config file is at most {MAX_BYTES:,} bytes "
            "(the paper's plan is about 6 kB)"
        )
    loaded = parse_yaml(data, str(p))
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return loaded


__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "BoundedLoader", "load_yaml", "parse_yaml"]
