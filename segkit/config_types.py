"""Checking config values against the type annotations of the arguments they go to.

A value written in YAML (``None``, ``bool``, ``int``, ``float``, ``str``, lists and mappings) is
compared with the annotation of the argument that receives it, so ``data.batch_size: four`` or
``optimizer.lr: fast`` is refused with the key and the expected type before anything is built,
instead of failing deep inside PyTorch. The check only refuses what the annotation clearly excludes:
an annotation it does not understand, a value that is not plain YAML (an object passed by code) and
``null`` are accepted, and a class annotation accepts only instances of it.

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
import types
import typing
from typing import Any

__all__ = ["type_problem", "is_integer", "is_finite_number"]

_YAML_TYPES = (bool, int, float, str, list, tuple, dict)
_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
_SEQUENCES = (list, tuple, cabc.Sequence, cabc.Iterable, cabc.Collection, cabc.MutableSequence)
_MAPPINGS = (dict, cabc.Mapping, cabc.MutableMapping)


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer read from YAML or JSON (``True``/``False`` are not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite real number (not a bool, NaN or infinity)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


@functools.lru_cache(maxsize=512)
def _hints(obj: Any) -> dict[str, Any]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - unresolvable annotations: check nothing
        return {}


def type_problem(obj: Any, name: str, value: Any) -> str | None:
    """Why ``value`` cannot be argument ``name`` of ``obj``, or ``None`` if it can (or cannot be told)."""
    if value is None or not isinstance(value, _YAML_TYPES):
        return None
    try:
        hint = _hints(obj).get(name)
    except TypeError:  # unhashable callables
        return None
    if hint is None or _matches(value, hint) is not False:
        return None
    return f"must be {_describe(hint)}, got {value!r} ({_kind(value)})"


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
        parts = [_describe(a) for a in args if a is not type(None)]
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
