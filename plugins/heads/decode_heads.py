"""Semantic-segmentation decode heads: FCN and EncNet's EncHead, with their shared loss.

Every head is built by the segmentor with ``in_shapes`` (the backbone's or neck's
``output_shape()``) and ``num_classes``; ``forward(features)`` returns ``seg_logits``
(Tensor[N, K, h, w] at the resolution of the first input map) and ``losses(outputs, sem_seg)``
returns scalar ``loss_*`` values against the padded batch label map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.ops.encoding import ContextEncoding
from segkit.ops.conv import conv_norm_act
from segkit.ops.norm import check_norm
from segkit.ops.seg_losses import SegLoss
from segkit.ops.shape_spec import ShapeSpec
from segkit.registry import HEADS

__all__ = ["BaseDecodeHead", "EncHead", "FCNHead", "feature_names", "resize_map", "se_loss_targets"]


def se_loss_targets(sem_seg: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Which classes occur in each label map: the targets of EncNet's SE-loss.

    Args:
        sem_seg: Tensor[N, H, W], int64 class indices; ``ignore_index`` and any value outside
            ``[0, num_classes)`` count as no class.
        num_classes: K.
        ignore_index: the label of pixels that do not count.

    Returns:
        Tensor[N, K], float32: 1 where class k occurs in image n, else 0 (an all-ignored image
        gives a row of zeros).
    """
    labels = sem_seg.flatten(1).long()
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    # Invalid pixels go to an extra column that is dropped afterwards.
    index = torch.where(valid, labels, torch.full_like(labels, num_classes))
    present = torch.zeros(labels.shape[0], num_classes + 1, dtype=torch.float32, device=labels.device)
    return present.scatter_(1, index, 1.0)[:, :num_classes]


def feature_names(
    in_features: str | Sequence[str], in_shapes: Mapping[str, ShapeSpec], *, owner: str, key: str = "in_features"
) -> tuple[str, ...]:
    """The map names ``in_features`` gives (one name or several), checked against ``in_shapes``.

    Raises:
        ValueError: no name, or a name that is not an input map (``owner`` and ``key`` say whose option).
    """
    names = (in_features,) if isinstance(in_features, str) else tuple(in_features)
    if not names:
        raise ValueError(f"{owner} {key} is empty; name one of the input maps {list(in_shapes)}")
    missing = [name for name in names if name not in in_shapes]
    if missing:
        raise ValueError(
            f"{owner} {key} {missing} are not among the input maps {list(in_shapes)}; "
            f"set {key} to one of them (or a list of them)"
        )
    return names


def resize_map(x: Tensor, size: Sequence[int]) -> Tensor:
    """``x`` (Tensor[N, C, h, w]) resized bilinearly (``align_corners=False``) to ``size`` (H, W); ``x`` itself
    when it has that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class BaseDecodeHead(nn.Module):
    """Shared part of decode heads: input selection, classifier and the segmentation loss.

    The ``in_features`` maps are resized (bilinear) to the first one's size and concatenated, so
    ``in_channels`` is the sum of their channels. The classifier is dropout (``Dropout2d``) + a
    1x1 conv from ``channels`` to K. The losses upsample ``seg_logits`` bilinearly
    (``align_corners=False``) to the label map; by default ``loss_seg`` is the cross-entropy averaged
    over the pixels that are not ``ignore_index`` (0, still in the graph, when there are none), and
    ``loss:`` chooses other terms (class-weighted cross-entropy, Dice: :class:`~segkit.ops.seg_losses.SegLoss`).
    Every term is multiplied by ``loss_weight``.

    Args:
        in_shapes: the backbone's or neck's ``output_shape()``.
        num_classes: K, every class the labels use (background included when the dataset has it).
        in_features: name or names of the maps used.
        channels: width of the map fed to the classifier.
        dropout: drop probability before the classifier, in [0, 1).
        ignore_index: label of pixels that do not count.
        loss_weight: factor of the losses.
        norm: ``None``, ``"BN"``, ``"SyncBN"``, ``"GN"`` or ``"FrozenBN"`` after inner convs.
        loss: the loss terms (:class:`~segkit.ops.seg_losses.SegLoss`); ``None`` is the cross-entropy.

    Raises:
        ValueError: a value out of range, an unknown norm or loss, or ``in_features`` not in ``in_shapes``.
    """

    def __init__(
        self,
        *,
        in_shapes: Mapping[str, ShapeSpec],
        num_classes: int,
        in_features: str | Sequence[str],
        channels: int,
        dropout: float = 0.1,
        ignore_index: int = 255,
        loss_weight: float = 1.0,
        norm: str | None = "BN",
        loss: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if num_classes < 1:
            raise ValueError(f"{owner} num_classes must be >= 1, got {num_classes}")
        if channels < 1:
            raise ValueError(f"{owner} channels must be >= 1, got {channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{owner} dropout is a probability in [0, 1), got {dropout}")
        if loss_weight < 0:
            raise ValueError(f"{owner} loss_weight must be >= 0, got {loss_weight}")
        check_norm(norm, owner=owner)
        self.in_features = feature_names(in_features, in_shapes, owner=owner)
        self.in_channels = sum(in_shapes[name].channels for name in self.in_features)
        self.num_classes = int(num_classes)
        self.channels = int(channels)
        self.ignore_index = int(ignore_index)
        self.loss_weight = float(loss_weight)
        self.loss = SegLoss(loss, num_classes=self.num_classes, ignore_index=self.ignore_index, owner=owner)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(self.channels, self.num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def gather(self, features: Mapping[str, Tensor]) -> Tensor:
        """The ``in_features`` maps at the first one's size, concatenated: Tensor[N, in_channels, h, w]."""
        maps = [features[name] for name in self.in_features]
        if len(maps) == 1:
            return maps[0]
        return torch.cat([maps[0], *(resize_map(m, maps[0].shape[-2:]) for m in maps[1:])], dim=1)

    def classify(self, x: Tensor) -> Tensor:
        """Class logits Tensor[N, K, h, w] of a map Tensor[N, channels, h, w] (dropout + 1x1 conv)."""
        return self.classifier(self.dropout(x))

    def seg_losses(self, seg_logits: Tensor, sem_seg: Tensor) -> dict[str, Tensor]:
        """The ``loss:`` terms (``loss_seg`` by default) of Tensor[N, K, h, w] logits against Tensor[N, H, W]
        labels, each times ``loss_weight``.

        Raises:
            ValueError: ``sem_seg`` is not Tensor[N, H, W] with the logits' batch size.
        """
        if sem_seg.dim() != 3 or sem_seg.shape[0] != seg_logits.shape[0]:
            raise ValueError(
                f"sem_seg must be Tensor[N, H, W] with N={seg_logits.shape[0]} (the batch of the logits), "
                f"got shape {tuple(sem_seg.shape)}"
            )
        logits = resize_map(seg_logits, sem_seg.shape[-2:])
        return {name: value * self.loss_weight for name, value in self.loss(logits, sem_seg).items()}

    def losses(self, outputs: Mapping[str, Tensor], sem_seg: Tensor) -> dict[str, Tensor]:
        """The ``loss:`` terms (``{"loss_seg"}`` by default) of :meth:`forward`'s outputs against the batch
        labels Tensor[N, H, W] (int64)."""
        return self.seg_losses(outputs["seg_logits"], sem_seg)


@HEADS.register()
class FCNHead(BaseDecodeHead):
    """Fully convolutional decode head: ``num_convs`` conv + norm + ReLU layers, dropout, 1x1 classifier.

    With the defaults it is EncNet's auxiliary head (one 3x3 conv to ``in_channels // 4``
    channels); the FCN baseline uses e.g. ``num_convs: 2, channels: 512``.

    Args:
        in_shapes, num_classes, in_features, dropout, ignore_index, loss_weight, norm, loss: see
            :class:`BaseDecodeHead` (``in_features`` defaults to ``"c5"``).
        channels: width of the convs (default ``in_channels // 4``); with ``num_convs: 0`` the
            classifier reads the input directly and ``channels`` must be unset or ``in_channels``.
        num_convs: number of conv layers (>= 0).
        kernel_size: odd kernel size of the convs.

    Raises:
        ValueError: see :class:`BaseDecodeHead`; also a negative ``num_convs``, an even
            ``kernel_size`` or ``channels`` != ``in_channels`` without convs.

    Example:
        >>> head = FCNHead(in_shapes={"c4": ShapeSpec(64, 8)}, num_classes=21, in_features="c4")
        >>> head({"c4": torch.rand(2, 64, 16, 16)})["seg_logits"].shape
        torch.Size([2, 21, 16, 16])
    """

    def __init__(
        self,
        *,
        in_shapes: Mapping[str, ShapeSpec],
        num_classes: int,
        in_features: str | Sequence[str] = "c5",
        channels: int | None = None,
        num_convs: int = 1,
        kernel_size: int = 3,
        dropout: float = 0.1,
        ignore_index: int = 255,
        loss_weight: float = 1.0,
        norm: str | None = "BN",
        loss: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        names = feature_names(in_features, in_shapes, owner="FCNHead")
        in_channels = sum(in_shapes[name].channels for name in names)
        if num_convs < 0:
            raise ValueError(f"FCNHead num_convs must be >= 0, got {num_convs}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"FCNHead kernel_size must be odd and positive, got {kernel_size}")
        if num_convs == 0 and channels not in (None, in_channels):
            raise ValueError(
                f"FCNHead without convs classifies its {in_channels}-channel input directly; "
                f"leave channels unset or set num_convs >= 1 (got channels={channels})"
            )
        if channels is None:
            channels = in_channels if num_convs == 0 else max(in_channels // 4, 1)
        super().__init__(
            in_shapes=in_shapes, num_classes=num_classes, in_features=names, channels=channels,
            dropout=dropout, ignore_index=ignore_index, loss_weight=loss_weight, norm=norm, loss=loss,
        )
        widths = [in_channels] + [self.channels] * num_convs
        self.convs = nn.Sequential(
            *(conv_norm_act(c_in, c_out, kernel_size, norm=norm, activation=True)
              for c_in, c_out in zip(widths, widths[1:]))
        )

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"seg_logits": Tensor[N, K, h, w]}`` at the first input map's resolution."""
        return {"seg_logits": self.classify(self.convs(self.gather(features)))}


@HEADS.register()
class EncHead(BaseDecodeHead):
    """EncNet's decode head (Zhang et al., "Context Encoding for Semantic Segmentation", CVPR 2018).

    1. A 3x3 conv + norm + ReLU reduces the input (c5 of a dilated ResNet) to ``channels``.
    2. With ``lateral``, the ``lateral_features`` maps (c3, c4) each pass a 1x1 conv + norm + ReLU
       to ``channels``, are resized to the reduced map, concatenated with it and fused by a 1x1
       conv + norm + ReLU (as the paper's code).
    3. The Context Encoding Module (:class:`~segkit.ops.encoding.ContextEncoding`, ``num_codes``
       codewords) gives a context vector Tensor[N, channels].
    4. Channel attention: ``gamma = sigmoid(FC(context))``, output ``relu(x + x * gamma)``.
    5. Dropout + 1x1 conv give ``seg_logits``.
    6. With ``use_se_loss``, an FC from the context vector gives ``se_logits`` Tensor[N, K], the
       presence logit of each class; ``loss_se`` is their binary cross-entropy against
       :func:`se_loss_targets` (mean over images and classes) times ``se_loss_weight``.
    7. With ``extra_encoding``, a second Context Encoding Module on ``extra_in_feature`` (stage 3,
       c4) predicts ``se_logits_aux`` with its own SE-loss ``loss_se_aux`` (same weight).

    Args:
        in_shapes, num_classes, in_features, dropout, ignore_index, loss_weight, norm, loss: see
            :class:`BaseDecodeHead` (``in_features`` defaults to ``"c5"``).
        channels: width after the reduction, of the encoding and of the attention (512).
        num_codes: codewords K of the encoding (32).
        use_se_loss: predict ``se_logits`` and add ``loss_se``.
        se_loss_weight: factor of ``loss_se`` (and ``loss_se_aux``).
        lateral: fuse ``lateral_features`` into the reduced map.
        lateral_features: the maps fused with ``lateral``.
        extra_encoding: add the encoding module with its SE-loss on ``extra_in_feature``.
        extra_in_feature: the map of the extra encoding.

    Raises:
        ValueError: see :class:`BaseDecodeHead`; also ``num_codes`` < 1, a negative
            ``se_loss_weight``, unknown lateral/extra map names, or ``extra_encoding`` without
            ``use_se_loss`` (its only output is an SE-loss).

    Example:
        >>> shapes = {"c4": ShapeSpec(128, 8), "c5": ShapeSpec(256, 8)}
        >>> head = EncHead(in_shapes=shapes, num_classes=21, channels=64, extra_encoding=True)
        >>> out = head({"c4": torch.rand(2, 128, 16, 16), "c5": torch.rand(2, 256, 16, 16)})
        >>> out["seg_logits"].shape, out["se_logits"].shape, out["se_logits_aux"].shape
        (torch.Size([2, 21, 16, 16]), torch.Size([2, 21]), torch.Size([2, 21]))
    """

    def __init__(
        self,
        *,
        in_shapes: Mapping[str, ShapeSpec],
        num_classes: int,
        in_features: str | Sequence[str] = "c5",
        channels: int = 512,
        num_codes: int = 32,
        use_se_loss: bool = True,
        se_loss_weight: float = 0.2,
        lateral: bool = False,
        lateral_features: Sequence[str] = ("c3", "c4"),
        extra_encoding: bool = False,
        extra_in_feature: str = "c4",
        dropout: float = 0.1,
        ignore_index: int = 255,
        loss_weight: float = 1.0,
        norm: str | None = "BN",
        loss: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(
            in_shapes=in_shapes, num_classes=num_classes, in_features=in_features, channels=channels,
            dropout=dropout, ignore_index=ignore_index, loss_weight=loss_weight, norm=norm, loss=loss,
        )
        if se_loss_weight < 0:
            raise ValueError(f"EncHead se_loss_weight must be >= 0, got {se_loss_weight}")
        if extra_encoding and not use_se_loss:
            raise ValueError("EncHead extra_encoding only adds an SE-loss; it needs use_se_loss: true")
        self.use_se_loss = bool(use_se_loss)
        self.se_loss_weight = float(se_loss_weight)
        self.reduce = conv_norm_act(self.in_channels, self.channels, 3, norm=norm, activation=True)
        self.lateral_features: tuple[str, ...] = ()
        if lateral:
            self.lateral_features = feature_names(lateral_features, in_shapes, owner="EncHead", key="lateral_features")
            self.lateral_convs = nn.ModuleList(
                conv_norm_act(in_shapes[name].channels, self.channels, 1, norm=norm, activation=True)
                for name in self.lateral_features
            )
            self.fusion = conv_norm_act(self.channels * (1 + len(self.lateral_features)), self.channels, 1, norm=norm,
                                        activation=True)
        self.encoding = ContextEncoding(in_channels=self.channels, num_codes=num_codes, norm=norm)
        self.attention = nn.Linear(self.channels, self.channels)
        self.se_classifier = nn.Linear(self.channels, self.num_classes) if use_se_loss else None
        self.extra_in_feature: str | None = None
        if extra_encoding:
            if not isinstance(extra_in_feature, str):
                raise ValueError(f"EncHead extra_in_feature names one map, got {extra_in_feature!r}")
            (self.extra_in_feature,) = feature_names(
                extra_in_feature, in_shapes, owner="EncHead", key="extra_in_feature"
            )
            self.extra_encoding = ContextEncoding(
                in_channels=in_shapes[self.extra_in_feature].channels, channels=self.channels,
                num_codes=num_codes, norm=norm,
            )
            self.extra_se_classifier = nn.Linear(self.channels, self.num_classes)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Segment a batch of feature maps.

        Args:
            features: the maps named by ``in_features`` (and the lateral / extra ones when used),
                each Tensor[N, C, h, w].

        Returns:
            ``seg_logits`` Tensor[N, K, h, w] at the resolution of the first ``in_features`` map;
            with ``use_se_loss`` also ``se_logits`` Tensor[N, K]; with ``extra_encoding`` also
            ``se_logits_aux`` Tensor[N, K].
        """
        x = self.reduce(self.gather(features))
        if self.lateral_features:
            laterals = [
                resize_map(conv(features[name]), x.shape[-2:])
                for name, conv in zip(self.lateral_features, self.lateral_convs)
            ]
            x = self.fusion(torch.cat([x, *laterals], dim=1))
        context = self.encoding(x)  # [N, channels]
        gamma = torch.sigmoid(self.attention(context)).to(x.dtype)
        x = F.relu(x + x * gamma[:, :, None, None])
        outputs = {"seg_logits": self.classify(x)}
        if self.se_classifier is not None:
            outputs["se_logits"] = self.se_classifier(context)
        if self.extra_in_feature is not None:
            outputs["se_logits_aux"] = self.extra_se_classifier(self.extra_encoding(features[self.extra_in_feature]))
        return outputs

    def losses(self, outputs: Mapping[str, Tensor], sem_seg: Tensor) -> dict[str, Tensor]:
        """``loss_seg``, and ``loss_se`` / ``loss_se_aux`` when enabled, against Tensor[N, H, W] labels."""
        losses = super().losses(outputs, sem_seg)
        if not self.use_se_loss:
            return losses
        targets = se_loss_targets(sem_seg, self.num_classes, self.ignore_index)
        keys = [("se_logits", "loss_se")] + ([("se_logits_aux", "loss_se_aux")] if self.extra_in_feature else [])
        for logits_key, loss_key in keys:
            logits = outputs[logits_key].float()
            loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
            losses[loss_key] = loss * self.se_loss_weight
        return losses
