"""Reading YAML safely and within bounds.

Configs, command-line override values and ``${env:...}`` values are read with :func:`load_yaml`:

* safe loading only (no Python tags);
* YAML 1.2 floats: ``1e-4`` and ``1E5`` are numbers (YAML 1.1, which PyYAML follows, reads them as
  strings unless written ``1.0e-4``);
* dates such as ``2024-01-31`` stay strings;
* a key given twice in one mapping is an error naming both lines (YAML 1.1 silently keeps the last);
* bounded cost: the value may hold at most :data:`MAX_VALUES` values once aliases (``*name``) are
  expanded (a few lines of nested aliases otherwise expand to billions of values when the config is
  merged, copied or saved) and nest at most :data:`MAX_DEPTH` levels.

:func:`check_bounds` applies the same limits to a value that did not come from YAML text (a config
stored in a checkpoint, whose shared references expand the same way).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

__all__ = ["load_yaml", "check_bounds", "YamlBoundsError", "DuplicateKeyError", "MAX_VALUES", "MAX_DEPTH"]

#: Values (mappings, lists and scalars, aliases expanded) one YAML document may hold.
MAX_VALUES = 100_000
#: Nesting levels of mappings and lists one YAML document may have.
MAX_DEPTH = 64

_FLOAT_1_2 = re.compile(r"""^(?:
    [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
  | [-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
  | [-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
  | [-+]?\.(?:inf|Inf|INF)
  | \.(?:nan|NaN|NAN))$""", re.X)


class YamlBoundsError(ValueError):
    """A YAML value that would cost more than the limits allow (too many values or too deep)."""


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that gives one key twice."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 floats and duplicate keys refused."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError, TypeError) as exc:  # `!!int 1.5`, 5000 digits: say where
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {_excerpt(node)} as {node.tag.rsplit(':', 1)[-1]}: {str(exc).split(';')[0]}",
                node.start_mark) from None

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    first = seen[key].start_mark
                    raise DuplicateKeyError(
                        None, None, f"key {key!r} appears twice in one mapping (first at line {first.line + 1}); "
                        f"remove one of them", key_node.start_mark)
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


# Dates stay strings (YAML 1.2 has no timestamps; a date object could not be stored in a checkpoint,
# which holds plain data only), and 1e-4 is a float.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))


def _excerpt(node: yaml.Node, limit: int = 40) -> str:
    value = node.value if isinstance(node, yaml.ScalarNode) else f"a {node.id}"
    text = str(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def load_yaml(text: str | bytes) -> Any:
    """Parse one YAML document safely and check it against the bounds.

    Args:
        text: the document (``bytes`` may carry a UTF-8 or UTF-16 byte-order mark).

    Raises:
        yaml.YAMLError: the text is not valid YAML (a ``MarkedYAMLError`` says where), or holds a key twice.
        YamlBoundsError: the value is nested deeper than :data:`MAX_DEPTH` or expands to more than
            :data:`MAX_VALUES` values.
    """
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except RecursionError:
        raise YamlBoundsError(f"it is nested deeper than the {MAX_DEPTH} levels a config may have") from None
    check_bounds(data)
    return data


def check_bounds(value: Any) -> None:
    """Refuse a value nested deeper than :data:`MAX_DEPTH` or holding more than :data:`MAX_VALUES`
    values once shared references (YAML aliases, a pickle's memo) are counted each time they occur.

    The count visits each distinct container once, so it costs the size of ``value`` as stored,
    not as expanded.

    Raises:
        YamlBoundsError: saying which limit and by how much.
    """
    total, _ = _expanded_size(value, {}, depth=0, active=set())
    if total > MAX_VALUES:
        raise YamlBoundsError(
            f"it expands to more than {MAX_VALUES:,} values through aliases or shared references (&name / *name), "
            f"more than a config may hold; write the repeated parts out or remove the aliases")


def _expanded_size(value: Any, seen: dict[int, tuple[int, int]], *, depth: int,
                   active: set[int]) -> tuple[int, int]:
    """(values, nesting height) of ``value``; ``seen`` remembers both for each container already visited."""
    if not isinstance(value, (Mapping, list, tuple)):
        return 1, 0
    key = id(value)
    if key in active:
        raise YamlBoundsError("it contains itself (a recursive alias), which a config cannot")
    if key not in seen:
        if depth >= MAX_DEPTH:
            raise YamlBoundsError(f"it is nested deeper than the {MAX_DEPTH} levels a config may have")
        active.add(key)
        total, height = 1, 0
        for child in (value.values() if isinstance(value, Mapping) else value):
            size, child_height = _expanded_size(child, seen, depth=depth + 1, active=active)
            total, height = total + size, max(height, child_height + 1)
            if total > MAX_VALUES:  # a bomb's exact count does not matter
                break
        active.discard(key)
        seen[key] = (total, height)
    total, height = seen[key]
    if depth + height > MAX_DEPTH:
        raise YamlBoundsError(f"it is nested deeper than the {MAX_DEPTH} levels a config may have")
    return total, height
