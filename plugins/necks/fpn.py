"""Feature Pyramid Network: lateral 1x1 convs, top-down nearest upsampling, 3x3 output convs.

Module names follow a simple pattern so torchvision's ``FeaturePyramidNetwork`` weights map by
renaming ``inner_blocks`` to ``lateral_convs`` and ``layer_blocks`` to ``output_convs``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from segkit.ops import ShapeSpec
from segkit.ops.conv import conv_norm_act
from segkit.ops.norm import check_norm
from segkit.registry import NECKS

__all__ = ["FPN"]

_EXTRA_BLOCKS = ("maxpool", None)


@NECKS.register()
class FPN(nn.Module):
    """Feature Pyramid Network over backbone maps ``c2``..``c5``, giving ``p2``..``p5`` (and ``p6``).

    Output ``p<k>`` has stride ``2**k``; with ``extra_block="maxpool"`` an extra level is the
    coarsest output subsampled by 2 (``max_pool2d`` with kernel 1, stride 2).

    Args:
        in_shapes: the backbone's ``output_shape()``.
        in_features: names of the backbone maps to use, finest first; strides must be powers of two.
        out_channels: channels of every output map.
        extra_block: ``"maxpool"`` to add the subsampled extra level, or ``None``.
        norm: ``None``, ``"BN"``, ``"SyncBN"`` or ``"GN"`` after every conv (convs lose their bias with a norm).

    Example:
        >>> shapes = {"c2": ShapeSpec(64, 4), "c3": ShapeSpec(128, 8)}
        >>> FPN(in_shapes=shapes, in_features=("c2", "c3"), out_channels=32).output_shape()
        {'p2': ShapeSpec(channels=32, stride=4), 'p3': ShapeSpec(channels=32, stride=8), 'p4': ShapeSpec(channels=32, stride=16)}
    """

    def __init__(
        self,
        *,
        in_shapes: Mapping[str, ShapeSpec],
        in_features: Sequence[str] = ("c2", "c3", "c4", "c5"),
        out_channels: int = 256,
        extra_block: str | None = "maxpool",
        norm: str | None = None,
    ) -> None:
        super().__init__()
        missing = [f for f in in_features if f not in in_shapes]
        if missing:
            raise ValueError(f"FPN in_features {missing} are not produced by the backbone, which gives {list(in_shapes)}")
        if extra_block not in _EXTRA_BLOCKS:
            raise ValueError(f"FPN extra_block must be one of {_EXTRA_BLOCKS}, got {extra_block!r}")
        check_norm(norm, owner="FPN")
        strides = [int(in_shapes[f].stride) for f in in_features]
        if any(s <= 0 or s & (s - 1) for s in strides) or strides != sorted(set(strides)):
            raise ValueError(f"FPN inputs must have increasing power-of-two strides, got {dict(zip(in_features, strides))}")
        self.in_features = tuple(in_features)
        self.extra_block = extra_block
        self.lateral_convs = nn.ModuleList(
            conv_norm_act(in_shapes[f].channels, out_channels, 1, norm=norm, init="kaiming_uniform") for f in in_features)
        self.output_convs = nn.ModuleList(
            conv_norm_act(out_channels, out_channels, 3, norm=norm, init="kaiming_uniform") for _ in in_features)
        self._shapes = {f"p{int(math.log2(s))}": ShapeSpec(out_channels, s) for s in strides}
        if extra_block == "maxpool":
            self._shapes[f"p{int(math.log2(strides[-1])) + 1}"] = ShapeSpec(out_channels, strides[-1] * 2)

    def output_shape(self) -> dict[str, ShapeSpec]:
        """``{"p2": ShapeSpec(out_channels, 4), ...}`` for every returned map."""
        return dict(self._shapes)

    def forward(self, features: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
        """Build the pyramid.

        Args:
            features: backbone maps by name; ``in_features`` must be present, Tensor[N, C_i, H_i, W_i].

        Returns:
            Ordered ``{"p2": Tensor[N, out_channels, H_2, W_2], ...}``, finest first.
        """
        inputs = [features[f] for f in self.in_features]
        top = self.lateral_convs[-1](inputs[-1])
        results = [self.output_convs[-1](top)]
        for i in range(len(inputs) - 2, -1, -1):
            lateral = self.lateral_convs[i](inputs[i])
            top = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.output_convs[i](top))
        if self.extra_block == "maxpool":
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return OrderedDict(zip(self._shapes, results))
