"""Exceptions that carry a fix for the user.

A :class:`ConfigError` names the dotted config key that is wrong (``model.backbone.dpth``) and,
once the error has crossed the config boundary, the file that set that key. The CLI prints these
as one paragraph and exits with status 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["ArgumentError", "ConfigError", "DatasetError", "UnknownComponentError", "UserError", "argument_key", "did_you_mean"]


class UserError(Exception):
    """An error caused by the user's input (a file, an argument), not by a bug in segkit."""


class ConfigError(UserError):
    """A configuration value or key is wrong.

    Args:
        message: what is wrong and, where possible, how to fix it.
        key: dotted path of the offending key (``model.backbone.depth``), if known.
        file: the config file (or ``"command line"``) that set the key, if known.
    """

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key
        self.file = file

    def __str__(self) -> str:
        where = []
        if self.key:
            where.append(f"at '{self.key}'")
        if self.file:
            where.append(f"in {self.file}")
        prefix = ("Config error " + " ".join(where) + ": ") if where else ""
        return prefix + self.message


class ArgumentError(UserError, ValueError):
    """A constructor argument has a bad value; ``argument`` names it, so that whoever builds the
    component from a config reports the error at that argument's key (``model.train_min_size``).

    Args:
        message: what is wrong and how to fix it.
        argument: the name of the constructor argument at fault.
    """

    def __init__(self, message: str, *, argument: str) -> None:
        super().__init__(message)
        self.argument = argument


def argument_key(exc: ValueError, path: str) -> str | None:
    """The config key of a constructor's ``exc``: ``path.argument`` for an :class:`ArgumentError`,
    else ``path`` (``None`` at the top level)."""
    if isinstance(exc, ArgumentError):
        return f"{path}.{exc.argument}" if path else exc.argument
    return path or None


class DatasetError(UserError):
    """A dataset's files are missing or malformed."""


class UnknownComponentError(ConfigError):
    """A config names a component type that no registry holds (a typo, or a plugin not loaded)."""


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Return ``" Did you mean 'x' or 'y'?"`` for the closest candidates, or ``""``."""
    name, candidates = str(name), [str(c) for c in candidates]
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in candidates}
        close = [lowered[c] for c in difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)]
    if not close:
        return ""
    quoted = [f"'{c}'" for c in close]
    return " Did you mean " + (quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]) + "?"
