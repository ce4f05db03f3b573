"""Checking config values against the type annotations of the arguments they go to.

A value written in YAML (``None``, ``bool``, ``int``, ``float``, ``str``, lists and mappings) is
compared with the annotation of the argument that receives it, so ``data.batch_size: four`` or
``optimizer.lr: fast`` is refused with the key and the expected type before anything is built,
instead of failing deep inside PyTorch. The check only refuses what the annotation clearly excludes:
an annotation it does not understand and a value that is not plain YAML (an object passed by code)
are accepted, ``null`` only where the annotation allows it (or the default is ``None``), and a class
annotation accepts only instances of it.

Example:
    >>> def f(*, depth: int = 50, norm: str | None = None) -> None: ...
    >>> type_problem(f, "depth", "fifty")
    "must be an integer, got 'fifty' (a string)"
"""

from __future__ import annotations

import collections.abc as cabc
import functools
import inspect
import math
import numbers
import os
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from segkit.errors import ConfigError

__all__ = ["type_problem", "is_integer", "is_finite_number", "Bound", "check_bounds_of", "yaml_repr"]

_FLOAT_MAX = sys.float_info.max
_YAML_TYPES = (bool, int, float, str, list, tuple, dict)
_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
_SEQUENCES = (list, tuple, cabc.Sequence, cabc.Iterable, cabc.Collection, cabc.MutableSequence)
_MAPPINGS = (dict, cabc.Mapping, cabc.MutableMapping)


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer read from YAML or JSON (``True``/``False`` are not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """Whether a value read from YAML or JSON is a finite real number a float can hold: not a bool, NaN, an infinity or
    an integer beyond the floats (``1`` with 400 zeros parses as a Python int).

    The plain ``int`` / ``float`` cases are decided without an ABC check, so validating millions of
    numbers stays fast; other real types (numpy scalars from code) are checked through ``float()``.
    """
    kind = type(value)
    if kind is float:
        return math.isfinite(value)
    if kind is int:
        return -_FLOAT_MAX <= value <= _FLOAT_MAX
    if kind is bool or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


@functools.lru_cache(maxsize=512)
def _hints(obj: Any) -> dict[str, Any]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - unresolvable annotations: check nothing
        return {}


def type_problem(obj: Any, name: str, value: Any) -> str | None:
    """Why ``value`` cannot be argument ``name`` of ``obj``, or ``None`` if it can (or cannot be told).

    ``null`` is refused only where the annotation excludes it and the argument's default is not
    ``None`` itself (``width: int = None`` means an optional width).
    """
    if value is not None and not isinstance(value, _YAML_TYPES):
        return None
    try:
        hint = _hints(obj).get(name)
    except TypeError:  # unhashable callables
        return None
    if hint is None or _matches(value, hint) is not False:
        return None
    if value is None and _default(obj, name) is None:
        return None
    return "must be " + _describe(hint) + (", got null" if value is None else f", got {value!r} ({_kind(value)})")


def _default(obj: Any, name: str) -> Any:
    """The default value of argument ``name`` of ``obj`` (``inspect.Parameter.empty`` if it has none)."""
    try:
        parameter = inspect.signature(obj).parameters.get(name)
    except (TypeError, ValueError):
        return inspect.Parameter.empty
    return inspect.Parameter.empty if parameter is None else parameter.default


def _matches(value: Any, hint: Any) -> bool | None:
    """True / False where the annotation decides, None where it cannot be told."""
    if hint is Any or hint is object:
        return True
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        results = [_matches(value, a) for a in args]
        if any(r is True for r in results):
            return True
        return None if any(r is None for r in results) else False
    if origin is typing.Literal:
        return value in args and type(value) in {type(a) for a in args}
    if hint in (type(None), None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is os.PathLike or origin is os.PathLike:
        return isinstance(value, os.PathLike)
    container = origin or hint
    if container in _MAPPINGS:
        return isinstance(value, dict)
    if container in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                return False
            item_results = [_matches(v, a) for v, a in zip(value, args)]
        else:
            item = args[0] if args else Any
            item_results = [_matches(v, item) for v in value]
        if any(r is False for r in item_results):
            return False
        return True
    if inspect.isclass(hint):
        if hint in (list, tuple, dict, set, frozenset):
            return isinstance(value, hint)
        return isinstance(value, hint)
    return None


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) == 2 and typing.get_origin(members[0]) in _SEQUENCES + (tuple,) \
                and typing.get_args(members[0])[:1] == (members[1],):  # Sequence[X] | X
            return f"{_describe(members[1])}, or a list of them" + (" or null" if type(None) in args else "")
        parts = [_describe(a) for a in members]
        text = " or ".join(dict.fromkeys(parts))
        return text + (" or null" if type(None) in args else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint in _NAMES:
        return _NAMES[hint]
    container = origin or hint
    if container in _MAPPINGS:
        return "a mapping"
    if container in _SEQUENCES:
        item = args[0] if args and not (container is tuple and len(args) != 2) else None
        return "a list" + (f" of {_plural(_describe(item))}" if item not in (None, Any) else "")
    return f"a {getattr(hint, '__name__', str(hint))}"


def _plural(text: str) -> str:
    for single, plural in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings"),
                           ("a list", "lists"), ("a mapping", "mappings")):
        text = text.replace(single, plural)
    return text


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return _NAMES.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class Bound:
    """The allowed range of a numeric config value.

    Args:
        low, high: the smallest and largest allowed value (None: no limit on that side).
        integer: only integers (``true``/``false`` are not integers).
        low_open, high_open: ``low`` / ``high`` themselves are not allowed.
        nullable: ``null`` is allowed.
        meaning: what special values mean, added to the message (``"-1: no limit"``).

    Example:
        >>> Bound(1, integer=True).problem(0)
        'must be an integer >= 1, got 0'
    """

    low: float | None = None
    high: float | None = None
    integer: bool = False
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False
    meaning: str = ""

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is outside the range, or None if it is allowed."""
        if value is None and self.nullable:
            return None
        kind_ok = is_integer(value) if self.integer else is_finite_number(value)
        inside = kind_ok and not (
            (self.low is not None and (value < self.low or (self.low_open and value == self.low)))
            or (self.high is not None and (value > self.high or (self.high_open and value == self.high))))
        if inside:
            return None
        meaning = f" ({self.meaning})" if self.meaning else ""
        return f"must be {self.describe()}{meaning}, got {yaml_repr(value)}"

    def describe(self) -> str:
        """``"an integer >= 1"``, ``"a number in [0, 1)"``, ``"a number > 0 or null"``."""
        text = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            text += f" in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}" \
                    f"{')' if self.high_open else ']'}"
        elif self.low is not None:
            text += f" {'>' if self.low_open else '>='} {_number(self.low)}"
        elif self.high is not None:
            text += f" {'<' if self.high_open else '<='} {_number(self.high)}"
        return text + (" or null" if self.nullable else "")


def check_bounds_of(section: Mapping[str, Any], bounds: Mapping[str, Bound], *, path: str) -> None:
    """Check the values of ``section`` that ``bounds`` names (absent keys are not checked).

    Raises:
        ConfigError: at ``path.key``, with the allowed range and the value.
    """
    for key, bound in bounds.items():
        if key in section:
            problem = bound.problem(section[key])
            if problem:
                raise ConfigError(f"{key} {problem}", key=f"{path}.{key}" if path else key)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def yaml_repr(value: Any) -> str:
    """``value`` as a config would write it: ``null``, ``true``, ``'text'``, ``1e-05``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)
