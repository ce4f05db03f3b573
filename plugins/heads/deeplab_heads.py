"""DeepLab decode heads: atrous spatial pyramid pooling (DeepLabV3) and its encoder-decoder (DeepLabV3+).

Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation" (2017) and "Encoder-Decoder
with Atrous Separable Convolution for Semantic Image Segmentation" (ECCV 2018). Both heads follow the
contract of :mod:`segkit_plugins.heads.decode_heads` (``forward(features) -> {"seg_logits"}``, the shared
``loss_seg``). The ASPP's rates are in pixels of the map it reads: (12, 24, 36) suit a backbone of output
stride 8 (torchvision's ``deeplabv3_resnet50``), (6, 12, 18) output stride 16 (the papers' training setting).

**Batch size 1.** The image-pooling branch normalises a 1x1 map, so with BatchNorm in training it sees one
value per channel and image: a batch of one image cannot be normalised (torch raises). torchvision's
layout keeps that BatchNorm, and so does segkit by default, so that its weights load; the branch then
refuses a batch of one image in training with a :class:`ValueError` that says what to change. With
``pool_norm: GN`` (which needs two or more channels per group: a width such as 48, 64 or 256) or ``null``
the branch trains on any batch size, a layout torchvision's weights do not fit. Evaluation, and a
BatchNorm kept in eval mode, work with one image; so does SyncBatchNorm over several processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.ops.conv import conv_norm_act
from segkit.ops.norm import check_norm
from segkit.ops.shape_spec import ShapeSpec
from segkit.registry import HEADS
from segkit_plugins.heads.decode_heads import BaseDecodeHead, feature_names, resize_map

__all__ = ["ASPP", "ASPPHead", "DeepLabV3PlusHead", "ImagePooling", "SAME_NORM"]

#: ``pool_norm`` value meaning "the head's ``norm``".
SAME_NORM = "same"


def _conv3x3(in_channels: int, out_channels: int, *, dilation: int, norm: str | None, separable: bool) -> nn.Sequential:
    """A 3x3 conv + norm + ReLU with ``dilation``; with ``separable`` a depthwise 3x3 conv + norm + ReLU
    followed by a pointwise 1x1 conv + norm + ReLU (as in DeepLabV3+'s separable setting)."""
    if not separable:
        return conv_norm_act(in_channels, out_channels, 3, norm=norm, activation=True, dilation=dilation)
    return nn.Sequential(
        conv_norm_act(in_channels, in_channels, 3, norm=norm, activation=True, dilation=dilation, groups=in_channels),
        conv_norm_act(in_channels, out_channels, 1, norm=norm, activation=True),
    )


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global average pool, 1x1 conv + norm + ReLU, broadcast back to the map.

    Args:
        in_channels: channels C of the input.
        channels: output width.
        norm: the norm after the conv (``None`` for none, the conv then has a bias).

    Raises:
        ValueError: GroupNorm with one channel per group (``channels`` 32, 16, 8, ...: one value per
            group on the 1x1 map); in forward, BatchNorm in training mode and a batch of one image
            (see the module).
    """

    def __init__(self, *, in_channels: int, channels: int, norm: str | None) -> None:
        super().__init__()
        self.conv = conv_norm_act(in_channels, channels, 1, norm=norm, activation=True, owner="ImagePooling")
        group_norm = next((m for m in self.conv if isinstance(m, nn.GroupNorm)), None)
        if group_norm is not None and group_norm.num_groups == group_norm.num_channels:
            raise ValueError(f"GroupNorm on ASPP's 1x1 pooled map of {channels} channels has one channel, so one "
                             f"value, per group, which cannot be normalised; use pool_norm: null, or a width with "
                             f"two or more channels per group (such as 48, 64 or 256)")

    def forward(self, x: Tensor) -> Tensor:
        """Tensor[N, C, H, W] -> Tensor[N, channels, H, W], constant over each image up to rounding: the
        1x1 map is upsampled bilinearly, as torchvision does (whose weights then give its numbers exactly)."""
        # SyncBatchNorm (not a BatchNorm2d) is left to torch: across processes it has more than one value.
        batch_norm = any(isinstance(m, nn.BatchNorm2d) and m.training for m in self.conv)
        if x.shape[0] == 1 and batch_norm:
            raise ValueError(
                "the ASPP image-pooling branch normalises a 1x1 map with BatchNorm, which cannot train on a batch "
                "of one image; use at least 2 images per batch (data.batch_size >= 2, and data.drop_last: true "
                "when the last batch may hold one image), or set the head's pool_norm to GN or null (a layout "
                "torchvision's DeepLabV3 weights do not have)"
            )
        return resize_map(self.conv(F.adaptive_avg_pool2d(x, 1)), x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: parallel branches on one map, concatenated and projected.

    Branches, in concatenation order: a 1x1 conv, one 3x3 conv per rate in ``dilations`` (each + norm +
    ReLU) and :class:`ImagePooling`; then a 1x1 projection + norm + ReLU to ``channels`` and dropout.

    Args:
        in_channels: channels C of the input map.
        channels: width of every branch and of the output.
        dilations: rates of the 3x3 branches.
        norm: norm of the convs (``None`` for none).
        pool_norm: norm of the image-pooling branch.
        dropout: element-wise drop probability after the projection (torchvision: 0.5).
        separable: depthwise-separable 3x3 branches.

    Raises:
        ValueError: no rate, a rate below 1, a dropout outside [0, 1) or an unknown norm.
    """

    def __init__(self, *, in_channels: int, channels: int = 256, dilations: Sequence[int] = (12, 24, 36),
                 norm: str | None = "BN", pool_norm: str | None = "BN", dropout: float = 0.5,
                 separable: bool = False) -> None:
        super().__init__()
        rates = tuple(int(d) for d in dilations)
        if not rates or min(rates) < 1:
            raise ValueError(f"ASPP dilations must be one or more rates >= 1, such as (12, 24, 36), "
                             f"got {list(dilations)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ASPP dropout is a probability in [0, 1), got {dropout}")
        check_norm(norm, owner="ASPP")
        check_norm(pool_norm, owner="ASPP image pooling (pool_norm)")
        self.dilations = rates
        self.branches = nn.ModuleList([
            conv_norm_act(in_channels, channels, 1, norm=norm, activation=True),
            *(_conv3x3(in_channels, channels, dilation=d, norm=norm, separable=separable) for d in rates),
        ])
        self.pool = ImagePooling(in_channels=in_channels, channels=channels, norm=pool_norm)
        self.project = nn.Sequential(
            *conv_norm_act(channels * (len(rates) + 2), channels, 1, norm=norm, activation=True),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Tensor[N, in_channels, H, W] -> Tensor[N, channels, H, W]."""
        return self.project(torch.cat([*(branch(x) for branch in self.branches), self.pool(x)], dim=1))


def _pool_norm(pool_norm: str | None, norm: str | None) -> str | None:
    return norm if pool_norm == SAME_NORM else pool_norm


@HEADS.register()
class ASPPHead(BaseDecodeHead):
    """DeepLabV3's decode head, laid out as torchvision's ``DeepLabHead``.

    :class:`ASPP` on ``in_features`` (projection dropout ``aspp_dropout``), a 3x3 conv + norm + ReLU
    (``bottleneck``), then dropout (``dropout``, none by default as in torchvision) and the 1x1
    classifier. ``seg_logits`` have the input map's resolution.

    Args:
        in_shapes, num_classes, ignore_index, loss_weight, norm, loss: see :class:`BaseDecodeHead`.
        in_features: the map the ASPP reads (``"c5"``).
        channels: width of the ASPP and of the 3x3 conv (256).
        dilations: rates of the ASPP's 3x3 branches: (12, 24, 36) at output stride 8, (6, 12, 18) at 16.
        pool_norm: norm of the image-pooling branch; ``"same"`` is ``norm``. ``GN`` or ``null`` train with
            one image per batch (see the module's note).
        aspp_dropout: drop probability after the ASPP projection (0.5).
        dropout: ``Dropout2d`` probability before the classifier (0).

    Raises:
        ValueError: see :class:`BaseDecodeHead` and :class:`ASPP`.

    Example:
        >>> head = ASPPHead(in_shapes={"c5": ShapeSpec(64, 8)}, num_classes=21, channels=32)
        >>> head.eval()({"c5": torch.rand(1, 64, 16, 16)})["seg_logits"].shape
        torch.Size([1, 21, 16, 16])
    """

    def __init__(
        self,
        *,
        in_shapes: Mapping[str, ShapeSpec],
        num_classes: int,
        in_features: str | Sequence[str] = "c5",
        channels: int = 256,
        dilations: Sequence[int] = (12, 24, 36),
        pool_norm: str | None = SAME_NORM,
        aspp_dropout: float = 0.5,
        dropout: float = 0.0,
        ignore_index: int = 255,
        loss_weight: float = 1.0,
        norm: str | None = "BN",
        loss: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(
            in_shapes=in_shapes, num_classes=num_classes, in_features=in_features, channels=channels,
            dropout=dropout, ignore_index=ignore_index, loss_weight=loss_weight, norm=norm, loss=loss,
        )
        self.aspp = ASPP(in_channels=self.in_channels, channels=self.channels, dilations=dilations, norm=norm,
                         pool_norm=_pool_norm(pool_norm, norm), dropout=aspp_dropout)
        self.bottleneck = conv_norm_act(self.channels, self.channels, 3, norm=norm, activation=True)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"seg_logits": Tensor[N, K, h, w]}`` at the input map's resolution."""
        return {"seg_logits": self.classify(self.bottleneck(self.aspp(self.gather(features))))}


@HEADS.register()
class DeepLabV3PlusHead(BaseDecodeHead):
    """DeepLabV3+'s decode head: the ASPP on the last map and a decoder that restores detail from a
    low-level map.

    1. :class:`ASPP` on ``in_features`` (stride 8 or 16) gives ``channels`` maps.
    2. ``low_level_feature`` (``c2``, stride 4) passes a 1x1 conv + norm + ReLU to ``low_level_channels`` (48).
    3. The ASPP output is upsampled bilinearly to the low-level map and concatenated with it.
    4. Two 3x3 conv + norm + ReLU of ``channels`` (depthwise-separable with ``separable``), dropout and
       the 1x1 classifier give ``seg_logits`` at the low-level map's resolution.

    Args:
        in_shapes, num_classes, ignore_index, loss_weight, norm, loss: see :class:`BaseDecodeHead`.
        in_features: the map the ASPP reads (``"c5"``).
        low_level_feature: the decoder's low-level map (``"c2"``).
        low_level_channels: width of its 1x1 reduction (48 in the paper).
        channels: width of the ASPP and of the decoder convs (256).
        dilations: rates of the ASPP's 3x3 branches: (12, 24, 36) at output stride 8, (6, 12, 18) at 16.
        pool_norm: norm of the image-pooling branch; ``"same"`` is ``norm``.
        separable: depthwise-separable 3x3 convs in the ASPP and the decoder (the paper's Xception setting).
        aspp_dropout: drop probability after the ASPP projection (0.1).
        dropout: ``Dropout2d`` probability before the classifier (0).

    Raises:
        ValueError: see :class:`BaseDecodeHead` and :class:`ASPP`; also ``low_level_feature`` not among
            the input maps, or ``low_level_channels`` < 1.

    Example:
        >>> shapes = {"c2": ShapeSpec(16, 4), "c5": ShapeSpec(64, 8)}
        >>> head = DeepLabV3PlusHead(in_shapes=shapes, num_classes=21, channels=32).eval()
        >>> head({"c2": torch.rand(1, 16, 32, 32), "c5": torch.rand(1, 64, 16, 16)})["seg_logits"].shape
        torch.Size([1, 21, 32, 32])
    """

    def __init__(
        self,
        *,
        in_shapes: Mapping[str, ShapeSpec],
        num_classes: int,
        in_features: str | Sequence[str] = "c5",
        low_level_feature: str = "c2",
        low_level_channels: int = 48,
        channels: int = 256,
        dilations: Sequence[int] = (12, 24, 36),
        pool_norm: str | None = SAME_NORM,
        separable: bool = False,
        aspp_dropout: float = 0.1,
        dropout: float = 0.0,
        ignore_index: int = 255,
        loss_weight: float = 1.0,
        norm: str | None = "BN",
        loss: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(
            in_shapes=in_shapes, num_classes=num_classes, in_features=in_features, channels=channels,
            dropout=dropout, ignore_index=ignore_index, loss_weight=loss_weight, norm=norm, loss=loss,
        )
        (self.low_level_feature,) = feature_names(low_level_feature, in_shapes, owner="DeepLabV3PlusHead",
                                                  key="low_level_feature")
        if low_level_channels < 1:
            raise ValueError(f"DeepLabV3PlusHead low_level_channels must be >= 1, got {low_level_channels}")
        self.aspp = ASPP(in_channels=self.in_channels, channels=self.channels, dilations=dilations, norm=norm,
                         pool_norm=_pool_norm(pool_norm, norm), dropout=aspp_dropout, separable=separable)
        self.low_level = conv_norm_act(in_shapes[self.low_level_feature].channels, low_level_channels, 1, norm=norm,
                                       activation=True)
        self.decoder = nn.Sequential(
            _conv3x3(self.channels + low_level_channels, self.channels, dilation=1, norm=norm, separable=separable),
            _conv3x3(self.channels, self.channels, dilation=1, norm=norm, separable=separable),
        )

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"seg_logits": Tensor[N, K, h, w]}`` at the resolution of ``low_level_feature``."""
        low = self.low_level(features[self.low_level_feature])
        context = resize_map(self.aspp(self.gather(features)), low.shape[-2:])
        return {"seg_logits": self.classify(self.decoder(torch.cat([context, low], dim=1)))}
