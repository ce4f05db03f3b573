"""The optimizer's parameter groups: each trainable parameter's learning rate and weight decay.

Five ``optimizer:`` keys shape them (all optional):

* ``norm_weight_decay``, ``bias_weight_decay``: the weight decay of normalisation layers' parameters and of
  biases (unset: the optimizer's ``weight_decay``);
* ``backbone_lr_mult: 0.1``: a factor on the learning rate of the backbone's parameters (the model's declared
  ``backbone_module()``);
* ``layer_decay: {rate: 0.7}``: layer-wise learning-rate decay (BEiT, MAE, ViTDet): a backbone parameter of layer
  ``k`` gets the factor ``rate ** (num_layers + 1 - k)``, layers numbered by the backbone itself
  (:class:`~segkit.models.base.LayeredBackbone`: the patch embedding 0, block ``i`` ``i + 1``); the rest of the
  model keeps the full rate;
* ``param_overrides: {pos_embed: {weight_decay: 0.0}}``: per-parameter settings for the parameters whose name
  (as ``model.named_parameters()`` gives it, e.g. ``backbone.pos_embed``) contains the pattern: ``lr_mult``, a
  factor on their learning rate, and ``weight_decay``, which replaces every other. Where several patterns match
  a parameter, the longest wins. A pattern that matches no trainable parameter is an error.

A parameter's learning rate is ``lr`` times each factor that applies to it; parameters with the same settings
share a group. Groups come in a fixed order (the rest of the model before the backbone, then by layer and
pattern, the optimizer's weight decay first), so a checkpoint's optimizer state fits the next run's groups; with
any of the last three keys the groups are named (``backbone_layer3_wd0``), so the logged learning rates say
which part they belong to. The schedule scales each group's own rate, so the factors hold throughout training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from segkit.config_types import Bound, check_bounds_of
from segkit.errors import ConfigError, did_you_mean
from segkit.models.base import LayeredBackbone, SegkitModel
from segkit.registry import check_arguments

__all__ = ["GroupOptions", "GROUP_KEYS", "take_group_options", "param_groups", "LAYER_DECAY_BOUNDS",
           "PARAM_OVERRIDE_BOUNDS"]

#: The ``optimizer:`` keys of this module.
GROUP_KEYS = ("norm_weight_decay", "bias_weight_decay", "backbone_lr_mult", "layer_decay", "param_overrides")

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
#: Range of ``layer_decay.rate``.
LAYER_DECAY_BOUNDS = {"rate": Bound(0, 1, low_open=True)}
#: Ranges of the settings of a ``param_overrides`` pattern.
PARAM_OVERRIDE_BOUNDS = {"lr_mult": Bound(0), "weight_decay": Bound(0)}


@dataclass(frozen=True)
class GroupOptions:
    """The ``optimizer:`` keys that shape the parameter groups (see the module docstring)."""

    norm_weight_decay: float | None = None
    bias_weight_decay: float | None = None
    backbone_lr_mult: float | None = None
    layer_decay: float | None = None
    param_overrides: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @property
    def named(self) -> bool:
        """Whether the groups get names (their learning rates differ by part)."""
        return self.backbone_lr_mult is not None or self.layer_decay is not None or bool(self.param_overrides)


def _layer_decay_options(*, rate: float) -> None:
    """The keys of ``optimizer.layer_decay`` (a signature for ``check_arguments``)."""


def _override_options(*, lr_mult: float = 1.0, weight_decay: float | None = None) -> None:
    """The keys of a ``optimizer.param_overrides`` pattern (a signature for ``check_arguments``)."""


def take_group_options(kwargs: dict[str, Any], path: str) -> GroupOptions:
    """Remove the group keys from an ``optimizer:`` section's ``kwargs`` and check them (names, types, ranges).

    Raises:
        ConfigError: at the dotted key, with the allowed values or the nearest valid name.
    """
    norm_wd, bias_wd = kwargs.pop("norm_weight_decay", None), kwargs.pop("bias_weight_decay", None)
    return GroupOptions(norm_wd, bias_wd, _backbone_lr_mult(kwargs.pop("backbone_lr_mult", None), path),
                        _layer_decay(kwargs.pop("layer_decay", None), path),
                        _param_overrides(kwargs.pop("param_overrides", None), path))


def _backbone_lr_mult(value: Any, path: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"backbone_lr_mult is a factor on lr for the backbone's parameters (e.g. 0.1), "
                          f"a number >= 0; got {value!r}", key=f"{path}.backbone_lr_mult")
    return float(value)


def _layer_decay(value: Any, path: str) -> float | None:
    if value is None:
        return None
    key = f"{path}.layer_decay"
    if not isinstance(value, Mapping):
        raise ConfigError(f"layer_decay takes a mapping such as {{rate: 0.7}}, got {value!r}", key=key)
    check_arguments(_layer_decay_options, value, path=key, type_name="layer_decay", kind="option")
    check_bounds_of(value, LAYER_DECAY_BOUNDS, path=key)
    return float(value["rate"])


def _param_overrides(value: Any, path: str) -> dict[str, dict[str, float]]:
    if value is None:
        return {}
    key = f"{path}.param_overrides"
    if not isinstance(value, Mapping):
        raise ConfigError(f"param_overrides maps parts of parameter names to settings, such as "
                          f"{{pos_embed: {{weight_decay: 0.0}}}}; got {value!r}", key=key)
    overrides: dict[str, dict[str, float]] = {}
    for pattern, options in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"a param_overrides pattern is a non-empty part of a parameter name, got {pattern!r}",
                              key=key)
        if not isinstance(options, Mapping) or not options:
            raise ConfigError(f"param_overrides.{pattern} takes lr_mult and/or weight_decay, such as "
                              f"{{weight_decay: 0.0}}; got {options!r}", key=f"{key}.{pattern}")
        check_arguments(_override_options, options, path=f"{key}.{pattern}", type_name=f"param_overrides.{pattern}",
                        kind="option")
        check_bounds_of(options, PARAM_OVERRIDE_BOUNDS, path=f"{key}.{pattern}")
        overrides[pattern] = {k: float(v) for k, v in options.items()}
    return overrides


def param_groups(model: nn.Module, options: GroupOptions, *, base_lr: float,
                 path: str = "optimizer") -> list[dict[str, Any]]:
    """The parameter groups of ``model``'s trainable parameters (see the module docstring).

    Raises:
        ConfigError: the model has no trainable parameter; ``backbone_lr_mult`` or ``layer_decay`` without a
            declared backbone, ``layer_decay`` with a backbone that does not number its layers, a
            ``param_overrides`` pattern that matches no trainable parameter.
    """
    named = _trainable(model)
    if not named:
        raise ConfigError("the model has no trainable parameters (are all stages frozen?)", key="model")
    backbone: set[int] = set()
    if options.backbone_lr_mult is not None:
        backbone = {id(p) for p in _backbone(model, "backbone_lr_mult", path).parameters()}
    layers = _layers(model, path) if options.layer_decay is not None else {}
    if layers:
        backbone |= set(layers)
    matches = _match_overrides(model, named, options.param_overrides, path)
    patterns = sorted(options.param_overrides)
    buckets: dict[tuple[bool, int, str, float | None], list[nn.Parameter]] = {}
    for name, (param, is_norm) in named.items():
        pattern = matches.get(name, "")
        wd = options.param_overrides.get(pattern, {}).get("weight_decay")
        if wd is None and is_norm:
            wd = options.norm_weight_decay
        if wd is None and name.rsplit(".", 1)[-1] == "bias":
            wd = options.bias_weight_decay
        buckets.setdefault((id(param) in backbone, layers.get(id(param), (-1, 0))[0], pattern, wd), []).append(param)
    # a stable sort keeps the first-seen order among groups of equal rank
    order = sorted(buckets, key=lambda k: (k[0], k[1], patterns.index(k[2]) + 1 if k[2] else 0, k[3] is not None))
    return [_group(key, buckets[key], options, layers, base_lr) for key in order]


def _group(key: tuple[bool, int, str, float | None], params: list[nn.Parameter], options: GroupOptions,
           layers: Mapping[int, tuple[int, int]], base_lr: float) -> dict[str, Any]:
    in_backbone, layer, pattern, wd = key
    factor = options.backbone_lr_mult if in_backbone and options.backbone_lr_mult is not None else 1.0
    if layer >= 0:
        num_layers = layers[id(params[0])][1]
        factor *= float(options.layer_decay) ** (num_layers + 1 - layer)
    factor *= options.param_overrides.get(pattern, {}).get("lr_mult", 1.0)
    group: dict[str, Any] = {"params": params}
    if wd is not None:
        group["weight_decay"] = wd
    if options.named:
        if factor != 1.0:
            group["lr"] = base_lr * factor
        group["name"] = ("backbone" if in_backbone else "rest") + (f"_layer{layer}" if layer >= 0 else "") \
            + (f"_{pattern}" if pattern else "") + ("" if wd is None else f"_wd{wd:g}")
    return group


def _trainable(model: nn.Module) -> dict[str, tuple[nn.Parameter, bool]]:
    """``{name: (parameter, in a normalisation layer)}`` of the trainable parameters, each once, in module order."""
    named: dict[str, tuple[nn.Parameter, bool]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                named[f"{module_name}.{name}" if module_name else name] = (param, isinstance(module, _NORM_TYPES))
    return named


def _backbone(model: nn.Module, option: str, path: str) -> nn.Module:
    backbone = model.backbone_module() if isinstance(model, SegkitModel) else None
    if backbone is None:
        raise ConfigError(f"{option} needs a model with a backbone, but {type(model).__name__} declares "
                          f"none (SegkitModel.backbone_module)", key=f"{path}.{option}")
    return backbone


def _layers(model: nn.Module, path: str) -> dict[int, tuple[int, int]]:
    """``{id(parameter): (layer, num_layers)}`` of the backbone's trainable parameters, as the backbone declares."""
    backbone = _backbone(model, "layer_decay", path)
    if not isinstance(backbone, LayeredBackbone):
        raise ConfigError(f"layer_decay needs a backbone that numbers its layers (num_layers and layer_id(name), "
                          f"segkit.models.LayeredBackbone), but the {type(backbone).__name__} backbone declares none; "
                          f"remove layer_decay, or use backbone_lr_mult for one factor on the whole backbone",
                          key=f"{path}.layer_decay")
    num_layers = int(backbone.num_layers)
    layers: dict[int, tuple[int, int]] = {}
    for name, param in backbone.named_parameters():
        if param.requires_grad:
            layer = int(backbone.layer_id(name))
            if not 0 <= layer <= num_layers + 1:
                raise ValueError(f"{type(backbone).__name__}.layer_id('{name}') is {layer}, outside 0..{num_layers + 1}")
            layers[id(param)] = (layer, num_layers)
    return layers


def _match_overrides(model: nn.Module, named: Mapping[str, Any], overrides: Mapping[str, Any],
                     path: str) -> dict[str, str]:
    """``{parameter name: the longest pattern it contains}`` (ties: the first in alphabetical order)."""
    matches: dict[str, str] = {}
    for pattern in sorted(overrides, key=lambda p: (-len(p), p)):
        found = [name for name in named if pattern in name]
        if not found:
            raise ConfigError(_unmatched(model, named, pattern), key=f"{path}.param_overrides.{pattern}")
        for name in found:
            matches.setdefault(name, pattern)
    return matches


def _unmatched(model: nn.Module, named: Mapping[str, Any], pattern: str) -> str:
    frozen = [name for name, _ in model.named_parameters() if pattern in name]
    if frozen:
        return (f"param_overrides pattern '{pattern}' matches only frozen parameters ({frozen[0]}, ...), which the "
                f"optimizer does not train; remove it or unfreeze them")
    parts = {".".join(pieces[i:j]) for name in named for pieces in [name.split(".")]
             for i in range(len(pieces)) for j in range(i + 1, len(pieces) + 1)}
    return (f"param_overrides pattern '{pattern}' is in no trainable parameter's name (names such as "
            f"'{next(iter(named))}')." + did_you_mean(pattern, sorted(parts)))
