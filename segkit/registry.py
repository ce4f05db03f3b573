"""Registries of named components and plugin discovery.

Every buildable component (backbone, neck, head, meta-architecture, dataset, transform, evaluator)
lives in a :class:`Registry`. Built-in plugins and third-party plugins are found the same way: the
first lookup imports every module listed under the entry-point group ``segkit.plugins``; a config's
``imports:`` list adds the user's own modules. Nothing else loads code.

Example:
    >>> from segkit.registry import BACKBONES
    >>> @BACKBONES.register()
    ... class TinyNet(torch.nn.Module):
    ...     def __init__(self, *, width: int = 8) -> None: ...
    >>> BACKBONES.build({"type": "TinyNet", "width": 16}, path="model.backbone")
"""

from __future__ import annotations

import importlib
import inspect
import sys
import threading
import traceback
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from segkit.errors import ConfigError, UnknownComponentError, argument_key, did_you_mean

__all__ = [
    "Registry",
    "RegistryEntry",
    "BACKBONES",
    "NECKS",
    "HEADS",
    "MODELS",
    "DATASETS",
    "TRANSFORMS",
    "EVALUATORS",
    "CONVERTERS",
    "WEIGHT_SOURCES",
    "ENTRY_POINT_GROUP",
    "discover_plugins",
    "plugin_errors",
    "import_modules",
    "loaded_plugin_module",
    "all_registries",
    "join_key",
]

ENTRY_POINT_GROUP = "segkit.plugins"

# Core modules that register components of the core package itself (meta-architectures,
# datasets, evaluators, weight sources). Plugins come only through entry points and ``imports:``.
_CORE_MODULES = (
    "segkit.models.two_stage",
    "segkit.models.one_stage",
    "segkit.models.segmentor",
    "segkit.data.coco",
    "segkit.data.shapes",
    "segkit.data.semseg",
    "segkit.data.semseg_formats",
    "segkit.data.voc",
    "segkit.data.transforms",
    "segkit.evaluation.coco",
    "segkit.evaluation.semseg",
    "segkit.evaluation.voc",
    "segkit.weight_sources",
)
# The modules a config's ``imports:`` loaded: {name a config may use in a class_path: name in sys.modules}.
# A ``.py`` file is known by its stem (``my_callbacks``) and by the name it is imported under.
_config_modules: dict[str, str] = {}


@dataclass(frozen=True)
class RegistryEntry:
    """One registered component and where it came from."""

    name: str
    obj: Any
    module: str
    plugin: str | None = None  # entry-point name / distribution, if loaded from one


@dataclass
class _PluginError:
    source: str  # "entry point 'x' (distribution y)" or "module m"
    module: str
    error: str
    traceback: str


_discovery_lock = threading.RLock()
_discovered = False
_discovering = False
_plugin_errors: list[_PluginError] = []
_current_plugin: str | None = None


class Registry:
    """A mapping from names to classes or functions that build components.

    Args:
        kind: human-readable kind used in messages (``"backbone"``).
        fallback: optional callable returning extra ``{name: obj}`` resolved lazily when a name is
            not registered (used to expose every albumentations transform without registering each).
    """

    def __init__(self, kind: str, *, fallback: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, RegistryEntry] = {}
        self._fallback = fallback
        self._fallback_cache: Mapping[str, Any] | None = None

    # ---------------------------------------------------------------- registration
    def register(self, name: str | None = None, *, force: bool = False) -> Callable[[Any], Any]:
        """Decorator registering a class or function under ``name`` (default: its ``__name__``).

        Raises:
            ValueError: if the name is taken by another object and ``force`` is false.
        """

        def decorator(obj: Any) -> Any:
            self.add(obj, name=name, force=force)
            return obj

        return decorator

    def add(self, obj: Any, *, name: str | None = None, force: bool = False) -> None:
        """Register ``obj`` directly (the non-decorator form of :meth:`register`)."""
        if not callable(obj):
            raise TypeError(f"only classes and functions can be registered as a {self.kind}, got {obj!r}")
        key = name or obj.__name__
        module = getattr(obj, "__module__", "?")
        existing = self._entries.get(key)
        if existing is not None and not force:
            if existing.obj is obj:
                return
            if _same_definition(existing.obj, obj):
                # The same definition run again (a notebook cell, a module reloaded after an edit, a module
                # imported by path and by name): the newest one is what the user means.
                self._entries[key] = RegistryEntry(key, obj, module, _current_plugin or existing.plugin)
                return
            raise ValueError(
                f"{self.kind} '{key}' is already registered by module '{existing.module}'"
                f"{_plugin_suffix(existing.plugin)}; module '{module}' tried to register it again. "
                f"Rename one of them or pass force=True to replace it."
            )
        self._entries[key] = RegistryEntry(key, obj, module, _current_plugin)

    def add_variant(self, base: type, name: str, summary: str, *, fixed: Mapping[str, Any] | None = None,
                    defaults: Mapping[str, Any] | None = None, module: str | None = None) -> type:
        """Register ``name``, a named variant of the class ``base``: a subclass whose arguments in ``fixed``
        are set (and no longer accepted) and whose other ``defaults`` differ.

        The variant's signature (what ``segkit list`` shows and the registry checks config keys
        against) is ``base``'s with those changes, so every other argument stays an option.

        Example:
            >>> ResNeXt = BACKBONES.add_variant(ResNet, "ResNeXt", "ResNet with grouped convolutions.",
            ...                                 defaults={"groups": 32, "width_per_group": 4})

        Raises:
            ValueError: ``fixed`` or ``defaults`` name an argument ``base`` does not have, or ``name`` is taken.
        """
        fixed, defaults = dict(fixed or {}), dict(defaults or {})
        base_params = list(inspect.signature(base).parameters.values())
        unknown = sorted((set(fixed) | set(defaults)) - {p.name for p in base_params})
        if unknown:
            raise ValueError(f"variant {name}: {base.__name__} has no argument(s) {unknown}")
        params = [p.replace(default=defaults.get(p.name, p.default)) for p in base_params if p.name not in fixed]
        allowed = {p.name for p in params}

        def __init__(self: Any, **options: Any) -> None:
            bad = sorted(set(options) - allowed)
            if bad:
                raise TypeError(f"{name}() got unexpected keyword argument(s) {bad}")
            base.__init__(self, **fixed, **{**defaults, **options})

        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        __init__.__signature__ = inspect.Signature([self_param, *params])  # type: ignore[attr-defined]
        settings = ", ".join(f"{k}={v!r}" for k, v in {**fixed, **defaults}.items())
        doc = f"{summary}\n\n``{base.__name__}({settings}, ...)``; every other argument is a ``{base.__name__}`` option."
        caller = inspect.currentframe().f_back  # the declaring module (inspect.stack() would read every frame's source)
        module = module or (caller.f_globals.get("__name__") if caller is not None else None) or base.__module__
        variant = type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": module, "__qualname__": name})
        __init__.__qualname__ = f"{name}.__init__"
        self.add(variant, name=name)
        return variant

    def remove(self, name: str) -> RegistryEntry | None:
        """Unregister ``name`` (a component defined for a while, as in a test or a notebook); returns
        its entry, or ``None`` if nothing had that name."""
        return self._entries.pop(name, None)

    # ---------------------------------------------------------------- lookup
    def _fallback_names(self) -> Mapping[str, Any]:
        if self._fallback is None:
            return {}
        if self._fallback_cache is None:
            self._fallback_cache = dict(self._fallback())
        return self._fallback_cache

    def names(self, *, include_fallback: bool = False) -> list[str]:
        discover_plugins()
        names = sorted(self._entries)
        if include_fallback:
            names += sorted(n for n in self._fallback_names() if n not in self._entries)
        return names

    def entries(self) -> list[RegistryEntry]:
        discover_plugins()
        return [self._entries[n] for n in sorted(self._entries)]

    def __contains__(self, name: object) -> bool:
        discover_plugins()
        return name in self._entries or (isinstance(name, str) and name in self._fallback_names())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def get(self, name: str, *, key: str | None = None) -> Any:
        """Return the object registered as ``name``.

        Raises:
            ConfigError: naming ``key``, the known names closest to ``name``, and any plugin that
                failed to import (it may be the one that defines ``name``).
        """
        if not isinstance(name, str):
            raise ConfigError(f"a {self.kind} type is the name of a registered {self.kind} (text), got {name!r}", key=key)
        discover_plugins()
        if name in self._entries:
            return self._entries[name].obj
        extra = self._fallback_names()
        if name in extra:
            return extra[name]
        raise UnknownComponentError(self._unknown_message(name), key=key)

    def _unknown_message(self, name: object) -> str:
        known = self.names()
        msg = f"unknown {self.kind} type '{name}'."
        hint = did_you_mean(str(name), known + list(self._fallback_names()))
        msg += hint or (f" Registered {self.kind}s: {', '.join(known)}." if known else "")
        broken = [e for e in _plugin_errors]
        if broken:
            msg += " Note: these plugins failed to import and may define it: " + "; ".join(
                f"{e.source}: {e.error}" for e in broken
            )
        msg += " Run `segkit list` to see every registered component."
        return msg

    # ---------------------------------------------------------------- building
    def build(self, cfg: Mapping[str, Any], *, path: str = "", **defaults: Any) -> Any:
        """Build a component from ``{"type": name, **kwargs}``.

        ``defaults`` are keyword arguments supplied by the caller (for example ``in_shapes`` from the
        backbone); config values of the same name win. If the registered class defines a
        ``from_config(cls, cfg, *, path, **defaults)`` classmethod, it is used instead of calling the
        class directly, so meta-architectures can build their children.

        Args:
            cfg: mapping with a ``type`` key naming a registered component.
            path: dotted config path of ``cfg`` (``"model.backbone"``), used in error messages.

        Raises:
            ConfigError: unknown type, unknown argument or missing required argument, with the
                dotted key and a suggestion.
        """
        if not isinstance(cfg, Mapping):
            raise ConfigError(
                f"expected a mapping with a 'type' key describing a {self.kind}, got {type(cfg).__name__} {cfg!r}",
                key=path or None,
            )
        if "type" not in cfg:
            raise ConfigError(
                f"a {self.kind} needs a 'type' key naming a registered {self.kind} "
                f"(one of: {', '.join(self.names()) or 'none registered'})",
                key=path or None,
            )
        kwargs = dict(cfg)
        type_name = kwargs.pop("type")
        obj = self.get(type_name, key=join_key(path, "type"))
        from_config = getattr(obj, "from_config", None)
        if inspect.isclass(obj) and callable(from_config):
            return from_config(kwargs, path=path, **defaults)
        merged = {**defaults, **kwargs}
        check_arguments(obj, merged, path=path, type_name=str(type_name), kind=self.kind)
        return obj(**merged)

    def build_child(self, cfg: Mapping[str, Any], *, path: str, **defaults: Any) -> Any:
        """:meth:`build`, with a constructor's ``ValueError`` (a bad value) re-raised as a
        :class:`ConfigError` at ``path`` (at ``path.argument`` for an
        :class:`~segkit.errors.ArgumentError`); meta-architectures build their parts with it."""
        try:
            return self.build(cfg, path=path, **defaults)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc), key=argument_key(exc, path)) from exc

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


def check_arguments(obj: Any, kwargs: Mapping[str, Any], *, path: str, type_name: str, kind: str,
                    provided: Collection[str] = ()) -> None:
    """Check ``kwargs`` against the signature of ``obj`` (a class or function).

    Args:
        provided: arguments the caller will pass itself (a dataset, the parameters), which the config
            does not set: not missing, and not checked.

    Raises:
        ConfigError: naming the first unknown key (with the nearest valid names), the missing
            required arguments, or a value whose type the argument's annotation excludes (see
            :mod:`segkit.config_types`).
    """
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    params = sig.parameters
    accepts_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = [
        n for n, p in params.items()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if not accepts_var_kw:
        for key in kwargs:
            if key not in named:
                raise ConfigError(
                    f"{type_name} ({kind}) has no argument '{key}'."
                    + (did_you_mean(key, named) or f" Its arguments are: {', '.join(named)}."),
                    key=join_key(path, key),
                )
    missing = [
        n for n, p in params.items()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and p.default is inspect.Parameter.empty and n not in kwargs and n not in provided
    ]
    if missing:
        raise ConfigError(
            f"{type_name} ({kind}) needs the argument(s) {', '.join(repr(m) for m in missing)}, which the config does not set.",
            key=path or None,
        )
    from segkit.config_types import type_problem

    for key, value in kwargs.items():
        problem = type_problem(obj, key, value)
        if problem is not None:
            raise ConfigError(f"{type_name} ({kind}) argument '{key}' {problem}.", key=join_key(path, key))


def join_key(path: str, key: str) -> str:
    """The dotted config key ``path.key`` (``key`` at the top level)."""
    return f"{path}.{key}" if path else key


def _plugin_suffix(plugin: str | None) -> str:
    return f" (plugin {plugin})" if plugin else ""


def _same_definition(a: Any, b: Any) -> bool:
    return getattr(a, "__module__", None) == getattr(b, "__module__", None) and getattr(
        a, "__qualname__", None
    ) == getattr(b, "__qualname__", None)


# -------------------------------------------------------------------- albumentations fallback
def _albumentations_transforms() -> Mapping[str, Any]:
    try:
        import albumentations as A
    except ImportError:  # pragma: no cover - albumentations is a hard dependency
        return {}
    names: dict[str, Any] = {}
    for name in dir(A):
        obj = getattr(A, name)
        if inspect.isclass(obj) and issubclass(obj, A.BasicTransform) and not name.startswith("_"):
            names[name] = obj
    return names


BACKBONES = Registry("backbone")
NECKS = Registry("neck")
HEADS = Registry("head")
MODELS = Registry("model")
DATASETS = Registry("dataset")
TRANSFORMS = Registry("transform", fallback=_albumentations_transforms)
EVALUATORS = Registry("evaluator")
CONVERTERS = Registry("weight converter")
#: ``SCHEME`` of the weight names ``SCHEME://NAME`` (:mod:`segkit.weight_names`).
WEIGHT_SOURCES = Registry("weight source")


def all_registries() -> dict[str, Registry]:
    """The registries by plural kind name, as ``segkit list`` shows them."""
    return {
        "backbones": BACKBONES,
        "necks": NECKS,
        "heads": HEADS,
        "models": MODELS,
        "datasets": DATASETS,
        "transforms": TRANSFORMS,
        "evaluators": EVALUATORS,
        "converters": CONVERTERS,
        "weight_sources": WEIGHT_SOURCES,
    }


# -------------------------------------------------------------------- discovery
def discover_plugins(*, force: bool = False) -> None:
    """Import the core's registering modules and every ``segkit.plugins`` entry point, once.

    A plugin that fails to import is recorded (see :func:`plugin_errors`) and does not stop the
    others; its error is shown when an unknown name is asked for and in ``segkit list``.
    """
    global _discovered, _discovering, _current_plugin
    with _discovery_lock:
        if (_discovered and not force) or _discovering:
            return
        _discovering = True
        try:
            if force:
                _plugin_errors.clear()
            for module in _CORE_MODULES:
                _import_recording(module, source=f"core module '{module}'", plugin=None)
            for ep in _entry_points():
                dist = getattr(getattr(ep, "dist", None), "name", None)
                label = f"{ep.name}" + (f" from {dist}" if dist else "")
                _import_recording(ep.value.split(":")[0], source=f"plugin '{label}'", plugin=label)
            _discovered = True
        finally:
            _discovering = False
            _current_plugin = None


def _entry_points() -> list[metadata.EntryPoint]:
    eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    seen: set[tuple[str, str]] = set()
    unique = []
    for ep in eps:  # the same distribution may be visible twice on sys.path
        if (ep.name, ep.value) not in seen:
            seen.add((ep.name, ep.value))
            unique.append(ep)
    return unique


def _import_recording(module: str, *, source: str, plugin: str | None) -> bool:
    global _current_plugin
    _current_plugin = plugin
    try:
        importlib.import_module(module)
        return True
    except Exception as exc:  # noqa: BLE001 - one broken plugin must not break the others
        _plugin_errors.append(
            _PluginError(source, module, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        )
        return False
    finally:
        _current_plugin = None


def plugin_errors() -> list[_PluginError]:
    """Plugins (or core modules) that failed to import during discovery."""
    discover_plugins()
    return list(_plugin_errors)


def import_modules(modules: list[str] | tuple[str, ...], *, path: str = "imports", base_dir: str | None = None) -> None:
    """Import the user's plugin modules listed under a config's ``imports:``.

    Each item is a dotted module name (importable from ``sys.path``) or a path to a ``.py`` file,
    relative to ``base_dir`` (the config's folder) when not absolute.

    Raises:
        ConfigError: naming the item that could not be imported and the reason.
    """
    import importlib.util
    import os

    discover_plugins()
    if isinstance(modules, str):
        modules = [modules]
    if not isinstance(modules, (list, tuple)):
        raise ConfigError(f"'imports' must be a list of module names or .py paths, got {modules!r}", key=path)
    for i, item in enumerate(modules):
        key = f"{path}[{i}]"
        if not isinstance(item, str):
            raise ConfigError(f"expected a module name or a .py path, got {item!r}", key=key)
        try:
            if item.endswith(".py"):
                file = item if os.path.isabs(item) or base_dir is None else os.path.join(base_dir, item)
                if not os.path.isfile(file):
                    raise ConfigError(f"plugin file '{file}' does not exist", key=key)
                name = "segkit_user_" + os.path.splitext(os.path.basename(file))[0]
                existing = sys.modules.get(name)
                if existing is not None and os.path.abspath(getattr(existing, "__file__", "")) == os.path.abspath(file):
                    _config_modules.update({name: name, os.path.splitext(os.path.basename(file))[0]: name})
                    continue
                spec = importlib.util.spec_from_file_location(name, file)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(name, None)
                    raise
                _config_modules.update({name: name, os.path.splitext(os.path.basename(file))[0]: name})
            else:
                importlib.import_module(item)
                _config_modules[item] = item
        except ConfigError:
            raise
        except ModuleNotFoundError as exc:
            raise ConfigError(
                f"cannot import plugin module '{item}': {exc}. Use a dotted module name on the Python path "
                f"or a path to a .py file relative to the config.",
                key=key,
            ) from exc
        except Exception as exc:  # noqa: BLE001 - report the user's plugin error with its origin
            raise ConfigError(f"importing plugin module '{item}' failed: {type(exc).__name__}: {exc}", key=key) from exc


def loaded_plugin_module(name: str) -> Any | None:
    """The module ``name`` if code from it may be used by name in a config, else ``None``; never imports.

    Such a module is already imported and is (or lies inside) one of: segkit's own packages, a module
    of a ``segkit.plugins`` entry point, or a module a config's ``imports:`` loaded (a ``.py`` file by
    its stem). A checkpoint's stored ``imports:`` are never imported, so they never qualify.
    """
    name = _config_modules.get(name, name)
    module = sys.modules.get(name)
    if module is None:
        return None
    roots = {"segkit", "segkit_plugins", *_config_modules.values(),
             *(ep.value.split(":")[0].strip() for ep in _entry_points())}
    return module if any(name == root or name.startswith(root + ".") for root in roots) else None
