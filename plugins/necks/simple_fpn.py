"""The simple feature pyramid of ViTDet (Li et al. 2022, "Exploring Plain Vision Transformer Backbones for
Object Detection"): a pyramid built from the single last map of a plain backbone, with no top-down path.

From a map of stride ``s`` (a ViT's 16): scale 4 is two 2x2 stride-2 transposed convs with a norm and GELU
between them (stride ``s / 4``), scale 2 one transposed conv (``s / 2``), scale 1 the map itself, scale 1/2 a
2x2 max-pool (``2 s``); each level then has a 1x1 conv and a 3x3 conv to ``out_channels``, each followed by
the norm (LayerNorm over channels in the paper). The levels are named as :class:`FPN` names its outputs
(``p2``..``p5`` for a stride-16 input, ``p6`` from the extra max-pool), so that the RPN, the RoI heads and
the decode heads read them as they read an FPN's.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from segkit.ops import ShapeSpec
from segkit.ops.conv import conv_norm_act
from segkit.ops.norm import check_norm, make_norm
from segkit.registry import NECKS

__all__ = ["SimpleFeaturePyramid"]

_SCALES = (4.0, 2.0, 1.0, 0.5)
_EXTRA_BLOCKS = ("maxpool", None)


@NECKS.register()
class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: levels of strides ``s / scale`` from one map of stride ``s``.

    Args:
        in_shapes: the backbone's ``output_shape()``.
        in_feature: the backbone map the pyramid is built from; ``None``: the one of the largest stride
            (the last block's, for a ViT returning several).
        out_channels: channels of every output map.
        scale_factors: the levels, a subset of ``(4.0, 2.0, 1.0, 0.5)`` in decreasing order: 4 is two 2x2
            stride-2 transposed convs (``C / 2`` then ``C / 4`` channels, the norm and GELU between them), 2
            one (``C / 2``), 1 the map, 0.5 a 2x2 max-pool.
        norm: ``"LN"`` (LayerNorm over channels, the paper's), ``"BN"``, ``"SyncBN"``, ``"GN"``, ``"FrozenBN"``
            or ``None`` after the first transposed conv and after every conv (convs lose their bias with a norm).
        extra_block: ``"maxpool"`` adds a level of twice the coarsest stride (``max_pool2d`` with kernel 1,
            stride 2, the RPN's ``p6``), or ``None``.

    Example:
        >>> neck = SimpleFeaturePyramid(in_shapes={"c4": ShapeSpec(192, 16)}, out_channels=64)
        >>> {k: s.stride for k, s in neck.output_shape().items()}
        {'p2': 4, 'p3': 8, 'p4': 16, 'p5': 32, 'p6': 64}
    """

    def __init__(
        self,
        *,
        in_shapes: Mapping[str, ShapeSpec],
        in_feature: str | None = None,
        out_channels: int = 256,
        scale_factors: Sequence[float] = _SCALES,
        norm: str | None = "LN",
        extra_block: str | None = "maxpool",
    ) -> None:
        super().__init__()
        if not in_shapes:
            raise ValueError("SimpleFeaturePyramid needs a backbone map; the backbone declares none")
        if in_feature is None:
            in_feature = max(reversed(list(in_shapes)), key=lambda name: in_shapes[name].stride)
        if in_feature not in in_shapes:
            raise ValueError(f"SimpleFeaturePyramid in_feature '{in_feature}' is not produced by the backbone, which "
                             f"gives {list(in_shapes)}")
        scales = [float(s) for s in scale_factors]
        if not scales or any(s not in _SCALES for s in scales) or scales != sorted(set(scales), reverse=True):
            raise ValueError(f"SimpleFeaturePyramid scale_factors must be distinct values of {list(_SCALES)} in "
                             f"decreasing order, got {list(scale_factors)}")
        if extra_block not in _EXTRA_BLOCKS:
            raise ValueError(f"SimpleFeaturePyramid extra_block must be one of {_EXTRA_BLOCKS}, got {extra_block!r}")
        check_norm(norm, owner="SimpleFeaturePyramid")
        shape = in_shapes[in_feature]
        strides = [shape.stride / s for s in scales]
        if any(s < 1 or s != int(s) or int(s) & (int(s) - 1) for s in strides):
            raise ValueError(f"SimpleFeaturePyramid levels must have power-of-two strides: the input '{in_feature}' "
                             f"of stride {shape.stride} scaled by {scales} gives {strides}")
        self.in_feature, self.scale_factors, self.extra_block = in_feature, tuple(scales), extra_block
        channels = shape.channels
        self.rescales = nn.ModuleList(_rescale(channels, s, norm) for s in scales)
        widths = [{4.0: channels // 4, 2.0: channels // 2}.get(s, channels) for s in scales]
        self.lateral_convs = nn.ModuleList(conv_norm_act(w, out_channels, 1, norm=norm, init="kaiming_uniform",
                                                         owner="SimpleFeaturePyramid") for w in widths)
        self.output_convs = nn.ModuleList(conv_norm_act(out_channels, out_channels, 3, norm=norm,
                                                        init="kaiming_uniform", owner="SimpleFeaturePyramid")
                                          for _ in widths)
        self._shapes = {f"p{int(math.log2(s))}": ShapeSpec(out_channels, int(s)) for s in strides}
        if extra_block == "maxpool":
            coarsest = int(strides[-1]) * 2
            self._shapes[f"p{int(math.log2(coarsest))}"] = ShapeSpec(out_channels, coarsest)

    def output_shape(self) -> dict[str, ShapeSpec]:
        """``{"p2": ShapeSpec(out_channels, 4), ...}`` for every returned map, finest first."""
        return dict(self._shapes)

    def forward(self, features: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
        """Build the pyramid.

        Args:
            features: backbone maps by name; ``in_feature`` must be present, Tensor[N, C, H, W].

        Returns:
            Ordered ``{"p2": Tensor[N, out_channels, 4 H, 4 W], ...}``, finest first (for a stride-16 input).
        """
        x = features[self.in_feature]
        results = [output(lateral(rescale(x))) for rescale, lateral, output in
                   zip(self.rescales, self.lateral_convs, self.output_convs)]
        if self.extra_block == "maxpool":
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return OrderedDict(zip(self._shapes, results))


def _rescale(channels: int, scale: float, norm: str | None) -> nn.Module:
    """The resampling of one level: transposed convs up (scale 4, 2), nothing (1), a max-pool down (0.5)."""
    if scale == 4.0:
        middle = [make_norm(norm, channels // 2)] if norm is not None else []
        return nn.Sequential(nn.ConvTranspose2d(channels, channels // 2, 2, stride=2), *middle, nn.GELU(),
                             nn.ConvTranspose2d(channels // 2, channels // 4, 2, stride=2))
    if scale == 2.0:
        return nn.ConvTranspose2d(channels, channels // 2, 2, stride=2)
    if scale == 0.5:
        return nn.MaxPool2d(2, stride=2)
    return nn.Identity()
