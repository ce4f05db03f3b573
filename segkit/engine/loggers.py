"""Lightning loggers and callbacks from the ``trainer:`` section (``trainer.logger``, ``trainer.callbacks``).

A spec names a class in one of three ways, as LightningCLI does, with short names for Lightning's own::

    trainer:
      logger:                      # true (segkit's CSV + TensorBoard, the default), false, one spec or a list
        - csv                      # a short name: csv, tensorboard, wandb, mlflow, comet
        - class_path: WandbLogger  # a class name of pytorch_lightning.loggers
          init_args: {project: shapes, offline: true}
      callbacks:
        - class_path: EarlyStopping                          # a class name of pytorch_lightning.callbacks
          init_args: {patience: 3}                           # monitor: evaluation.main_metric, mode: max
        - class_path: my_callbacks.SaveSamples               # a class of a module listed under imports:
          init_args: {every_n_epochs: 2}

A dotted ``class_path`` is resolved without importing anything: its module must already be loaded by
``pytorch_lightning`` (``pytorch_lightning.loggers`` / ``pytorch_lightning.callbacks``; the
``lightning.pytorch`` spelling means the same classes), by segkit or a ``segkit.plugins`` entry point,
or by the config's ``imports:`` (a ``.py`` file by its stem). ``init_args`` are checked against the
class's signature before any data is read.

Defaults filled where the class takes the argument and the config does not set it: ``save_dir`` is
``work_dir`` (CSV and TensorBoard write to ``work_dir/logs/version_N`` as segkit's own loggers do, and
share one version number); MLflow's ``tracking_uri`` is ``work_dir/mlflow.db`` (or the file store
``work_dir/mlruns`` without MLflow's database backend); EarlyStopping and ModelCheckpoint monitor
``evaluation.main_metric`` with ``mode: max`` (every segkit metric is better when higher); ModelCheckpoint writes to ``work_dir/checkpoints``. ``CSVLogger`` is segkit's
``RunCSVLogger`` (the same logger; a failed write never leaves ``metrics.csv`` cut short).

A logger or callback object given from Python is used as it is; the config saved with the run
(``config.yaml``, checkpoints) records it as ``{class_path: module.Class}``: its arguments cannot be
read back from an object, so they are not recorded.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning import callbacks as pl_callbacks
from pytorch_lightning import loggers as pl_loggers

from segkit.config import Config
from segkit.errors import ConfigError, did_you_mean
from segkit.registry import check_arguments, loaded_plugin_module

__all__ = ["Spec", "LOGGER_SHORT_NAMES", "logger_specs", "callback_specs", "check_logger_and_callbacks",
           "build_loggers", "build_callbacks", "check_state_keys", "storable_config", "RESERVED_CHECKPOINT_NAMES"]

#: Short names of Lightning's loggers (their class names work as well).
LOGGER_SHORT_NAMES = {"csv": "CSVLogger", "tensorboard": "TensorBoardLogger", "wandb": "WandbLogger",
                      "mlflow": "MLFlowLogger", "comet": "CometLogger"}
#: The packages a logger needs (any one of them), checked before the run starts.
_LOGGER_PACKAGES = {"TensorBoardLogger": ("tensorboard", "tensorboardX"), "WandbLogger": ("wandb",),
                    "MLFlowLogger": ("mlflow",), "CometLogger": ("comet_ml",)}
_EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}
#: Files of ``work_dir/checkpoints`` that segkit writes itself; a user ModelCheckpoint may not write them.
RESERVED_CHECKPOINT_NAMES = ("last", "best", "interrupted")
_SPEC_KEYS = ("class_path", "init_args")
_KINDS = {"logger": (pl_loggers.Logger, pl_loggers, LOGGER_SHORT_NAMES),
          "callback": (pl.Callback, pl_callbacks, {})}
_BASE_NAMES = {"logger": "pytorch_lightning.loggers.Logger", "callback": "pytorch_lightning.Callback"}


@dataclass(frozen=True)
class Spec:
    """One entry of ``trainer.logger`` / ``trainer.callbacks``: the class and its arguments, or an object.

    Attributes:
        key: the dotted config key (``trainer.callbacks[1]``), for messages.
        cls: the resolved class.
        init_args: the arguments the config gives (without segkit's defaults).
        instance: the object itself, when code passed one instead of a spec.
    """

    key: str
    cls: type
    init_args: dict[str, Any] = field(default_factory=dict)
    instance: Any = None


# ------------------------------------------------------------------------------------ reading specs
def logger_specs(value: Any, *, path: str = "trainer.logger") -> list[Spec] | None:
    """The loggers ``trainer.logger`` asks for: ``None`` for segkit's default ones (``true`` or null),
    an empty list for none (``false``, ``[]``).

    Raises:
        ConfigError: at the entry's key: an unknown name, a module not imported, a class that is not
            a Logger, a malformed spec.
    """
    if value is None or value is True:
        return None
    if value is False:
        return []
    return _specs(value, kind="logger", path=path)


def callback_specs(value: Any, *, path: str = "trainer.callbacks") -> list[Spec]:
    """The callbacks ``trainer.callbacks`` asks for (null: none); raises as :func:`logger_specs`."""
    if value is None:
        return []
    return _specs(value, kind="callback", path=path)


def _specs(value: Any, *, kind: str, path: str) -> list[Spec]:
    base = _KINDS[kind][0]
    if isinstance(value, (str, Mapping, base)):
        return [_spec(value, kind=kind, key=path)]
    if not isinstance(value, Sequence):
        raise ConfigError(f"{path.rsplit('.', 1)[-1]} takes {_FORMS[kind]}, got {value!r}", key=path)
    return [_spec(item, kind=kind, key=f"{path}[{i}]") for i, item in enumerate(value)]


_FORMS = {"logger": "true, false, a logger (a short name such as csv, a class name such as WandbLogger, or "
                    "{class_path: ..., init_args: {...}}) or a list of loggers",
          "callback": "a list of callbacks, each a class name such as EarlyStopping or {class_path: ..., "
                      "init_args: {...}}"}


def _spec(item: Any, *, kind: str, key: str) -> Spec:
    base = _KINDS[kind][0]
    if isinstance(item, base):
        return Spec(key, type(item), instance=item)
    if isinstance(item, str):
        return Spec(key, resolve_class(item, kind=kind, key=key))
    if not isinstance(item, Mapping):
        raise ConfigError(f"a {kind} is a name such as {_example(kind)} or {{class_path: ..., init_args: {{...}}}}, "
                          f"got {item!r}", key=key)
    for name in item:
        if name not in _SPEC_KEYS:
            raise ConfigError(f"a {kind} spec has the keys class_path and init_args, not '{name}'."
                              + did_you_mean(str(name), _SPEC_KEYS), key=f"{key}.{name}")
    if not isinstance(item.get("class_path"), str):
        raise ConfigError(f"a {kind} spec needs class_path: a name such as {_example(kind)} or a dotted "
                          f"module.Class, got {item.get('class_path')!r}", key=f"{key}.class_path")
    init_args = item.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        raise ConfigError(f"init_args is a mapping of the class's arguments, got {init_args!r}",
                          key=f"{key}.init_args")
    return Spec(key, resolve_class(item["class_path"], kind=kind, key=f"{key}.class_path"), dict(init_args))


def _example(kind: str) -> str:
    return "csv or WandbLogger" if kind == "logger" else "EarlyStopping"


def _builtins(kind: str) -> dict[str, type]:
    base, package, _ = _KINDS[kind]
    return {name: obj for name in package.__all__ if inspect.isclass(obj := getattr(package, name))
            and issubclass(obj, base) and obj is not base and not inspect.isabstract(obj)}


def resolve_class(name: str, *, kind: str, key: str) -> type:
    """The class a ``class_path`` names (see the module docstring); imports nothing.

    Raises:
        ConfigError: at ``key``, with the nearest names or the fix.
    """
    base, _, short = _KINDS[kind]
    builtins = _builtins(kind)
    if "." not in name:
        found = builtins.get(short.get(name, name))
        if found is None:
            names = [*short, *builtins]
            raise ConfigError(f"unknown {kind} '{name}'." + (did_you_mean(name, names) or f" Lightning's: "
                              f"{', '.join(names)}.") + " A class of your own is given by its dotted class_path "
                              "(module.Class), its module listed under imports:.", key=key)
        return found
    module_name, _, attribute = name.rpartition(".")
    if module_name == "lightning.pytorch" or module_name.startswith("lightning.pytorch."):
        module_name = "pytorch_lightning" + module_name[len("lightning.pytorch"):]  # segkit runs on pytorch_lightning
    lightning = any(module_name == p.__name__ or module_name.startswith(p.__name__ + ".")
                    for p in (pl_loggers, pl_callbacks))
    module = sys.modules.get(module_name) if lightning else loaded_plugin_module(module_name)
    if module is None:
        raise ConfigError(f"class_path '{name}': module '{module_name}' is not imported, and segkit imports code only "
                          f"from a config's imports: and installed plugins (never from a class_path). Add the module "
                          f"to imports: (a dotted module name or a .py path), e.g. imports: [{module_name}].", key=key)
    obj = getattr(module, attribute, None)
    if obj is None:
        classes = [n for n, v in vars(module).items() if inspect.isclass(v) and issubclass(v, base)]
        raise ConfigError(f"module '{module_name}' has no '{attribute}'." + (did_you_mean(attribute, classes) or (
            f" Its {kind} classes: {', '.join(classes)}." if classes else "")), key=key)
    if not (inspect.isclass(obj) and issubclass(obj, base)):
        what = f"a class deriving from {obj.__mro__[1].__name__}" if inspect.isclass(obj) else \
            f"a {type(obj).__name__} object"
        raise ConfigError(f"'{name}' is not a {kind}: a {kind} class derives from {_BASE_NAMES[kind]}, "
                          f"'{attribute}' is {what}.", key=key)
    return obj


# ------------------------------------------------------------------------------------ defaults and checks
def _mlflow_store(work_dir: str) -> str:
    """MLflow's store in ``work_dir``: the SQLite database MLflow 3 recommends (``mlflow.db``) where its
    database backend is installed (``mlflow``), else the file store ``mlruns/`` (``mlflow-skinny``), which
    MLflow 3 only writes when ``MLFLOW_ALLOW_FILE_STORE`` is set: segkit sets it for this default."""
    import importlib.util

    if importlib.util.find_spec("sqlalchemy") is not None and importlib.util.find_spec("alembic") is not None:
        return "sqlite:///" + os.path.join(os.path.abspath(work_dir), "mlflow.db")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return Path(os.path.abspath(work_dir), "mlruns").as_uri()


def _defaults(spec: Spec, *, work_dir: str, main_metric: str) -> dict[str, Any]:
    """segkit's defaults for the arguments of ``spec.cls`` that its config does not set."""
    cls, given = spec.cls, spec.init_args
    defaults: dict[str, Any] = {}
    if issubclass(cls, (pl_loggers.CSVLogger, pl_loggers.TensorBoardLogger)):
        defaults.update(save_dir=work_dir, name="logs", default_hp_metric=False)
    elif issubclass(cls, pl_loggers.MLFlowLogger) and "tracking_uri" not in given:
        defaults["tracking_uri"] = _mlflow_store(work_dir)
    elif issubclass(cls, pl_loggers.Logger):
        defaults["save_dir"] = work_dir
    elif issubclass(cls, (pl_callbacks.EarlyStopping, pl_callbacks.ModelCheckpoint)):
        defaults["monitor"] = main_metric
        if given.get("monitor", main_metric) == main_metric:
            defaults["mode"] = "max"
        if issubclass(cls, pl_callbacks.ModelCheckpoint):
            defaults["dirpath"] = os.path.join(work_dir, "checkpoints")
    named = _parameters(cls)
    return {k: v for k, v in defaults.items() if k in named and k not in given}


def _parameters(cls: type) -> list[str]:
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def check_logger_and_callbacks(trainer: Mapping[str, Any], *, work_dir: str, main_metric: str,
                               path: str = "trainer") -> None:
    """Check ``trainer.logger`` and ``trainer.callbacks`` without building or importing anything.

    Raises:
        ConfigError: at the entry's key (``trainer.callbacks[1].init_args.monitr``).
    """
    loggers = logger_specs(trainer.get("logger", True), path=f"{path}.logger")
    callbacks = callback_specs(trainer.get("callbacks"), path=f"{path}.callbacks")
    for spec in (loggers or []) + callbacks:
        if spec.instance is not None:
            continue
        provided = _defaults(spec, work_dir=work_dir, main_metric=main_metric)
        check_arguments(spec.cls, spec.init_args, path=f"{spec.key}.init_args", type_name=spec.cls.__name__,
                        kind="logger" if issubclass(spec.cls, pl_loggers.Logger) else "callback", provided=provided)
        _check_package(spec)
    for spec in callbacks:
        if issubclass(spec.cls, pl_callbacks.LearningRateMonitor) and loggers == []:
            raise ConfigError("a LearningRateMonitor writes to the loggers, and trainer.logger is false; remove it "
                              "or configure a logger", key=spec.key)
        if issubclass(spec.cls, pl_callbacks.ModelCheckpoint) and spec.instance is None:
            _check_checkpoint_spec(spec, trainer, work_dir=work_dir)


def _check_package(spec: Spec) -> None:
    for name, packages in _LOGGER_PACKAGES.items():
        if issubclass(spec.cls, getattr(pl_loggers, name, ())) and not any(
                importlib.util.find_spec(p) is not None for p in packages):
            extra = _EXTRAS.get(packages[0])
            how = f"pip install {packages[0]}" + (f", or pip install 'segkit-cv[{extra}]'" if extra else "")
            raise ConfigError(f"{name} needs the {packages[0]} package, which is not installed ({how}).",
                              key=spec.key)


def _check_checkpoint_spec(spec: Spec, trainer: Mapping[str, Any], *, work_dir: str) -> None:
    """A ModelCheckpoint of the user's writes extra checkpoints, never segkit's own files."""
    if trainer.get("enable_checkpointing", True) is False:
        raise ConfigError("a ModelCheckpoint needs checkpointing, and trainer.enable_checkpointing is false",
                          key=spec.key)
    own_dir = os.path.abspath(os.path.join(work_dir, "checkpoints"))
    dirpath = spec.init_args.get("dirpath")
    if dirpath is not None and os.path.abspath(str(dirpath)) != own_dir:
        return
    fix = ("segkit writes last.ckpt and best.ckpt itself (engine.keep_best keeps the k best, "
           "engine.checkpoint_every_n_steps writes last.ckpt more often)")
    if spec.init_args.get("save_last"):
        raise ConfigError(f"save_last would overwrite segkit's own last.ckpt in {own_dir}: {fix}. Remove it, or give "
                          f"the callback a dirpath of its own.", key=f"{spec.key}.init_args.save_last")
    filename = str(spec.init_args.get("filename") or "")
    if filename in RESERVED_CHECKPOINT_NAMES or filename.startswith("top-epoch"):
        raise ConfigError(f"filename '{filename}' is one of segkit's own checkpoints in {own_dir}: {fix}. Choose "
                          f"another name.", key=f"{spec.key}.init_args.filename")


# ------------------------------------------------------------------------------------ building
def build_loggers(specs: Sequence[Spec], *, work_dir: str) -> list[pl_loggers.Logger]:
    """The loggers of ``specs``, segkit's defaults filled in; CSV and TensorBoard loggers that write
    to ``work_dir/logs`` share one ``version_N``.

    Raises:
        ConfigError: a class refused its arguments, at the entry's key.
    """
    from segkit.engine.workdir import RunCSVLogger

    loggers: list[pl_loggers.Logger] = []
    version: Any = None
    for spec in specs:
        if spec.instance is not None:
            loggers.append(spec.instance)
            continue
        kwargs = {**_defaults(spec, work_dir=work_dir, main_metric=""), **spec.init_args}
        cls = RunCSVLogger if spec.cls is pl_loggers.CSVLogger else spec.cls
        shared = issubclass(cls, (pl_loggers.CSVLogger, pl_loggers.TensorBoardLogger)) and "version" not in kwargs \
            and os.path.abspath(str(kwargs.get("save_dir"))) == os.path.abspath(work_dir) and kwargs.get("name") == "logs"
        if shared and version is not None:
            kwargs["version"] = version
        logger = _construct(cls, kwargs, spec.key)
        if shared and version is None:
            version = logger.version
        loggers.append(logger)
    return loggers


def build_callbacks(specs: Sequence[Spec], *, work_dir: str, main_metric: str) -> list[pl.Callback]:
    """The callbacks of ``specs``, segkit's defaults filled in (raises as :func:`build_loggers`)."""
    return [spec.instance if spec.instance is not None else
            _construct(spec.cls, {**_defaults(spec, work_dir=work_dir, main_metric=main_metric), **spec.init_args},
                       spec.key)
            for spec in specs]


def check_state_keys(callbacks: Sequence[pl.Callback], user_callbacks: Sequence[pl.Callback],
                      specs: Sequence[Spec]) -> None:
    """Refuse a configured callback (``user_callbacks``, built from ``specs``) that would share its saved
    state with one of segkit's among ``callbacks`` (a ModelCheckpoint that repeats best.ckpt's monitor
    and mode), which Lightning cannot tell apart.

    Raises:
        ConfigError: at the configured callback's key.
    """
    keys = {id(c): spec.key for c, spec in zip(user_callbacks, specs)}
    seen: dict[str, pl.Callback] = {}
    for callback in callbacks:
        first = seen.setdefault(callback.state_key, callback)
        if first is not callback and id(first) in keys and id(callback) not in keys:
            raise ConfigError(f"this {type(first).__name__} keeps the same state as one segkit adds itself "
                              f"({callback.state_key}); segkit already writes best.ckpt by evaluation.main_metric "
                              f"(engine.keep_best keeps the k best). Change its monitor, mode or interval, or remove it.",
                              key=keys[id(first)])


def _construct(cls: type, kwargs: dict[str, Any], key: str) -> Any:
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    try:
        return cls(**kwargs)
    except (TypeError, ValueError, MisconfigurationException) as exc:
        raise ConfigError(f"{cls.__name__} refused its arguments: {exc}", key=f"{key}.init_args") from exc


# ------------------------------------------------------------------------------------ storing
def storable_config(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    """``cfg`` with the logger and callback objects of ``trainer:`` replaced by ``{class_path: module.Class}``
    (what ``config.yaml`` and checkpoints record); ``cfg`` itself when it holds none."""
    trainer = cfg.get("trainer")
    if not isinstance(trainer, Mapping) or not any(_holds_object(trainer.get(k)) for k in ("logger", "callbacks")):
        return cfg
    stored = {k: _describe(v) if k in ("logger", "callbacks") else v for k, v in trainer.items()}
    if isinstance(cfg, Config):
        out = Config(cfg, filename=cfg.filename, origins=cfg.origins, skipped_imports=cfg.skipped_imports)
    else:
        out = dict(cfg)
    out["trainer"] = stored
    return out


def _holds_object(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_holds_object(v) for v in value)
    return isinstance(value, (pl_loggers.Logger, pl.Callback))


def _describe(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, (pl_loggers.Logger, pl.Callback)):
        cls = type(value)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}"}
    return value
