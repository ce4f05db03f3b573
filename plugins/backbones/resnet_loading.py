"""Loading local torchvision, timm or segkit-native weights into a ResNet-family backbone."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from segkit.checkpoint import (BACKBONE_INFO_KEY, CheckpointError, extract_state_dict, load_state_dict_checked,
                               read_checkpoint)
from segkit_plugins.backbones.resnet_weights import CLASSIFIER_PREFIXES, convert_timm_resnet, detect_resnet_format

__all__ = ["PRETRAINED_FORMATS", "load_pretrained"]

PRETRAINED_FORMATS = ("auto", "torchvision", "timm", "segkit")


def load_pretrained(model: nn.Module, path: str, *, format: str = "auto") -> None:  # noqa: A002
    """Load a local state dict into ``model``, ignoring classifier keys (``fc.*``, ``last_linear.*``).

    The file is read with ``weights_only=True``; a raw state dict or one under ``state_dict`` or
    ``model`` is accepted. Missing and unexpected keys are reported with a warning.

    Args:
        model: the backbone; its ``arch`` dict (depth, groups, ...) is compared with the one a
            segkit-native file carries.
        path: the file.
        format: ``"torchvision"`` (keys as they are), ``"timm"`` (renamed by
            :func:`~segkit_plugins.backbones.resnet_weights.convert_timm_resnet`), ``"segkit"`` (written by
            ``segkit convert``) or ``"auto"`` (recognised from the file).

    Raises:
        ValueError: ``format`` is not one of :data:`PRETRAINED_FORMATS`.
        CheckpointError: the file does not exist, is truncated, holds no state dict, describes
            another architecture, shares no key with the model, or a tensor's shape differs from the
            model's (the message names the key, both shapes and the file).
    """
    if format not in PRETRAINED_FORMATS:
        raise ValueError(f"unknown pretrained_format '{format}'; choose one of {', '.join(PRETRAINED_FORMATS)}")
    ckpt = read_checkpoint(path)
    state = extract_state_dict(ckpt)
    if format == "auto":
        format = "segkit" if BACKBONE_INFO_KEY in ckpt else detect_resnet_format(state)
    if format == "segkit":
        _check_arch(model, ckpt.get(BACKBONE_INFO_KEY), path)
    elif format == "timm":
        state = convert_timm_resnet(state)
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
    problems = [f"{kind} keys {report[kind]}" for kind in ("missing", "unexpected") if report[kind]]
    if problems:
        warnings.warn(f"loading '{path}' into {type(model).__name__}: " + "; ".join(problems), stacklevel=3)


def _check_arch(model: nn.Module, info: Any, path: str) -> None:
    arch = getattr(model, "arch", None)
    if not isinstance(info, dict) or not isinstance(arch, dict):
        return
    differ = [f"{k}={info[k]!r} in the file but {arch[k]!r} in the model" for k in arch if k in info and info[k] != arch[k]]
    if differ:
        raise CheckpointError(f"pretrained weights '{path}' were converted for another architecture: "
                              + "; ".join(differ) + ". Set these backbone options to the file's values.")
