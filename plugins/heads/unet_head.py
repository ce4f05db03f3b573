"""U-Net's expanding path (Ronneberger et al. 2015) as a decode head over any backbone's maps.

From the deepest of ``in_features`` up to the shallowest, each level upsamples the map by 2 (a 2x2
transposed conv halving the channels, as the paper, or bilinear interpolation and a 1x1 conv), joins the
encoder's map of that level (the skip connection) and applies two 3x3 conv + norm + ReLU layers. The
classifier reads the shallowest level, so ``seg_logits`` has its stride: 1 on
:class:`~segkit_plugins.backbones.unet.UNet`, 4 on a ResNet's ``c2..c5``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.ops.shape_spec import ShapeSpec
from segkit.registry import HEADS
from segkit_plugins.backbones.unet import PADDINGS, ValidGeometry, double_conv
from segkit_plugins.heads.decode_heads import BaseDecodeHead, feature_names

__all__ = ["UNetHead"]


@HEADS.register()
class UNetHead(BaseDecodeHead):
    """U-Net's decoder: upsample, concatenate the skip connection, two 3x3 convs, level by level.

    Args:
        in_shapes, num_classes, ignore_index, loss_weight, norm, loss: see :class:`BaseDecodeHead`.
        in_features: the encoder maps, shallowest first, each of half the previous one's resolution
            (default: every map of ``in_shapes`` in stride order, e.g. ``[c2, c3, c4, c5]`` of a ResNet).
        channels: the decoder's width per level, shallowest first (a list as long as ``in_features``
            minus one), or one number for the shallowest level, doubling per level; default the skip
            maps' channels (the paper's symmetric U-Net).
        upsample: ``"deconv"`` (2x2 transposed conv, the paper) or ``"bilinear"`` (interpolation, 1x1 conv).
        padding: ``"same"``; or ``"valid"``, the paper's unpadded convs, with the
            :class:`~segkit_plugins.backbones.unet.UNet` encoder of ``padding: valid``: each skip map is
            cut to the upsampled map where they align, and the output to the input image's size.
        dropout: drop probability before the classifier (default 0).

    Raises:
        ValueError: see :class:`BaseDecodeHead`; also fewer than two maps, maps whose strides do not
            double, a ``channels`` list of the wrong length, an unknown ``upsample`` or ``padding``, or
            ``padding: valid`` on maps that are not a valid-padding U-Net encoder's.

    Example:
        >>> shapes = {"c2": ShapeSpec(64, 4), "c3": ShapeSpec(128, 8), "c4": ShapeSpec(256, 16)}
        >>> head = UNetHead(in_shapes=shapes, num_classes=3)
        >>> maps = {"c2": torch.rand(1, 64, 32, 32), "c3": torch.rand(1, 128, 16, 16), "c4": torch.rand(1, 256, 8, 8)}
        >>> head(maps)["seg_logits"].shape
        torch.Size([1, 3, 32, 32])
    """

    def __init__(
        self,
        *,
        in_shapes: Mapping[str, ShapeSpec],
        num_classes: int,
        in_features: Sequence[str] | None = None,
        channels: int | Sequence[int] | None = None,
        upsample: str = "deconv",
        padding: str = "same",
        dropout: float = 0.0,
        ignore_index: int = 255,
        loss_weight: float = 1.0,
        norm: str | None = "BN",
        loss: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        if in_features is None:
            in_features = sorted(in_shapes, key=lambda name: in_shapes[name].stride)
        names = feature_names(in_features, in_shapes, owner="UNetHead")
        if len(names) < 2:
            raise ValueError(f"UNetHead needs at least two maps (a skip connection and a deeper map), "
                             f"got {list(names)}")
        strides = [in_shapes[name].stride for name in names]
        if any(deep != 2 * shallow for shallow, deep in zip(strides, strides[1:])):
            raise ValueError(f"UNetHead in_features must be ordered shallowest first with strides doubling level by "
                             f"level; {list(names)} have strides {strides}")
        if upsample not in ("deconv", "bilinear"):
            raise ValueError(f"UNetHead upsample must be 'deconv' or 'bilinear', got {upsample!r}")
        if padding not in PADDINGS:
            raise ValueError(f"UNetHead padding must be 'same' or 'valid', got {padding!r}")
        if padding == "valid" and strides[0] != 1:
            raise ValueError(f"UNetHead padding: valid decodes the UNet backbone of padding: valid, whose maps start "
                             f"at stride 1; {names[0]!r} has stride {strides[0]}")
        skip_channels = [in_shapes[name].channels for name in names]
        levels = len(names) - 1
        if channels is None:
            widths = skip_channels[:-1]
        elif isinstance(channels, int):
            widths = [channels * 2 ** level for level in range(levels)]
        else:
            widths = [int(c) for c in channels]
            if len(widths) != levels:
                raise ValueError(f"UNetHead channels lists one width per decoder level ({levels} for the {len(names)} "
                                 f"maps {list(names)}), got {list(channels)}")
        if min(widths) < 1:
            raise ValueError(f"UNetHead channels must be >= 1, got {widths}")
        super().__init__(in_shapes=in_shapes, num_classes=num_classes, in_features=names, channels=widths[0],
                         dropout=dropout, ignore_index=ignore_index, loss_weight=loss_weight, norm=norm, loss=loss)
        self.upsample_mode = upsample
        self.padding = padding
        self.geometry = ValidGeometry.of(len(names)) if padding == "valid" else None
        ups, blocks = [], []
        for level in reversed(range(levels)):
            deeper = skip_channels[-1] if level == levels - 1 else widths[level + 1]
            up_channels = deeper // 2 if upsample == "deconv" else widths[level]
            if upsample == "deconv":
                ups.append(nn.ConvTranspose2d(deeper, max(up_channels, 1), 2, stride=2))
            else:
                ups.append(nn.Conv2d(deeper, up_channels, 1))
            blocks.append(double_conv(max(up_channels, 1) + skip_channels[level], widths[level], norm=norm,
                                      padding=padding, owner="UNetHead"))
        self.ups = nn.ModuleList(ups)  # deepest level first
        self.blocks = nn.ModuleList(blocks)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"seg_logits": Tensor[N, K, h, w]}`` at the shallowest map's resolution (with ``padding: valid``,
        the input image's size)."""
        maps = [features[name] for name in self.in_features]
        x = maps[-1]
        levels = len(maps) - 1
        for up, block, level in zip(self.ups, self.blocks, reversed(range(levels))):
            if self.upsample_mode == "deconv":
                x = up(x)
            else:
                x = up(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
            x, skip = self._align(x, maps[level], level)
            x = block(torch.cat([x, skip], dim=1))
        if self.geometry is not None:  # the output starts at the image's first pixel; cut it to the image
            size = [side + 2 * int(self.geometry.skip_origins[0]) for side in maps[0].shape[-2:]]
            x = x[..., :size[0], :size[1]]
        return {"seg_logits": self.classify(x)}

    def _align(self, up: Tensor, skip: Tensor, level: int) -> tuple[Tensor, Tensor]:
        """The upsampled map and the encoder map of ``level`` at one size: with valid padding the encoder map
        is cut where they align; with same padding the upsampled map is padded at the bottom and right where a
        pool rounded an odd side down."""
        height, width = up.shape[-2:]
        if self.geometry is not None:
            offset = self.geometry.skip_offset(level)
            if skip.shape[-2] < offset + height or skip.shape[-1] < offset + width:
                raise ValueError(
                    f"UNetHead padding: valid got a {tuple(skip.shape[-2:])} map at level {level}, too small for the "
                    f"{height}x{width} decoder map: use it on the UNet backbone of padding: valid and the same depth "
                    f"({len(self.in_features)})")
            return up, skip[..., offset:offset + height, offset:offset + width]
        dy, dx = skip.shape[-2] - height, skip.shape[-1] - width
        if dy or dx:
            up = F.pad(up, (0, dx, 0, dy))  # a negative amount cuts (a backbone that rounds up)
        return up, skip
