"""Feature Pyramid Network: lateral 1x1 convs, top-down nearest upsampling, 3x3 output convs.

Module names follow a simple pattern so torchvision's ``FeaturePyramidNetwork`` weights map by
renaming ``inner_blocks`` to ``lateral_convs``, ``layer_blocks`` to ``output_convs`` and RetinaNet's
``extra_blocks.p6`` / ``p7`` to ``extra_convs.0`` / ``1``.
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

_EXTRA_BLOCKS = ("maxpool", "p6p7", None)
_EXTRA_FROM = ("output", "input")


@NECKS.register()
class FPN(nn.Module):
    """Feature Pyramid Network over backbone maps ``c2``..``c5``, giving ``p2``..``p5`` (and ``p6``).

    Output ``p<k>`` has stride ``2**k``; with ``extra_block="maxpool"`` an extra level is the
    coarsest output subsampled by 2 (``max_pool2d`` with kernel 1, stride 2). ``extra_block="p6p7"``
    adds two levels as RetinaNet does: a 3x3 stride-2 conv of the coarsest output (``extra_from="output"``,
    P5 in torchvision's ``retinanet_resnet50_fpn``) or of the coarsest input (``extra_from="input"``, C5
    in ``retinanet_resnet50_fpn_v2``), then ReLU and another 3x3 stride-2 conv.

    Args:
        in_shapes: the backbone's ``output_shape()``.
        in_features: names of the backbone maps to use, finest first; strides must be powers of two.
        out_channels: channels of every output map.
        extra_block: ``"maxpool"`` to add the subsampled extra level, ``"p6p7"`` for two conv levels, or ``None``.
        extra_from: what the first ``p6p7`` conv reads: ``"output"`` (the coarsest output) or ``"input"``.
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
        extra_from: str = "output",
        norm: str | None = None,
    ) -> None:
        super().__init__()
        missing = [f for f in in_features if f not in in_shapes]
        if missing:
            raise ValueError(f"FPN in_features {missing} are not produced by the backbone, which gives {list(in_shapes)}")
        if extra_block not in _EXTRA_BLOCKS:
            raise ValueError(f"FPN extra_block must be one of {_EXTRA_BLOCKS}, got {extra_block!r}")
        if extra_from not in _EXTRA_FROM:
            raise ValueError(f"FPN extra_from must be one of {_EXTRA_FROM}, got {extra_from!r}")
        check_norm(norm, owner="FPN")
        strides = [int(in_shapes[f].stride) for f in in_features]
        if any(s <= 0 or s & (s - 1) for s in strides) or strides != sorted(set(strides)):
            raise ValueError(f"FPN inputs must have increasing power-of-two strides, got {dict(zip(in_features, strides))}")
        self.in_features = tuple(in_features)
        self.extra_block = extra_block
        self.extra_from = extra_from
        self.lateral_convs = nn.ModuleList(
            conv_norm_act(in_shapes[f].channels, out_channels, 1, norm=norm, init="kaiming_uniform") for f in in_features)
        self.output_convs = nn.ModuleList(
            conv_norm_act(out_channels, out_channels, 3, norm=norm, init="kaiming_uniform") for _ in in_features)
        self._shapes = {f"p{int(math.log2(s))}": ShapeSpec(out_channels, s) for s in strides}
        extra_levels = {"maxpool": 1, "p6p7": 2}.get(extra_block or "", 0)
        for k in range(1, extra_levels + 1):
            self._shapes[f"p{int(math.log2(strides[-1])) + k}"] = ShapeSpec(out_channels, strides[-1] * 2**k)
        if extra_block == "p6p7":
            first = in_shapes[in_features[-1]].channels if extra_from == "input" else out_channels
            self.extra_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 3, stride=2, padding=1)
                                             for c in (first, out_channels))
            for conv in self.extra_convs:
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)

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
        return OrderedDict(zip(self._shapes, self.add_extra_levels(self.top_down(inputs), inputs)))

    def top_down(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        """The top-down pyramid over the ``in_features`` maps (finest first), without the extra levels."""
        top = self.lateral_convs[-1](inputs[-1])
        results = [self.output_convs[-1](top)]
        for i in range(len(inputs) - 2, -1, -1):
            lateral = self.lateral_convs[i](inputs[i])
            top = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.output_convs[i](top))
        return results

    def add_extra_levels(self, results: list[Tensor], inputs: Sequence[Tensor]) -> list[Tensor]:
        """``results`` followed by the ``extra_block`` levels, computed from the coarsest of ``results``
        (or of ``inputs`` with ``extra_from="input"``)."""
        if self.extra_block == "maxpool":
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        elif self.extra_block == "p6p7":
            p6 = self.extra_convs[0](inputs[-1] if self.extra_from == "input" else results[-1])
            results += [p6, self.extra_convs[1](F.relu(p6))]
        return results
