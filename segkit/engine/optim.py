"""Optimizers and learning-rate schedules built from the ``optimizer:`` and ``scheduler:`` sections.

``optimizer: {type: SGD, lr: 0.02, momentum: 0.9, weight_decay: 1.0e-4}`` builds any
``torch.optim`` optimizer by name (arguments checked against its signature). Extra keys shape the
parameter groups (:mod:`segkit.engine.param_groups`): ``norm_weight_decay`` and ``bias_weight_decay``
(weight decay for normalisation layers' parameters and for biases; unset means the optimizer's own
``weight_decay``), ``backbone_lr_mult``, ``layer_decay: {rate: 0.7}`` (layer-wise learning-rate decay
over a backbone that numbers its layers) and ``param_overrides: {pos_embed: {weight_decay: 0.0}}``
(learning-rate factor and weight decay by parameter name). Optimizers
that have a fused implementation (SGD, Adam, AdamW, Adagrad) use it when every parameter is a
float tensor on the CPU or a CUDA device (several times faster on the CPU than the per-tensor
loop), except with gradient clipping under mixed precision, which Lightning cannot do for an
optimizer that unscales its own gradients; ``fused: false`` or an explicit ``foreach`` turns it off.

``backbone_lr_mult: 0.1`` trains the parameters of ``model.backbone`` at ``lr × 0.1`` (combined
with the other keys: a backbone BatchNorm weight gets both the reduced rate and ``norm_weight_decay``,
a ViT block's rate is ``lr × 0.1 × rate ** (depth - block)`` with ``layer_decay``). ``auto_scale_lr: {base_batch_size: 16}`` applies the linear scaling rule:
``lr`` is multiplied by the images one optimizer step sees (``data.batch_size`` per process × the
number of processes over all nodes × ``trainer.accumulate_grad_batches``) divided by
``base_batch_size``, the batch the configured ``lr`` was tuned for. It is off unless given
(``enable: false`` also turns it off); the scaled rate is printed once when training starts.

``scheduler:`` is applied every iteration as a factor on the base learning rate:

* ``type``: ``MultiStep`` (``milestones``, ``gamma``), ``Cosine`` (``min_lr_ratio``), ``Poly``
  (``power``, ``min_lr_ratio``), ``Constant``; ``by_epoch: true`` reads ``milestones`` in epochs,
  otherwise in iterations;
* ``warmup``: ``linear``, ``constant`` or ``null`` for ``warmup_iters`` iterations starting at
  ``warmup_ratio`` × the base rate.

The factor applies to each parameter group's own rate (``LambdaLR`` keeps every group's ``initial_lr``),
so the per-group factors above hold at every step of the schedule.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from segkit.config_types import Bound, check_bounds_of
from segkit.engine.param_groups import GROUP_KEYS, param_groups, take_group_options
from segkit.errors import ConfigError, did_you_mean
from segkit.registry import check_arguments

__all__ = ["build_optimizer", "BatchSize", "scale_lr", "fused_allowed", "LRSchedule", "build_scheduler",
           "SCHEDULE_TYPES", "OPTIMIZER_BOUNDS", "SCHEDULER_BOUNDS", "check_optimizer_config", "check_scheduler_config"]

SCHEDULE_TYPES = ("MultiStep", "Cosine", "Poly", "Constant")


def _optimizer_classes() -> dict[str, type]:
    return {
        name: obj for name in dir(torch.optim)
        if isinstance(obj := getattr(torch.optim, name), type) and issubclass(obj, torch.optim.Optimizer)
        and obj is not torch.optim.Optimizer
    }


class BatchSize(NamedTuple):
    """The images one optimizer step sees: ``per_process × processes × accumulate``.

    Args:
        per_process: ``data.batch_size``, the images each process loads per step.
        processes: training processes over all nodes (``trainer.devices × trainer.num_nodes``).
        accumulate: ``trainer.accumulate_grad_batches``.
    """

    per_process: int
    processes: int = 1
    accumulate: int = 1

    @property
    def total(self) -> int:
        return self.per_process * self.processes * self.accumulate

    def __str__(self) -> str:
        return (f"{self.total} = {self.per_process} per process x {self.processes} process(es) x "
                f"{self.accumulate} accumulated")

    @classmethod
    def of_trainer(cls, trainer: Any) -> BatchSize | None:
        """The batch of a ``pytorch_lightning.Trainer`` running a segkit datamodule (``None`` without one)."""
        per_process = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        if not isinstance(per_process, int):
            return None
        return cls(per_process, int(trainer.world_size), int(trainer.accumulate_grad_batches))


def fused_allowed(trainer: Any) -> bool:
    """Whether ``trainer`` can step a fused optimizer: Lightning's mixed precision refuses to clip the
    gradients of an optimizer that unscales them inside its step (fused Adam, AdamW, SGD)."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    clipping = (getattr(trainer, "gradient_clip_val", None) or 0) > 0
    return not (clipping and isinstance(getattr(trainer, "precision_plugin", None), MixedPrecision))


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any], *, path: str = "optimizer",
                    batch_size: BatchSize | None = None, allow_fused: bool = True) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg["type"]`` over the trainable parameters of ``model``.

    Args:
        model: the model; with ``backbone_lr_mult`` or ``layer_decay`` it must declare a backbone
            (``SegkitModel.backbone_module``), with ``layer_decay`` one that numbers its layers
            (:class:`~segkit.models.base.LayeredBackbone`).
        cfg: the ``optimizer:`` section (see the module docstring for the extra keys).
        path: the section's dotted name, for error messages.
        batch_size: the batch one step sees; needed by ``auto_scale_lr``.
        allow_fused: use a fused implementation when there is one (unless ``cfg`` decides).

    Raises:
        ConfigError: an unknown optimizer or argument, a bad ``backbone_lr_mult``, ``layer_decay``,
            ``param_overrides`` or ``auto_scale_lr`` (a pattern that matches no trainable parameter, a
            backbone that does not number its layers).

    Example:
        >>> build_optimizer(model, {"type": "AdamW", "lr": 1e-4, "weight_decay": 0.1, "layer_decay": {"rate": 0.7},
        ...                         "param_overrides": {"pos_embed": {"weight_decay": 0.0}}})
    """
    check_optimizer_config(cfg, path=path)
    kwargs = dict(cfg)
    name = kwargs.pop("type", "SGD")
    classes = _optimizer_classes()
    options = take_group_options(kwargs, path)
    auto_scale = kwargs.pop("auto_scale_lr", None)
    base_lr = kwargs.get("lr", _default_lr(classes[name]))
    if _auto_scale_enabled(auto_scale, path):
        kwargs["lr"] = base_lr = scale_lr(base_lr, auto_scale, batch_size, path=path)
    groups = param_groups(model, options, base_lr=base_lr, path=path)
    if allow_fused and "fused" not in kwargs and "foreach" not in kwargs and _can_fuse(classes[name], groups):
        kwargs["fused"] = True
    return classes[name](groups, **kwargs)


#: Ranges of the optimizer arguments that torch's optimizers share (each optimizer takes some of them).
OPTIMIZER_BOUNDS = {
    "lr": Bound(0, low_open=True),
    "weight_decay": Bound(0),
    "momentum": Bound(0, 1),
    "dampening": Bound(0, 1),
    "eps": Bound(0),
    "alpha": Bound(0),
    "rho": Bound(0, 1),
    "lr_decay": Bound(0),
    "initial_accumulator_value": Bound(0),
    "momentum_decay": Bound(0),
    "norm_weight_decay": Bound(0, nullable=True),
    "bias_weight_decay": Bound(0, nullable=True),
}


def check_optimizer_config(cfg: Mapping[str, Any], *, path: str = "optimizer") -> None:
    """Check an ``optimizer:`` section without a model: the type, every argument's name and type,
    the ranges of :data:`OPTIMIZER_BOUNDS`, ``betas`` and segkit's extra keys (those of
    :mod:`segkit.engine.param_groups` with their own ranges, and ``auto_scale_lr``).

    Raises:
        ConfigError: at the dotted key, with the allowed values.
    """
    kwargs = dict(cfg)
    name = kwargs.pop("type", "SGD")
    classes = _optimizer_classes()
    if name not in classes:
        raise ConfigError(f"unknown optimizer '{name}'." + did_you_mean(str(name), classes), key=f"{path}.type")
    arguments = dict(kwargs)
    take_group_options(arguments, path)
    _auto_scale_enabled(arguments.pop("auto_scale_lr", None), path)
    own = inspect.signature(classes[name]).parameters
    for key in arguments:  # a misspelt segkit key is suggested as such (the optimizer's own names come next)
        hint = did_you_mean(str(key), (*GROUP_KEYS, "auto_scale_lr"))
        if key not in own and hint:
            raise ConfigError(f"{name} (optimizer) has no argument '{key}', nor is it one of segkit's optimizer "
                              f"keys." + hint, key=f"{path}.{key}")
    check_arguments(classes[name], arguments, path=path, type_name=name, kind="optimizer", provided=("params",))
    check_bounds_of(kwargs, OPTIMIZER_BOUNDS, path=path)
    betas = kwargs.get("betas")
    if betas is not None and (not isinstance(betas, (list, tuple)) or len(betas) != 2
                              or any(Bound(0, 1, high_open=True).problem(b) for b in betas)):
        raise ConfigError(f"betas are two averaging factors in [0, 1), e.g. [0.9, 0.999]; got {betas!r}",
                          key=f"{path}.betas")


def check_scheduler_config(cfg: Mapping[str, Any] | None, *, path: str = "scheduler") -> None:
    """Check a ``scheduler:`` section without an optimizer (the checks :class:`LRSchedule` makes).

    Raises:
        ConfigError: at the dotted key, with the allowed values.
    """
    LRSchedule(total_iters=1, iters_per_epoch=1, **_schedule_arguments(cfg, path))


def _schedule_arguments(cfg: Mapping[str, Any] | None, path: str) -> dict[str, Any]:
    kwargs = dict(cfg or {})
    check_arguments(LRSchedule, kwargs, path=path, type_name="scheduler", kind="scheduler",
                    provided=("total_iters", "iters_per_epoch"))
    return kwargs


def _auto_scale_options(*, base_batch_size: int, enable: bool = True) -> None:
    """The keys of ``optimizer.auto_scale_lr`` (a signature for ``check_arguments``)."""


def _auto_scale_enabled(value: Any, path: str) -> bool:
    if value is None or value is False:
        return False
    if not isinstance(value, Mapping):
        raise ConfigError(f"auto_scale_lr takes a mapping such as {{base_batch_size: 16}}, got {value!r}",
                          key=f"{path}.auto_scale_lr")
    check_arguments(_auto_scale_options, value, path=f"{path}.auto_scale_lr", type_name="auto_scale_lr",
                    kind="option")
    base = value["base_batch_size"]
    if isinstance(base, bool) or not isinstance(base, int) or base < 1:
        raise ConfigError(f"base_batch_size is the batch the configured lr was tuned for, a positive integer; "
                          f"got {base!r}", key=f"{path}.auto_scale_lr.base_batch_size")
    if not isinstance(value.get("enable", True), bool):
        raise ConfigError(f"enable must be true or false, got {value['enable']!r}", key=f"{path}.auto_scale_lr.enable")
    return bool(value.get("enable", True))


def scale_lr(lr: float, options: Mapping[str, Any], batch_size: BatchSize | None, *, path: str = "optimizer") -> float:
    """The linear scaling rule: ``lr × batch_size.total / options["base_batch_size"]`` (printed once).

    Raises:
        ConfigError: when the batch size is unknown (a model trained without a segkit datamodule).
    """
    if batch_size is None:
        raise ConfigError("auto_scale_lr needs the training batch size, which is known only when training with "
                          "segkit's data section (data.batch_size); remove auto_scale_lr or set lr yourself",
                          key=f"{path}.auto_scale_lr")
    base = int(options["base_batch_size"])
    scaled = float(lr) * batch_size.total / base
    from pytorch_lightning.utilities.rank_zero import rank_zero_info

    rank_zero_info(f"{path}.auto_scale_lr: lr {float(lr):g} x {batch_size.total} / {base} = {scaled:g} "
                   f"(batch {batch_size}; base_batch_size {base})")
    return scaled


def _default_lr(optimizer: type) -> float:
    param = inspect.signature(optimizer).parameters.get("lr")
    return float(param.default) if param is not None and isinstance(param.default, (int, float)) else 1e-3


def _can_fuse(optimizer: type, groups: list[dict[str, Any]]) -> bool:
    if "fused" not in inspect.signature(optimizer).parameters:
        return False
    params = [p for group in groups for p in group["params"]]
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


#: Ranges of the ``scheduler:`` values.
SCHEDULER_BOUNDS = {
    "gamma": Bound(0, low_open=True),
    "min_lr_ratio": Bound(0, 1),
    "power": Bound(0),
    "warmup_iters": Bound(0, integer=True),
    "warmup_ratio": Bound(0, 1),
}


class LRSchedule:
    """Learning-rate factor as a function of the iteration (picklable, for ``LambdaLR``)."""

    def __init__(self, *, total_iters: int, iters_per_epoch: int, type: str = "Constant",
                 milestones: Iterable[int] = (), gamma: float = 0.1, by_epoch: bool = True,
                 min_lr_ratio: float = 0.0, power: float = 1.0, warmup: str | None = "linear",
                 warmup_iters: int = 0, warmup_ratio: float = 0.001) -> None:
        if type not in SCHEDULE_TYPES:
            raise ConfigError(f"unknown scheduler type '{type}'." + did_you_mean(type, SCHEDULE_TYPES),
                              key="scheduler.type")
        if warmup not in ("linear", "constant", None):
            raise ConfigError(f"warmup must be 'linear', 'constant' or null, got {warmup!r}", key="scheduler.warmup")
        check_bounds_of({"gamma": gamma, "min_lr_ratio": min_lr_ratio, "power": power, "warmup_iters": warmup_iters,
                         "warmup_ratio": warmup_ratio}, SCHEDULER_BOUNDS, path="scheduler")
        if not isinstance(milestones, (list, tuple)) or any(Bound(0, integer=True).problem(m) for m in milestones):
            raise ConfigError(f"milestones is a list of epochs (or iterations with by_epoch: false), integers >= 0; "
                              f"got {milestones!r}", key="scheduler.milestones")
        self.type = type
        self.total_iters = max(1, int(total_iters))
        scale = max(1, iters_per_epoch) if by_epoch else 1
        self.milestones = sorted(int(m) * scale for m in milestones)
        self.gamma = gamma
        self.min_lr_ratio = min_lr_ratio
        self.power = power
        self.warmup = warmup
        self.warmup_iters = int(warmup_iters) if warmup else 0
        self.warmup_ratio = warmup_ratio

    def __call__(self, it: int) -> float:
        factor = self._main(it)
        if it < self.warmup_iters:
            if self.warmup == "constant":
                factor *= self.warmup_ratio
            else:
                alpha = it / self.warmup_iters
                factor *= self.warmup_ratio * (1 - alpha) + alpha
        return factor

    def _main(self, it: int) -> float:
        progress = min(it, self.total_iters) / self.total_iters
        if self.type == "MultiStep":
            return self.gamma ** sum(it >= m for m in self.milestones)
        if self.type == "Cosine":
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.type == "Poly":
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * (1 - progress) ** self.power
        return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any] | None, *, total_iters: int,
                    iters_per_epoch: int, path: str = "scheduler") -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration ``LambdaLR`` following :class:`LRSchedule`."""
    schedule = LRSchedule(total_iters=total_iters, iters_per_epoch=iters_per_epoch, **_schedule_arguments(cfg, path))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
