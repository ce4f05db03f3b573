"""RoIAlign over a feature pyramid, each box pooled from the level that fits its size (or from all)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from segkit.ops.roi_align import float32_under_autocast, roi_align, roi_align_levels

__all__ = ["MultiLevelRoIAlign", "assign_boxes_to_levels", "boxes_to_rois"]


def assign_boxes_to_levels(
    boxes: Tensor,
    *,
    min_level: int,
    max_level: int,
    canonical_box_size: float = 224.0,
    canonical_level: int = 4,
) -> Tensor:
    """Pyramid level of each box by the FPN rule ``floor(k0 + log2(sqrt(area) / s0) + 1e-6)``.

    Args:
        boxes: Tensor[R, 4], xyxy input pixels.
        min_level: the finest available level (2 for P2, stride 4).
        max_level: the coarsest available level.
        canonical_box_size: ``s0``, the box size that maps to ``canonical_level``.
        canonical_level: ``k0``.

    Returns:
        Tensor[R], int64, the level index relative to ``min_level`` (0 = finest).
    """
    sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_box_size) + 1e-6)
    levels = torch.clamp(levels, min=min_level, max=max_level)
    return levels.to(torch.int64) - min_level


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Concatenate per-image boxes into the ``[R, 5]`` (image index, x1, y1, x2, y2) RoI format.

    Args:
        boxes: one Tensor[R_i, 4] per image.

    Returns:
        Tensor[sum R_i, 5], the dtype of the boxes.
    """
    concat = torch.cat(list(boxes), dim=0)
    image_idx = torch.cat([torch.full_like(b[:, 0], i, dtype=torch.int64) for i, b in enumerate(boxes)])
    return torch.cat([image_idx[:, None].to(concat.dtype), concat], dim=1)


class MultiLevelRoIAlign(nn.Module):
    """Pool a fixed-size feature for each box from the pyramid level chosen for its size.

    Levels are derived from the strides (``log2(stride)``), so features at strides 4, 8, 16, 32
    are levels 2..5; boxes assigned outside that range are clamped to it.

    Args:
        strides: stride of each feature map that is pooled, finest first, powers of two.
        output_size: side of the pooled feature (``7`` gives ``7 x 7``) or ``(h, w)``.
        sampling_ratio: sampling points per output bin side (``0``: adaptive), as in ``roi_align``.
        aligned: shift box coordinates by half a pixel (``roi_align(aligned=True)``).
        canonical_box_size: box size mapped to ``canonical_level``.
        canonical_level: level of a ``canonical_box_size`` box.

    Example:
        >>> pool = MultiLevelRoIAlign(strides=(4, 8), output_size=7, sampling_ratio=2)
        >>> feats = [torch.rand(1, 16, 32, 32), torch.rand(1, 16, 16, 16)]
        >>> pool(feats, [torch.tensor([[0.0, 0.0, 50.0, 60.0]])]).shape
        torch.Size([1, 16, 7, 7])
    """

    def __init__(
        self,
        *,
        strides: Sequence[int],
        output_size: int | Sequence[int] = 7,
        sampling_ratio: int = 2,
        aligned: bool = False,
        canonical_box_size: float = 224.0,
        canonical_level: int = 4,
    ) -> None:
        super().__init__()
        levels = [math.log2(s) for s in strides]
        if not strides or any(lv != int(lv) for lv in levels):
            raise ValueError(f"RoI pooling needs power-of-two strides, got {tuple(strides)}")
        if any(b - a != 1 for a, b in zip(levels, levels[1:])):
            raise ValueError(f"RoI pooling needs consecutive pyramid levels, finest first; got strides {tuple(strides)}")
        self.strides = tuple(int(s) for s in strides)
        self.min_level = int(levels[0])
        self.max_level = int(levels[-1])
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.canonical_box_size = float(canonical_box_size)
        self.canonical_level = int(canonical_level)

    def forward(self, features: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        """Pool every box of every image.

        Args:
            features: one Tensor[N, C, H_l, W_l] per stride given at construction.
            boxes: one Tensor[R_i, 4] per image, xyxy input pixels.

        Returns:
            Tensor[sum R_i, C, *output_size], boxes in image order then box order.
        """
        if len(features) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature maps (strides {self.strides}), got {len(features)}")
        features = float32_under_autocast(features)  # pooled in float32 under mixed precision
        rois = boxes_to_rois(boxes).to(features[0].dtype)
        if len(features) == 1:
            return roi_align(
                features[0], rois, self.output_size, 1.0 / self.strides[0], self.sampling_ratio, self.aligned
            )
        levels = assign_boxes_to_levels(
            rois[:, 1:],
            min_level=self.min_level,
            max_level=self.max_level,
            canonical_box_size=self.canonical_box_size,
            canonical_level=self.canonical_level,
        )
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], *self.output_size))
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            idx = torch.nonzero(levels == level).squeeze(1)
            if idx.numel() == 0 and not torch.jit.is_tracing():  # a trace must keep every level (export)
                continue
            out[idx] = roi_align(feature, rois[idx], self.output_size, 1.0 / stride, self.sampling_ratio, self.aligned)
        return out

    def pool_all_levels(self, features: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        """Pool every box from **every** level (PANet's adaptive feature pooling).

        Args:
            features: one Tensor[N, C, H_l, W_l] per stride given at construction.
            boxes: one Tensor[R_i, 4] per image, xyxy input pixels.

        Returns:
            Tensor[L, sum R_i, C, *output_size]: level ``l`` (finest first) pooled at its own stride.
        """
        if len(features) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature maps (strides {self.strides}), got {len(features)}")
        features = float32_under_autocast(features)  # pooled in float32 under mixed precision
        rois = boxes_to_rois(boxes).to(features[0].dtype)
        scales = [1.0 / stride for stride in self.strides]
        return roi_align_levels(features, rois, self.output_size, scales, self.sampling_ratio, self.aligned)
