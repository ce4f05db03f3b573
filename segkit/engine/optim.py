"""Optimizers and learning-rate schedules built from the ``optimizer:`` and ``scheduler:`` sections.

``optimizer: {type: SGD, lr: 0.02, momentum: 0.9, weight_decay: 1.0e-4}`` builds any
``torch.optim`` optimizer by name (arguments checked against its signature). Two extra keys shape
parameter groups: ``norm_weight_decay`` and ``bias_weight_decay`` (weight decay for normalisation
layers' parameters and for biases; unset means the optimizer's own ``weight_decay``). Optimizers
that have a fused implementation (SGD, Adam, AdamW, Adagrad) use it when every parameter is a
float tensor on the CPU or a CUDA device (several times faster on the CPU than the per-tensor
loop); ``fused: false`` or an explicit ``foreach`` turns that off.

``scheduler:`` is applied every iteration as a factor on the base learning rate:

* ``type``: ``MultiStep`` (``milestones``, ``gamma``), ``Cosine`` (``min_lr_ratio``), ``Poly``
  (``power``, ``min_lr_ratio``), ``Constant``; ``by_epoch: true`` reads ``milestones`` in epochs,
  otherwise in iterations;
* ``warmup``: ``linear``, ``constant`` or ``null`` for ``warmup_iters`` iterations starting at
  ``warmup_ratio`` × the base rate.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from segkit.errors import ConfigError, did_you_mean
from segkit.registry import check_arguments

__all__ = ["build_optimizer", "LRSchedule", "build_scheduler", "SCHEDULE_TYPES"]

SCHEDULE_TYPES = ("MultiStep", "Cosine", "Poly", "Constant")
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _optimizer_classes() -> dict[str, type]:
    return {
        name: obj for name in dir(torch.optim)
        if isinstance(obj := getattr(torch.optim, name), type) and issubclass(obj, torch.optim.Optimizer)
        and obj is not torch.optim.Optimizer
    }


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any], *, path: str = "optimizer") -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg["type"]`` over the trainable parameters of ``model``."""
    kwargs = dict(cfg)
    name = kwargs.pop("type", "SGD")
    classes = _optimizer_classes()
    if name not in classes:
        raise ConfigError(f"unknown optimizer '{name}'." + did_you_mean(str(name), classes), key=f"{path}.type")
    norm_wd = kwargs.pop("norm_weight_decay", None)
    bias_wd = kwargs.pop("bias_weight_decay", None)
    check_arguments(classes[name], {"params": None, **kwargs}, path=path, type_name=name, kind="optimizer")
    groups = _param_groups(model, norm_wd, bias_wd)
    if "fused" not in kwargs and "foreach" not in kwargs and _can_fuse(classes[name], groups):
        kwargs["fused"] = True
    return classes[name](groups, **kwargs)


def _can_fuse(optimizer: type, groups: list[dict[str, Any]]) -> bool:
    if "fused" not in inspect.signature(optimizer).parameters:
        return False
    params = [p for group in groups for p in group["params"]]
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def _param_groups(model: nn.Module, norm_wd: float | None, bias_wd: float | None) -> list[dict[str, Any]]:
    default: list[nn.Parameter] = []
    special: dict[float, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, _NORM_TYPES)
        for pname, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            wd = norm_wd if is_norm and norm_wd is not None else None
            if wd is None and pname == "bias" and bias_wd is not None:
                wd = bias_wd
            (special.setdefault(wd, []) if wd is not None else default).append(param)
    groups: list[dict[str, Any]] = [{"params": default}] if default else []
    groups += [{"params": params, "weight_decay": wd} for wd, params in special.items()]
    if not groups:
        raise ConfigError("the model has no trainable parameters (are all stages frozen?)", key="model")
    return groups


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
    kwargs = dict(cfg or {})
    check_arguments(LRSchedule, {"total_iters": 0, "iters_per_epoch": 0, **kwargs}, path=path,
                    type_name="scheduler", kind="scheduler")
    schedule = LRSchedule(total_iters=total_iters, iters_per_epoch=iters_per_epoch, **kwargs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
