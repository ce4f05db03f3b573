"""The conv + norm (+ ReLU) block every neck and head builds its layers from, and the conv towers of the
dense detection heads."""

from __future__ import annotations

from typing import Literal

from torch import nn

from segkit.ops.norm import check_norm, make_norm

__all__ = ["ConvInit", "conv_norm_act", "dense_head_tower"]

#: How :func:`conv_norm_act` initialises the conv: ``"kaiming_normal"`` (fan out, for a ReLU after it:
#: heads), ``"kaiming_uniform"`` (``a=1``, Caffe2's "xavier" fill that FPNs use), ``"normal"`` (N(0, 0.01):
#: the dense detection heads) or ``"default"`` (PyTorch's own, for a caller that initialises later).
ConvInit = Literal["kaiming_normal", "kaiming_uniform", "normal", "default"]


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int, *, norm: str | None = None,
                  activation: bool = False, stride: int = 1, dilation: int = 1, groups: int = 1,
                  init: ConvInit = "kaiming_normal", bias: bool | None = None,
                  owner: str = "the layer") -> nn.Sequential:
    """``Sequential(conv[, norm][, ReLU])``: a ``kernel_size`` conv with "same" padding (``dilation *
    (kernel_size // 2)``), ``groups`` groups (``in_channels`` for a depthwise conv), a bias only
    without a norm (unless ``bias`` says otherwise), the norm by name (:data:`~segkit.ops.norm.NORMS`,
    ``None`` for none) and an in-place ReLU with ``activation``. The layout (conv at index 0, norm at 1)
    is the one checkpoints use.

    Raises:
        ValueError: an unknown norm (naming ``owner``) or init.
    """
    check_norm(norm, owner=owner)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=dilation * (kernel_size // 2),
                     dilation=dilation, groups=groups, bias=norm is None if bias is None else bias)
    if init == "normal":
        nn.init.normal_(conv.weight, std=0.01)
    elif init == "kaiming_normal":
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    elif init == "kaiming_uniform":
        nn.init.kaiming_uniform_(conv.weight, a=1)
    elif init != "default":
        raise ValueError(f"init must be 'kaiming_normal', 'kaiming_uniform', 'normal' or 'default', got {init!r}")
    if conv.bias is not None and init != "default":
        nn.init.zeros_(conv.bias)
    layers: list[nn.Module] = [conv]
    if norm is not None:
        layers.append(make_norm(norm, out_channels))
    if activation:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def dense_head_tower(channels: int, num_convs: int, *, norm: str | None, bias: bool | None = None,
                     owner: str) -> nn.Sequential:
    """A dense detection head's tower (RetinaNet, FCOS): ``num_convs`` blocks of 3x3 conv (+ norm) + ReLU
    keeping ``channels``, convs drawn from N(0, 0.01) with zero bias; ``bias`` as in :func:`conv_norm_act`
    (torchvision's FCOS keeps a bias before its GroupNorm, its RetinaNet ``_v2`` does not).

    Raises:
        ValueError: ``num_convs < 0`` or an unknown norm, naming ``owner``.
    """
    if num_convs < 0:
        raise ValueError(f"{owner} num_convs must be >= 0, got {num_convs}")
    check_norm(norm, owner=owner)
    return nn.Sequential(*(conv_norm_act(channels, channels, 3, norm=norm, activation=True, init="normal", bias=bias,
                                         owner=owner) for _ in range(num_convs)))
