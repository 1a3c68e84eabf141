"""Reading YAML that may be hostile: aliases may not expand a small file into a huge value.

PyYAML shares the node of an anchor between its aliases, so a "billion laughs" file (nine
anchors, each a list of nine aliases of the previous one) composes and constructs in
microseconds into a structure with 10^9 leaves by reference; whatever walks it afterwards
(a deep merge, a dataclass ``asdict``, the ``repr`` in an error message) spins and grows to
gigabytes. :class:`BoundedLoader` refuses such a document while composing it: at most
:data:`MAX_ALIASES` alias references, and at most :data:`MAX_NODES` nodes once every alias is
expanded (a recursive alias is refused too). Configs are a few hundred nodes.

Standard library and PyYAML only: launch scripts import it before torch.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, SequenceNode

MAX_ALIASES = 100
"""Alias references (``*name``) allowed in one document."""

MAX_NODES = 100_000
"""Nodes allowed in one document with every alias expanded."""


class YamlBombError(yaml.YAMLError):
    """A document whose aliases expand past the bounds (one line, no YAML marks)."""


class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses alias expansion past :data:`MAX_ALIASES` / :data:`MAX_NODES`."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise YamlBombError(f"more than {MAX_ALIASES} YAML aliases (*name); refused (a 'billion laughs' file?)")
        return super().compose_node(parent, index)

    def compose_document(self) -> Node:
        node = super().compose_document()
        expanded_size(node)
        return node


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def expanded_size(root: Node, limit: int = MAX_NODES) -> int:
    """Nodes under ``root`` with every alias expanded, counted without expanding anything.

    Args:
        root: a composed node graph (aliases are shared nodes).
        limit: most nodes allowed.

    Returns:
        The expanded node count.

    Raises:
        YamlBombError: more than ``limit`` nodes, or an alias that contains itself.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:  # iterative post-order: deep nesting must not hit the recursion limit
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > limit:
                raise YamlBombError(f"YAML aliases expand to more than {limit} values; refused "
                                    "(a 'billion laughs' file?)")
            continue
        if key in sizes:
            continue
        if key in open_nodes:  # met again below itself: only a recursive alias does that
            raise YamlBombError("a YAML alias contains itself (recursive anchor); refused")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    return sizes[id(root)]


def load_yaml(text: str, loader: type[BoundedLoader] = BoundedLoader) -> Any:
    """Parse one YAML document with a :class:`BoundedLoader` (or a subclass).

    Raises:
        yaml.YAMLError: bad YAML; :class:`YamlBombError` for alias expansion past the bounds.
    """
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError as err:  # PyYAML composes recursively: thousands of nested brackets
        raise YamlBombError("YAML nested too deeply; refused") from err


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and where (``line L, column C``), without the source excerpt."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        where = f" (line {err.problem_mark.line + 1}, column {err.problem_mark.column + 1})" if err.problem_mark else ""
        return f"{err.context + ': ' if err.context else ''}{err.problem}{where}"
    return " ".join(str(err).split())
