"""Every value of a run's config checked before any data is read or any model is built.

:func:`check_run_config` runs at the start of ``segkit train`` and ``segkit eval`` (and of
:func:`segkit.engine.runner.train` / ``evaluate``), and ``segkit config --check`` runs it alone. A
mistake found here costs a second, not an epoch: each ``ConfigError`` names the dotted key, the file
that set it, the allowed values and the value found.

What is checked: the kind of every section (a mapping, a list, a string...); ``seed``; the ``data:``
loader settings and each split's dataset type and arguments (:func:`~segkit.engine.datamodule.check_data_config`);
``optimizer:`` and ``scheduler:`` (:func:`~segkit.engine.optim.check_optimizer_config`,
:func:`~segkit.engine.optim.check_scheduler_config`); ``trainer:`` (every ``pytorch_lightning.Trainer``
option's name and type, the ranges of :data:`TRAINER_BOUNDS`, an accelerator that exists on this
machine, devices and strategy; when training, the logger and callback specs, their classes and
arguments, see :mod:`segkit.engine.loggers`); ``engine:``; ``evaluation:`` (the evaluator's type, arguments, and that
``main_metric`` is one of the metrics it declares by a ``metric_names(**options)`` classmethod). Component arguments of ``model:`` are checked when the model
is built, which comes before any data is read.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from segkit.config import config_errors
from segkit.config_types import Bound, check_bounds_of, is_integer
from segkit.errors import ConfigError, did_you_mean

__all__ = ["check_run_config", "check_data_section", "check_trainer_config", "check_evaluation_config", "TRAINER_BOUNDS", "SEED_BOUND",
           "SECTION_KINDS"]

#: The seeds numpy and Lightning accept.
SEED_BOUND = Bound(0, 2**32 - 1, integer=True)

#: What each top-level section must be: a description and a test.
SECTION_KINDS: dict[str, tuple[str, Any]] = {
    "model": ("a mapping with a 'type' key", lambda v: isinstance(v, Mapping)),
    "data": ("a mapping (batch_size, train, val, ...)", lambda v: isinstance(v, Mapping)),
    "optimizer": ("a mapping such as {type: SGD, lr: 0.02}", lambda v: v is None or isinstance(v, Mapping)),
    "scheduler": ("a mapping such as {type: MultiStep, milestones: [8, 11]} or null",
                  lambda v: v is None or isinstance(v, Mapping)),
    "trainer": ("a mapping of pytorch_lightning.Trainer options or null", lambda v: v is None or isinstance(v, Mapping)),
    "evaluation": ("a mapping such as {type: CocoEvaluator, main_metric: bbox/AP} or null",
                   lambda v: v is None or isinstance(v, Mapping)),
    "engine": ("a mapping or null", lambda v: v is None or isinstance(v, Mapping)),
    "checkpoint": ("a mapping or null", lambda v: v is None or isinstance(v, Mapping)),
    "imports": ("a list of module names or .py paths", lambda v: v is None or isinstance(v, (list, str))),
    "work_dir": ("a folder path (text) or null", lambda v: v is None or (isinstance(v, str) and v.strip() != "")),
}

#: Ranges of the ``trainer:`` options (Lightning's own meaning of each value).
TRAINER_BOUNDS = {
    "max_epochs": Bound(-1, integer=True, nullable=True, meaning="-1: no limit"),
    "min_epochs": Bound(0, integer=True, nullable=True),
    "max_steps": Bound(-1, integer=True, meaning="-1: no limit"),
    "min_steps": Bound(0, integer=True, nullable=True),
    "num_nodes": Bound(1, integer=True),
    "accumulate_grad_batches": Bound(1, integer=True),
    "check_val_every_n_epoch": Bound(1, integer=True, nullable=True),
    "log_every_n_steps": Bound(1, integer=True, nullable=True),
    "num_sanity_val_steps": Bound(-1, integer=True, nullable=True, meaning="-1: all batches"),
    "gradient_clip_val": Bound(0, nullable=True),
    "reload_dataloaders_every_n_epochs": Bound(0, integer=True),
}
# Batch limits and the validation interval: a count of batches (integer) or a fraction (number).
_FRACTION_OR_COUNT = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                      "overfit_batches", "val_check_interval")


def check_run_config(cfg: Mapping[str, Any], *, training: bool = True, trainer: bool = True) -> None:
    """Check every value a run reads, before any data is read or any model built.

    Args:
        cfg: the merged config (a :class:`~segkit.config.Config`, so errors name the file).
        training: also check what only training reads (``optimizer``, ``scheduler``, ``engine``).
        trainer: also check the ``trainer:`` section (``segkit bench`` chooses its device itself).

    Raises:
        ConfigError: the first problem found, at its dotted key and file.
    """
    from segkit.engine.callbacks import engine_options
    from segkit.engine.datamodule import check_data_config
    from segkit.engine.optim import check_optimizer_config, check_scheduler_config

    with config_errors(cfg):
        _check_sections(cfg)
        if "seed" in cfg:
            problem = SEED_BOUND.problem(cfg["seed"])
            if problem:
                raise ConfigError(f"seed {problem}", key="seed")
        if not isinstance(cfg.get("model"), Mapping) or "type" not in cfg["model"]:
            raise ConfigError("the config has no model (a 'model:' section with a 'type' key)", key="model")
        check_data_config(cfg.get("data") or {})
        if trainer:
            check_trainer_config(cfg.get("trainer") or {})
        check_evaluation_config(cfg.get("evaluation") or {}, default_type=_default_evaluator(cfg["model"]))
        if trainer and training:
            from segkit.engine.loggers import check_logger_and_callbacks
            from segkit.engine.runner import DEFAULT_MAIN_METRIC, resolve_work_dir

            main_metric = str((cfg.get("evaluation") or {}).get("main_metric", DEFAULT_MAIN_METRIC))
            check_logger_and_callbacks(cfg.get("trainer") or {}, work_dir=resolve_work_dir(cfg), main_metric=main_metric)
        if training:
            check_optimizer_config(cfg.get("optimizer") or {"type": "SGD", "lr": 0.01})
            check_scheduler_config(cfg.get("scheduler"))
            engine_options(cfg)


def check_data_section(cfg: Mapping[str, Any]) -> None:
    """Check only what reading a config's data needs (``segkit data check`` / ``show``): the sections'
    kinds and the ``data:`` section.

    Raises:
        ConfigError: the first problem found, at its dotted key and file.
    """
    from segkit.engine.datamodule import check_data_config

    with config_errors(cfg):
        _check_sections(cfg)
        check_data_config(cfg.get("data") or {})


def _check_sections(cfg: Mapping[str, Any]) -> None:
    for name, (description, fits) in SECTION_KINDS.items():
        if name in cfg and not fits(cfg[name]):
            raise ConfigError(f"{name} must be {description}, got {_short(cfg[name])}", key=name)


def check_trainer_config(trainer: Mapping[str, Any], *, path: str = "trainer") -> None:
    """Check a ``trainer:`` section: option names and types (Lightning's signature), ranges, and an
    accelerator, devices and strategy that this machine and Lightning have. ``logger`` and
    ``callbacks`` hold specs, which only training reads: :func:`~segkit.engine.loggers.check_logger_and_callbacks`.

    Raises:
        ConfigError: at the dotted key, with the allowed values.
    """
    import pytorch_lightning as pl

    from segkit.registry import check_arguments

    options = {k: v for k, v in trainer.items() if k not in ("logger", "callbacks")}
    check_arguments(pl.Trainer, options, path=path, type_name="Trainer", kind="section")
    check_bounds_of(trainer, TRAINER_BOUNDS, path=path)
    for key in _FRACTION_OR_COUNT:
        value = trainer.get(key)
        if value is not None and Bound(0, integer=True).problem(value) and Bound(0, 1).problem(value):
            raise ConfigError(f"{key} is a number of batches (an integer >= 0) or a fraction of them (a number in "
                              f"[0, 1]), got {value!r}", key=f"{path}.{key}")
    accelerator = trainer.get("accelerator", "cpu")
    if isinstance(accelerator, str):
        _check_accelerator(accelerator, path)
        _check_devices(trainer.get("devices", 1), accelerator, path)
    strategy = trainer.get("strategy")
    if isinstance(strategy, str):
        from pytorch_lightning.strategies import StrategyRegistry

        known = ["auto", *StrategyRegistry.available_strategies()]
        if strategy not in known:
            raise ConfigError(f"unknown strategy '{strategy}'." + (did_you_mean(strategy, known) or
                              f" Strategies: {', '.join(known)}."), key=f"{path}.strategy")


def _available_accelerators() -> dict[str, bool]:
    """Lightning's accelerator names (and ``gpu``, ``auto``) and whether each can run here."""
    from pytorch_lightning.accelerators import AcceleratorRegistry

    available = {name: bool(AcceleratorRegistry[name]["accelerator"].is_available())
                 for name in AcceleratorRegistry.available_accelerators()}
    available["gpu"] = available.get("cuda", False) or available.get("mps", False)
    available["auto"] = True
    return available


def _check_accelerator(accelerator: str, path: str) -> None:
    available = _available_accelerators()
    if accelerator not in available:
        raise ConfigError(f"unknown accelerator '{accelerator}'." + (did_you_mean(accelerator, available) or
                          f" Accelerators: {', '.join(sorted(available))}."), key=f"{path}.accelerator")
    if not available[accelerator]:
        here = ", ".join(sorted(name for name, ok in available.items() if ok))
        raise ConfigError(f"accelerator '{accelerator}' is not available on this machine (no device of that kind is "
                          f"visible to PyTorch); this machine has: {here}. Use trainer.accelerator=cpu (or auto).",
                          key=f"{path}.accelerator")


def _check_devices(devices: Any, accelerator: str, path: str) -> None:
    """``devices``: a positive count, -1 or 'auto' (all), a list of device indices, or such text."""
    if devices in ("auto", -1, "-1"):
        return
    if isinstance(devices, str):
        try:
            devices = [int(d) for d in devices.split(",") if d.strip()] if "," in devices else int(devices)
        except ValueError:
            devices = None
    fits = (is_integer(devices) and devices >= 1) or (
        isinstance(devices, (list, tuple)) and devices and all(is_integer(d) and d >= 0 for d in devices))
    if not fits:
        raise ConfigError(f"devices is a number of devices (an integer >= 1), -1 or 'auto' for all, or a list of "
                          f"device indices; got {devices!r}", key=f"{path}.devices")
    if accelerator in ("gpu", "cuda"):
        import torch

        count = torch.cuda.device_count()
        wanted = max(devices) + 1 if isinstance(devices, (list, tuple)) else devices
        if wanted > count:
            raise ConfigError(f"devices asks for {devices!r} but this machine has {count} CUDA device(s).",
                              key=f"{path}.devices")


def _default_evaluator(model: Mapping[str, Any]) -> str:
    """The evaluator type the model class declares for an ``evaluation`` section that names none.

    Raises:
        ConfigError: an unknown model type, or one that does not implement the model contract.
    """
    from segkit.models.base import check_model_class
    from segkit.registry import MODELS

    return check_model_class(MODELS.get(str(model["type"]), key="model.type")).default_evaluator


def check_evaluation_config(evaluation: Mapping[str, Any], *, path: str = "evaluation",
                            default_type: str = "CocoEvaluator") -> None:
    """Check an ``evaluation:`` section without its dataset: the evaluator type (``default_type``, the
    model's, when the section names none), its arguments, the interval, and that ``main_metric`` is
    among the metrics the evaluator declares.

    Raises:
        ConfigError: at the dotted key, with the allowed values.
    """
    from segkit.engine.module import EVALUATION_RESERVED_KEYS
    from segkit.engine.runner import DEFAULT_MAIN_METRIC
    from segkit.registry import EVALUATORS, check_arguments

    kwargs = {k: v for k, v in evaluation.items() if k not in (*EVALUATION_RESERVED_KEYS, "type")}
    type_name = evaluation.get("type", default_type)
    evaluator = EVALUATORS.get(type_name, key=f"{path}.type")
    check_arguments(evaluator, kwargs, path=path, type_name=str(type_name), kind="evaluator", provided=("dataset",))
    check_bounds_of(evaluation, {"interval": Bound(1, integer=True)}, path=path)
    main_metric = evaluation.get("main_metric", DEFAULT_MAIN_METRIC)
    given = "" if "main_metric" in evaluation else f" (the default; set {path}.main_metric)"
    if not isinstance(main_metric, str):
        raise ConfigError(f"main_metric is the name of a metric (text such as bbox/AP), got {main_metric!r}",
                          key=f"{path}.main_metric")
    declared = getattr(evaluator, "metric_names", None)
    try:
        names = list(declared(**kwargs)) if callable(declared) else None
    except ValueError as exc:  # the evaluator refuses these options
        raise ConfigError(str(exc), key=path) from exc
    if names is not None and not any(fnmatch.fnmatchcase(main_metric, name) for name in names):
        raise ConfigError(f"main_metric '{main_metric}'{given} is not a metric of {type_name}, which reports "
                          f"{', '.join(names)}." + did_you_mean(main_metric, names), key=f"{path}.main_metric")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
