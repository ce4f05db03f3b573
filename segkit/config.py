"""YAML configuration: ``_base_`` inheritance, ``_delete_``, interpolation, dotted overrides.

A config file is a YAML mapping. ``_base_: [a.yaml, b.yaml]`` (paths relative to the file, or
``segkit://NAME`` for a config shipped in the package, see :mod:`segkit.config_files`) merges
the listed files depth-first, later ones winning, then the file's own keys on top. A mapping with
``_delete_: true`` replaces what it would otherwise merge into. Strings may reference other values:
``"${data.batch_size}"`` alone is replaced by the value (any type); inside a longer string it is
substituted as text; ``${env:NAME}`` or ``${env:NAME,default}`` reads an environment variable.
Overrides ``key.sub=value`` (value parsed as YAML) apply after merging and before interpolation.

Every key remembers the file that set it (or ``"command line"``), so errors raised later while
building components name the file, the dotted key and a suggestion.

Example:
    >>> cfg = load_config("configs/quickstart.yaml", ["trainer.max_epochs=2"])
    >>> cfg["model"]["backbone"]["depth"]
    18
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import yaml

from segkit.config_files import PACKAGED_SCHEME, packaged_config
from segkit.errors import ConfigError, UnknownComponentError, did_you_mean
from segkit.textio import read_text
from segkit.yamlio import (
    MAX_VALUES,
    DuplicateKeyError,
    YamlBoundsError,
    check_bounds,
    load_yaml,
)

__all__ = ["Config", "load_config", "apply_overrides", "merge", "dump_config", "config_errors", "resolve_interpolations",
           "parse_value", "skipped_imports_hint", "check_text", "TOP_LEVEL_KEYS"]

BASE_KEY = "_base_"
DELETE_KEY = "_delete_"
COMMAND_LINE = "command line"
TOP_LEVEL_KEYS = (
    "imports", "model", "data", "optimizer", "scheduler", "trainer", "evaluation", "work_dir", "seed",
    "checkpoint", "engine",
)
_REF = re.compile(r"\$\{([^{}]+)\}")
#: Files a ``_base_`` chain may nest (the config itself, its base, the base's base...).
MAX_BASE_DEPTH = 16
#: Config files read for one config, counting a file as often as it is listed.
MAX_CONFIG_FILES = 64
#: Size of one config file, in bytes.
MAX_CONFIG_BYTES = 4 * 1024 * 1024


class Config(dict):
    """A merged configuration: a plain ``dict`` that also knows which file set each key.

    Attributes:
        filename: the top-level config file ("" for configs built in code).
        origins: ``{dotted key: file}`` for every key set by a file or an override.
        skipped_imports: plugin modules named under ``imports:`` of a config read from a checkpoint,
            which were not imported (a checkpoint is data; see :func:`segkit.config_from_checkpoint`).
    """

    def __init__(self, data: Mapping[str, Any] | None = None, *, filename: str = "",
                 origins: Mapping[str, str] | None = None, skipped_imports: Sequence[str] = ()) -> None:
        super().__init__(data or {})
        self.filename = filename
        self.origins: dict[str, str] = dict(origins or {})
        self.skipped_imports: list[str] = list(skipped_imports)

    def origin(self, key: str) -> str | None:
        """The file that set ``key`` or its closest parent that has an origin."""
        key = re.sub(r"\[\d+\]", "", key)
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            found = self.origins.get(".".join(parts[:n]))
            if found:
                return found
        return self.filename or None

    def select(self, key: str, default: Any = None) -> Any:
        """Value at dotted ``key`` or ``default``."""
        node: Any = self
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    def to_dict(self) -> dict[str, Any]:
        """A deep copy as plain dicts and lists (what is saved with checkpoints)."""
        return _plain(self)

    def __deepcopy__(self, memo: dict) -> Config:
        return Config(copy.deepcopy(dict(self), memo), filename=self.filename, origins=self.origins,
                      skipped_imports=self.skipped_imports)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@contextlib.contextmanager
def config_errors(cfg: Mapping[str, Any]) -> Iterator[None]:
    """Add the originating file to a :class:`ConfigError` raised inside the block.

    A component missing from the registries of a config read from a checkpoint whose plugins were not
    imported gets the modules the checkpoint names and how to allow them.
    """
    try:
        yield
    except ConfigError as exc:
        if exc.file is None and isinstance(cfg, Config):
            exc.file = cfg.origin(exc.key) if exc.key else (cfg.filename or None)
        if isinstance(exc, UnknownComponentError) and getattr(cfg, "skipped_imports", None):
            hint = skipped_imports_hint(cfg.skipped_imports)
            if hint not in exc.message:  # blocks nest
                exc.message += " " + hint
        raise


def skipped_imports_hint(modules: Sequence[str]) -> str:
    """Why the plugin modules a checkpoint names were not imported, and how to allow them."""
    names = ", ".join(repr(m) for m in modules)
    return (f"The checkpoint's stored config names plugin modules under imports: ({names}), which segkit did not "
            f"import: a checkpoint is data and never loads code. If you trust them, pass a config that lists them "
            f"(segkit eval CONFIG CKPT), add imports=[...] to the command line, or install the plugin package (a "
            f"segkit.plugins entry point).")


# ------------------------------------------------------------------------------------ loading
def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = (), *, import_plugins: bool = True) -> Config:
    """Load ``path`` with its ``_base_`` chain, apply ``overrides``, resolve interpolations.

    Args:
        path: a YAML config file.
        overrides: ``["model.backbone.depth=50", ...]``; values are parsed as YAML.
        import_plugins: import the modules listed under ``imports:`` (relative to the file).

    Raises:
        ConfigError: with the file and dotted key of the problem.
    """
    from segkit.config_files import find_config

    path = find_config(os.fspath(path))
    origins: dict[str, str] = {}
    data = _load_with_bases(path, origins, stack=(), reads=[])
    cfg = Config(data, filename=path, origins=origins)
    apply_overrides(cfg, overrides)
    resolve_interpolations(cfg)
    try:
        check_bounds(cfg)  # each file was within bounds; so must be what their merge made
    except YamlBoundsError as exc:
        raise ConfigError(f"the merged config cannot be used: {exc}.", file=path) from None
    check_text(cfg)
    _check_top_level(cfg)
    if import_plugins and cfg.get("imports"):
        from segkit.registry import import_modules

        imports_file = cfg.origins.get("imports", path)
        with config_errors(cfg):
            import_modules(cfg["imports"], path="imports", base_dir=os.path.dirname(os.path.abspath(imports_file)))
    return cfg


def _read_yaml(path: str, referenced_by: str | None) -> dict[str, Any]:
    if not os.path.isfile(path):
        hint = f" (listed in _base_ of {referenced_by})" if referenced_by else ""
        raise ConfigError(f"config file '{path}' does not exist{hint}.", key=BASE_KEY if referenced_by else None,
                          file=referenced_by)
    if os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise ConfigError(f"the file is {os.path.getsize(path):,} bytes, more than the {MAX_CONFIG_BYTES:,} a config "
                          f"may have; is it a config?", file=path)
    text = read_text(path, error=ConfigError, what="config file")
    try:
        data = load_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        raise ConfigError(f"invalid YAML at {where}: {exc.problem or exc}", file=path) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=path) from None
    except YamlBoundsError as exc:
        raise ConfigError(f"the YAML cannot be used: {exc}.", file=path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config file must hold a mapping of sections, got a {type(data).__name__}", file=path)
    return data


def _load_with_bases(path: str, origins: dict[str, str], stack: tuple[str, ...], reads: list[str]) -> dict[str, Any]:
    """The merge of ``path``'s ``_base_`` files (depth-first) and its own keys; ``stack``: the files
    whose ``_base_`` led here, ``reads``: every file read so far for this config."""
    real = os.path.realpath(path)
    if real in stack:
        chain = " -> ".join(os.path.relpath(p) for p in (*stack, real))
        raise ConfigError(f"_base_ files form a cycle: {chain}", key=BASE_KEY, file=path)
    if len(stack) >= MAX_BASE_DEPTH:
        raise ConfigError(f"the _base_ chain is more than {MAX_BASE_DEPTH} files deep ({os.path.relpath(stack[0])} -> "
                          f"... -> {os.path.relpath(real)}); merge some of its files", key=BASE_KEY, file=path)
    reads.append(real)
    if len(reads) > MAX_CONFIG_FILES:
        raise ConfigError(f"the config's _base_ files name other files more than {MAX_CONFIG_FILES} times in all (a "
                          f"file listed twice is read twice); list each base once", key=BASE_KEY, file=path)
    data = _read_yaml(path, referenced_by=None)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError("_base_ must be a path or a list of paths relative to this file (or segkit://NAME for a "
                          "packaged config)", key=BASE_KEY, file=path)
    merged: dict[str, Any] = {}
    for base in bases:
        if base.startswith(PACKAGED_SCHEME):
            base_path = packaged_config(base, key=BASE_KEY, file=path)
        else:
            base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base_path):
            raise ConfigError(f"_base_ file '{base}' does not exist (looked for {base_path}).", key=BASE_KEY, file=path)
        merged = merge(merged, _load_with_bases(base_path, origins, (*stack, real), reads))
    merged = merge(merged, data, origins=origins, file=path)
    return merged


def merge(base: Mapping[str, Any], override: Mapping[str, Any], *, origins: dict[str, str] | None = None,
          file: str = "", prefix: str = "") -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``; ``_delete_: true`` replaces instead."""
    out = dict(base)
    for key, value in override.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            value = dict(value)
            replace = bool(value.pop(DELETE_KEY, False))
            if replace or not isinstance(out.get(key), Mapping):
                if origins is not None:
                    _forget(origins, dotted)
                out[key] = merge({}, value, origins=origins, file=file, prefix=dotted + ".")
            else:
                out[key] = merge(out[key], value, origins=origins, file=file, prefix=dotted + ".")
        else:
            if origins is not None:
                _forget(origins, dotted)
            out[key] = copy.deepcopy(value)
        if origins is not None:
            origins[dotted] = file
    return out


def _forget(origins: dict[str, str], dotted: str) -> None:
    for k in [k for k in origins if k.startswith(dotted + ".")]:
        del origins[k]


# ------------------------------------------------------------------------------------ overrides
def apply_overrides(cfg: Config, overrides: Sequence[str]) -> None:
    """Apply ``key.sub=value`` strings in place; values are parsed as YAML (``null``, ``[1, 2]``...)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.subkey=value", file=COMMAND_LINE)
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' has an empty key", file=COMMAND_LINE)
        value = parse_value(raw, key=key, file=COMMAND_LINE)
        parts = key.split(".")
        if parts[0] not in TOP_LEVEL_KEYS and parts[0] not in cfg:
            raise ConfigError(
                f"unknown top-level section '{parts[0]}' in override '{item}'."
                + (did_you_mean(parts[0], TOP_LEVEL_KEYS) or f" Sections: {', '.join(TOP_LEVEL_KEYS)}."),
                key=parts[0], file=COMMAND_LINE,
            )
        node: Any = cfg
        for depth, part in enumerate(parts[:-1]):
            if part not in node or node[part] is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                sub = ".".join(parts[: depth + 1])
                raise ConfigError(f"cannot set '{key}': '{sub}' is a {type(node[part]).__name__}, not a mapping",
                                  key=sub, file=COMMAND_LINE)
            node = node[part]
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict) and not value.get(DELETE_KEY):
            node[parts[-1]] = merge(node[parts[-1]], value, origins=cfg.origins, file=COMMAND_LINE, prefix=key + ".")
        elif isinstance(value, dict):
            value.pop(DELETE_KEY, None)
            _forget(cfg.origins, key)
            node[parts[-1]] = merge({}, value, origins=cfg.origins, file=COMMAND_LINE, prefix=key + ".")
        else:
            node[parts[-1]] = value
            _forget(cfg.origins, key)
        cfg.origins[key] = COMMAND_LINE


# ------------------------------------------------------------------------------------ interpolation
def resolve_interpolations(cfg: Config) -> None:
    """Replace every ``${a.b}`` and ``${env:NAME,default}`` in ``cfg``, in place.

    Raises:
        ConfigError: an unknown reference or a cycle, naming the key that holds it.
    """
    resolved = _resolve(cfg, cfg, budget=[MAX_VALUES])
    cfg.clear()
    cfg.update(resolved)


def _spend(root: Config, budget: list[int], cost: int, key: str) -> None:
    """Count ``cost`` values or characters made by interpolation against what one config may hold."""
    budget[0] -= cost
    if budget[0] < 0:
        raise ConfigError(f"interpolations (${{...}}) expand to more than {MAX_VALUES:,} values or characters, more "
                          f"than a config may hold; a value refers to others that refer to others many times over",
                          key=key, file=root.origin(key))


def _resolve(root: Config, value: Any, key: str = "", active: tuple[str, ...] = (), *, budget: list[int]) -> Any:
    if isinstance(value, Mapping):
        _spend(root, budget, len(value), key)
        return {k: _resolve(root, v, f"{key}.{k}" if key else str(k), active, budget=budget) for k, v in value.items()}
    if isinstance(value, list):
        _spend(root, budget, len(value), key)
        return [_resolve(root, v, f"{key}[{i}]", active, budget=budget) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    whole = _REF.fullmatch(value.strip())
    if whole:
        return _lookup(root, whole.group(1).strip(), key, active, budget)
    text = _REF.sub(lambda m: str(_lookup(root, m.group(1).strip(), key, active, budget)), value)
    _spend(root, budget, len(text), key)
    return text


def _lookup(root: Config, ref: str, key: str, active: tuple[str, ...], budget: list[int]) -> Any:
    _spend(root, budget, 1, key)
    if ref.startswith("env:"):
        name, _, default = ref[4:].partition(",")
        if name in os.environ:
            # A variable that reads as a number, boolean, null or list is one (BS=2 is 2); text stays as given.
            value = parse_value(os.environ[name], key=key, file=f"environment variable {name}")
            return os.environ[name] if isinstance(value, str) else value
        if default:
            return parse_value(default, key=key, file=root.origin(key))
        raise ConfigError(f"environment variable '{name}' referenced by '${{{ref}}}' is not set", key=key,
                          file=root.origin(key))
    if ref in active:
        raise ConfigError(f"interpolation cycle: {' -> '.join((*active, ref))}", key=key, file=root.origin(key))
    node: Any = root
    walked = []
    for part in ref.split("."):
        if not isinstance(node, Mapping) or part not in node:
            options = list(node) if isinstance(node, Mapping) else []
            raise ConfigError(
                f"'${{{ref}}}' refers to '{'.'.join([*walked, part])}', which is not set."
                + did_you_mean(part, [str(o) for o in options]),
                key=key, file=root.origin(key),
            )
        walked.append(part)
        node = node[part]
    return _resolve(root, node, ref, (*active, ref), budget=budget)


def parse_value(text: str, *, key: str | None = None, file: str | None = None) -> Any:
    """A value written on the command line or in an environment variable, read as YAML (``2`` is an
    integer, ``[1, 2]`` a list, ``1e-4`` a number); text that is not valid YAML stays a string.

    Raises:
        ConfigError: the value is YAML that cannot be used (a key twice, too deep or too large once
            aliases are expanded), naming ``key`` and ``file``.
    """
    if not text.strip():
        return ""
    try:
        return load_yaml(text)
    except DuplicateKeyError as exc:
        raise ConfigError(f"the value {_short(text)} cannot be used: {exc.problem}", key=key, file=file) from None
    except YamlBoundsError as exc:
        raise ConfigError(f"the value {_short(text)} cannot be used: {exc}", key=key, file=file) from None
    except yaml.YAMLError:
        return text


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_text(cfg: Config) -> None:
    """Refuse a NUL character in any key or text value: no path, name or option can hold one."""
    def walk(value: Any, key: str) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                child = f"{key}.{k}" if key else str(k)
                if "\0" in str(k):
                    raise ConfigError("a key holds a NUL character, which no key can", key=child.replace("\0", "\\0"),
                                      file=cfg.origin(key) if key else cfg.filename or None)
                walk(v, child)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        elif isinstance(value, str) and "\0" in value:
            raise ConfigError(f"the text {value!r} holds a NUL character, which no path, name or option can hold",
                              key=key, file=cfg.origin(key))

    walk(cfg, "")


def _check_top_level(cfg: Config) -> None:
    for key in cfg:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(
                f"unknown top-level section '{key}'."
                + (did_you_mean(str(key), TOP_LEVEL_KEYS) or f" Sections: {', '.join(TOP_LEVEL_KEYS)}."),
                key=str(key), file=cfg.origin(str(key)),
            )


def dump_config(cfg: Mapping[str, Any]) -> str:
    """The config as YAML text (keys in their original order)."""
    return yaml.safe_dump(_plain(cfg), sort_keys=False, default_flow_style=None, width=100)
