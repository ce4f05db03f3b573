"""The conv + norm (+ ReLU) block every neck and head builds its layers from."""

from __future__ import annotations

from typing import Literal

from torch import nn

from segkit.ops.norm import check_norm, make_norm

__all__ = ["ConvInit", "conv_norm_act"]

#: How :func:`conv_norm_act` initialises the conv: ``"kaiming_normal"`` (fan out, for a ReLU after it:
#: heads), ``"kaiming_uniform"`` (``a=1``, Caffe2's "xavier" fill that FPNs use) or ``"default"``
#: (PyTorch's own, for a caller that initialises later).
ConvInit = Literal["kaiming_normal", "kaiming_uniform", "default"]


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int, *, norm: str | None = None,
                  activation: bool = False, stride: int = 1, init: ConvInit = "kaiming_normal",
                  owner: str = "the layer") -> nn.Sequential:
    """``Sequential(conv[, norm][, ReLU])``: a ``kernel_size`` conv with "same" padding, a bias only
    without a norm, the norm by name (:data:`~segkit.ops.norm.NORMS`, ``None`` for none) and an in-place
    ReLU with ``activation``. The layout (conv at index 0, norm at 1) is the one checkpoints use.

    Raises:
        ValueError: an unknown norm (naming ``owner``) or init.
    """
    check_norm(norm, owner=owner)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=norm is None)
    if init == "kaiming_normal":
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    elif init == "kaiming_uniform":
        nn.init.kaiming_uniform_(conv.weight, a=1)
    elif init != "default":
        raise ValueError(f"init must be 'kaiming_normal', 'kaiming_uniform' or 'default', got {init!r}")
    if conv.bias is not None and init != "default":
        nn.init.zeros_(conv.bias)
    layers: list[nn.Module] = [conv]
    if norm is not None:
        layers.append(make_norm(norm, out_channels))
    if activation:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)
