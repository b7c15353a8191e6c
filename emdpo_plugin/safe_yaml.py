"""YAML a user hands us (recipes, builder configs, routing configs, `--set` values).

Safe tags only (`yaml.SafeLoader`), plus bounds: `safe_load` builds an alias as a shared object,
so a "billion laughs" document loads at once but expands to billions of nodes as soon as
anything walks it (validation, merging, dumping). While composing, every node's expanded size
and height are counted (aliases included), and a document past `MAX_NODES` nodes or `MAX_DEPTH`
levels is refused at the node that crosses the bound, and so is an alias inside the node it
names (a recursive structure). A key repeated in one mapping is refused too (PyYAML would keep
the last silently).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import EmdpoError
from .textfile import read_text

MAX_BYTES = 1 << 20  # a recipe is a few KiB
MAX_NODES = 100_000  # after alias expansion
MAX_DEPTH = 64
_MERGE = "tag:yaml.org,2002:merge"


def _refuse(problem: str, mark: Any) -> yaml.MarkedYAMLError:
    return yaml.MarkedYAMLError(problem=problem, problem_mark=mark)


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents too large after alias expansion, too deep, or with a
    key repeated in one mapping."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._total = 0  # nodes of the expanded document so far: 1 per new node, an alias's whole size
        self._stats: dict[yaml.Node, tuple[int, int]] = {}  # node -> (expanded size, height)

    def compose_node(self, parent: Any, index: Any) -> yaml.Node:
        mark = self.peek_event().start_mark  # where this node (or alias) is written
        if self.check_event(yaml.AliasEvent):
            target = self.anchors.get(self.peek_event().anchor)
            if target is not None and target not in self._stats:  # still being composed
                raise _refuse("alias inside the node it names (a recursive structure)", mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _refuse(f"nests deeper than {MAX_DEPTH} levels", mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node in self._stats:  # an alias: measured when its anchor was composed
            size, height = self._stats[node]
            self._total += size
        else:
            size, height = self._stats[node] = self._measure(node)
            self._total += 1
        if self._total > MAX_NODES:
            raise _refuse(f"expands to more than {MAX_NODES} nodes (aliases of aliases?)", mark)
        if self._depth + height > MAX_DEPTH:
            raise _refuse(f"nests deeper than {MAX_DEPTH} levels (through an alias)", mark)
        return node

    def _measure(self, node: yaml.Node) -> tuple[int, int]:
        """(expanded size, height) of a new node from its children's (composed before it)."""
        if isinstance(node, yaml.MappingNode):
            _check_unique_keys(node)
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        stats = [self._stats[c] for c in children]
        return 1 + sum(s for s, _ in stats), 1 + max((h for _, h in stats), default=0)


def _check_unique_keys(node: yaml.MappingNode) -> None:
    seen: set[tuple[str, str]] = set()
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE:
            if (key.tag, key.value) in seen:
                raise _refuse(f"duplicate key {key.value!r}", key.start_mark)
            seen.add((key.tag, key.value))


def load_yaml(text: str, source: str | Path, error: type[EmdpoError] = EmdpoError) -> Any:
    """One YAML document with safe tags and the bounds above; `error` names `source` and the line."""
    try:
        return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{source}: invalid YAML{at}: {problem}") from None


def read_yaml(path: Path, error: type[EmdpoError] = EmdpoError, *, what: str = "file", where: str | None = None) -> Any:
    """`load_yaml` of a file (at most `MAX_BYTES`, UTF-8); a missing or unreadable file is `error`
    too, starting with `where` (default: the path), e.g. `child.yaml: extends`."""
    where = where or str(path)
    try:
        text = read_text(path, max_bytes=MAX_BYTES, error=error)
    except FileNotFoundError:
        raise error(f"{where}: {what} not found: {path}") from None
    except OSError as exc:
        raise error(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    return load_yaml(text, path, error)
