"""Loading torchvision, timm or segkit-native weights, from a local file or by name
(``torchvision://resnet50.IMAGENET1K_V1``), into a ResNet-family backbone."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from segkit.checkpoint import (BACKBONE_INFO_KEY, CheckpointError, extract_state_dict, load_state_dict_checked,
                               read_checkpoint)
from segkit.ops import ModulatedDeformConv2d
from segkit.weight_names import is_weight_name
from segkit.weights import named_backbone_weights
from segkit_plugins.backbones.resnet_weights import CLASSIFIER_PREFIXES, convert_timm_resnet, detect_resnet_format

__all__ = ["PRETRAINED_FORMATS", "load_pretrained", "new_parameter_keys"]

PRETRAINED_FORMATS = ("auto", "torchvision", "timm", "segkit")


def load_pretrained(model: nn.Module, path: str, *, format: str = "auto") -> None:  # noqa: A002
    """Load a local state dict, or the weights a name stands for, into ``model``, ignoring classifier
    keys (``fc.*``, ``last_linear.*``).

    A file is read with ``weights_only=True``; a raw state dict or one under ``state_dict`` or
    ``model`` is accepted. A name (``torchvision://resnet50.IMAGENET1K_V1``,
    ``timm://resnet50c.gluon_in1k``, ``torchvision://maskrcnn_resnet50_fpn`` for its backbone) is
    resolved through its library's cache (:mod:`segkit.weight_names`) and converted; the architecture
    it was made for must be ``model``'s. Missing and unexpected keys are reported with a warning, except
    the keys of :func:`new_parameter_keys` (the offset convolutions of deformable stages), which weights of
    the plain network lack by design and keep their zero initialisation.

    Args:
        model: the backbone; its ``arch`` dict (depth, groups, ...) is compared with the one a
            segkit-native file or a weight name carries.
        path: the file, or a weight name ``SCHEME://NAME``.
        format: ``"torchvision"`` (keys as they are), ``"timm"`` (renamed by
            :func:`~segkit_plugins.backbones.resnet_weights.convert_timm_resnet`), ``"segkit"`` (written by
            ``segkit convert``) or ``"auto"`` (recognised from the file; the only choice for a name).

    Raises:
        ValueError: ``format`` is not one of :data:`PRETRAINED_FORMATS`, or not ``"auto"`` with a name.
        CheckpointError: the file does not exist, is truncated, holds no state dict, describes
            another architecture, shares no key with the model, or a tensor's shape differs from the
            model's (the message names the key, both shapes and the file); a name is unknown, or its
            weights are not cached and cannot be downloaded (the message names the file and the folder).
    """
    if format not in PRETRAINED_FORMATS:
        raise ValueError(f"unknown pretrained_format '{format}'; choose one of {', '.join(PRETRAINED_FORMATS)}")
    if is_weight_name(path):
        if format != "auto":
            raise ValueError(f"pretrained_format '{format}' is for local files; the weight name '{path}' says its "
                             f"format itself: leave pretrained_format at auto")
        converted = named_backbone_weights(path)
        _check_arch(model, converted.config, path, where="the weights")
        state, format = converted.state_dict, "segkit"
    else:
        ckpt = read_checkpoint(path)
        state = extract_state_dict(ckpt)
        if format == "auto":
            format = "segkit" if BACKBONE_INFO_KEY in ckpt else detect_resnet_format(state)
        if format == "segkit":
            _check_arch(model, ckpt.get(BACKBONE_INFO_KEY), path)
        elif format == "timm":
            state = convert_timm_resnet(state)
    _load_checked(model, state, path, format)


def _load_checked(model: nn.Module, state: dict[str, Any], path: str, format: str) -> None:  # noqa: A002
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)}
    own = model.state_dict()
    if state and not any(k in own for k in state):
        raise CheckpointError(
            f"pretrained weights '{path}' share no key with {type(model).__name__}: the file has keys like "
            f"'{next(iter(state))}', the model expects keys like '{next(iter(own))}'. Is it a backbone state dict "
            f"(not a whole detector), and is pretrained_format ('{format}') right?"
        )
    report = load_state_dict_checked(model, state, source=f"pretrained weights '{path}' ({format} format)",
                                     strict=False, hint="check depth, groups, width_per_group, se_reduction, "
                                                        "variant, stem and base_channels")
    # BatchNorm's batch counters are not weights: FrozenBN has none, and files without them are common.
    report = {kind: [k for k in keys if not k.endswith("num_batches_tracked")] for kind, keys in report.items()}
    new = new_parameter_keys(model)
    report["missing"] = [k for k in report["missing"] if k not in new]
    problems = [f"{kind} keys {report[kind]}" for kind in ("missing", "unexpected") if report[kind]]
    if problems:
        warnings.warn(f"loading '{path}' into {type(model).__name__}: " + "; ".join(problems), stacklevel=4)


def new_parameter_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of ``model`` that ImageNet weights of the plain network do not have: the
    offset-and-mask convolutions (``layer2.0.conv2.conv_offset.weight``, ``...bias``) of its
    :class:`~segkit.ops.deform_conv.ModulatedDeformConv2d` layers. A file without them leaves them at
    zero, the layer's initial state; every other missing key is reported."""
    return {f"{name}.conv_offset.{key}" for name, module in model.named_modules()
            if isinstance(module, ModulatedDeformConv2d) for key in module.conv_offset.state_dict()}


def _check_arch(model: nn.Module, info: Any, path: str, *, where: str = "the file") -> None:
    arch = getattr(model, "arch", None)
    if not isinstance(info, dict) or not isinstance(arch, dict):
        return
    differ = [f"{k}={info[k]!r} in {where} but {arch[k]!r} in the model" for k in arch if k in info and info[k] != arch[k]]
    if differ:
        raise CheckpointError(f"pretrained weights '{path}' were made for another architecture: "
                              + "; ".join(differ) + f". Set these backbone options to the values of {where}, or "
                              f"choose weights made for this backbone.")
