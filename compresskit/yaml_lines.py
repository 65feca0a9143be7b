"""YAML with line numbers: parse a file once into data and once into nodes, and map a field path
(as pydantic reports it: ``("stages", 0, "owl_m")``) back to the line a user has to fix.

Used by recipes, whose errors must name the bad field *and* its line. Plain ``yaml.safe_load``
forgets positions and silently keeps the last of two duplicate keys; composing the node tree keeps
``start_mark`` for every key and value and lets duplicates be refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml


class YamlSourceError(ValueError):
    """The text is not one valid YAML document; ``line`` is 1-based (None when unknown)."""

    def __init__(self, message: str, line: int | None):
        super().__init__(message)
        self.line = line


@dataclass(frozen=True)
class YamlDocument:
    data: Any
    root: yaml.Node | None

    def locate(self, loc: Sequence[str | int], *, missing: bool = False) -> tuple[str, int | None]:
        """(dotted field name, 1-based line) for an error location.

        Walks the node tree as far as ``loc`` exists and reports the line of the deepest key found
        (the key's own line for mapping entries, the item's line for list entries). Elements past
        that are kept in the name only when the error is about a ``missing`` field (the name the
        user must add, at the line of the mapping that lacks it); pydantic's union / validator
        tags (``"int"``, ``"function-after[...]"``) are dropped.
        """
        node = self.root
        line = node.start_mark.line + 1 if node is not None else None
        parts: list[str] = []
        for element in loc:
            found = child(node, element)
            if found is None:
                if missing:
                    parts.append(str(element))
                break
            line, node = found
            parts.append(str(element))
        return ".".join(parts) or "(top level)", line


def child(node: yaml.Node | None, key: str | int) -> tuple[int, yaml.Node] | None:
    """(line of the key / item, value node) of ``node[key]``, or None."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(key):
                return key_node.start_mark.line + 1, value_node
    elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
        item = node.value[key]
        return item.start_mark.line + 1, item
    return None


def _refuse_duplicate_keys(node: yaml.Node | None) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line + 1
                if key_node.value in seen:
                    raise YamlSourceError(
                        f"key {key_node.value!r} appears twice (first at line {seen[key_node.value]})", line
                    )
                seen[key_node.value] = line
            _refuse_duplicate_keys(value_node)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item)


def parse_yaml(text: str) -> YamlDocument:
    """Data (``safe_load``) and node tree of one YAML document; errors carry the line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        reason = exc.problem or exc.context or "syntax error"
        raise YamlSourceError(f"not valid YAML: {reason}", mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise YamlSourceError(f"not valid YAML: {str(exc).splitlines()[0]}", None) from None
    _refuse_duplicate_keys(root)
    return YamlDocument(data=data, root=root)
