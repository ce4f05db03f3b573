"""Normalisation layers by name, as configs spell them (``norm: GN``)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["NORMS", "check_norm", "fixed_affine", "fold_conv_norm", "make_norm"]

#: Names :func:`make_norm` accepts.
NORMS = ("BN", "SyncBN", "GN", "FrozenBN")


def make_norm(norm: str, channels: int) -> nn.Module:
    """A normalisation layer by name: ``"BN"``, ``"SyncBN"``, ``"FrozenBN"`` or ``"GN"`` (32 groups, fewer if needed)."""
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"unknown norm '{norm}'; choose one of {', '.join(NORMS)}")


def check_norm(norm: str | None, *, owner: str = "the layer", optional: bool = True) -> None:
    """Refuse a norm name outside :data:`NORMS` (``None``, no norm, is allowed where ``optional``).

    Raises:
        ValueError: naming ``owner`` and the allowed names.
    """
    if norm is None and optional or norm in NORMS:
        return
    allowed = ("null or " if optional else "") + f"one of {', '.join(NORMS)}"
    raise ValueError(f"{owner} norm must be {allowed}, got {norm!r}")


def fixed_affine(norm: nn.Module) -> tuple[Tensor, Tensor] | None:
    """The per-channel ``(scale, shift)`` that ``norm`` applies, where it is a fixed affine map.

    A FrozenBN always is; a BatchNorm is in eval mode with running statistics (frozen stages, ``norm_eval``,
    inference). ``None`` for anything else (a BatchNorm in training mode, GroupNorm). The scale and shift
    keep the autograd graph to the norm's weight and bias, so a trainable BatchNorm in eval mode still
    learns through them.
    """
    if isinstance(norm, FrozenBatchNorm2d):
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        return scale, norm.bias - norm.running_mean * scale
    if (isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training
            and norm.running_mean is not None and norm.running_var is not None):
        scale = (norm.running_var + norm.eps).rsqrt()
        shift = -norm.running_mean * scale
        if norm.weight is not None:
            scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
        return scale, shift
    return None


def fold_conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor, fold: bool = True) -> Tensor:
    """``norm(conv(x))``, computed as one convolution when ``fold`` and the norm is a fixed affine map.

    The norm's scale goes into the convolution's weights and its shift into the bias
    (:func:`fixed_affine`): the map the norm would read and write is never made, in the forward pass or
    the backward. The result equals ``norm(conv(x))`` up to float rounding (the products are formed in
    another order). Modules with hooks, or a padding mode other than zeros, take the two-module path.
    """
    affine = None
    if fold and not (conv._forward_hooks or conv._forward_pre_hooks or norm._forward_hooks or norm._forward_pre_hooks
            or conv.padding_mode != "zeros"):
        affine = fixed_affine(norm)
    if affine is None:
        return norm(conv(x))
    scale, shift = affine
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
