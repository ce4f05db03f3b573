"""SSD's default boxes (Liu et al., "SSD: Single Shot MultiBox Detector", section 2.2): per level, boxes
of a scale relative to the image at every cell centre, the same as torchvision's ``DefaultBoxGenerator``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["DefaultBoxGenerator", "ssd_scales"]


def ssd_scales(num_levels: int, min_ratio: float = 0.15, max_ratio: float = 0.9) -> list[float]:
    """The paper's scales: ``num_levels`` values spaced evenly from ``min_ratio`` to ``max_ratio``, then 1.0
    (the extra value gives the last level's second square box).

    Example:
        >>> [round(s, 3) for s in ssd_scales(6, 0.2, 0.9)]
        [0.2, 0.34, 0.48, 0.62, 0.76, 0.9, 1.0]
    """
    if num_levels < 2:
        return [float(min_ratio), float(max_ratio)]
    step = (max_ratio - min_ratio) / (num_levels - 1.0)
    return [min_ratio + step * k for k in range(num_levels)] + [1.0]


class DefaultBoxGenerator:
    """SSD's default boxes for every cell of every level.

    At level ``k`` with scale ``s_k`` (a fraction of the image side), each cell has a square box of side
    ``s_k``, one of side ``sqrt(s_k * s_{k+1})``, and for each aspect ratio ``a`` of the level the boxes
    ``(s_k sqrt(a), s_k / sqrt(a))`` and ``(s_k / sqrt(a), s_k sqrt(a))`` (width, height). With ``clip``,
    widths and heights are capped at 1 (the whole image) before the boxes are placed. Cell centres are
    ``(j + 0.5) * step / W`` (``(i + 0.5) * step / H``), the fractions scaled by the image's width and
    height: a level's ``step`` is the image pixels per cell (SSD300: 8, 16, 32, 64, 100, 300); without
    steps, the grid covers the image exactly.

    Args:
        aspect_ratios: per level, the extra aspect ratios (SSD300: ``[[2], [2, 3], [2, 3], [2, 3], [2], [2]]``).
        scales: ``num_levels + 1`` scales; ``None`` computes them from ``min_ratio`` / ``max_ratio``
            (:func:`ssd_scales`).
        min_ratio / max_ratio: the range of the computed scales.
        steps: per level, the image pixels per cell, or ``None``.
        clip: cap box widths and heights at the image's.

    Example:
        >>> gen = DefaultBoxGenerator(aspect_ratios=[[2], [2, 3]], steps=[8, 16])
        >>> [tuple(b.shape) for b in gen([torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)], (32, 32))]
        [(64, 4), (24, 4)]
    """

    def __init__(
        self,
        *,
        aspect_ratios: Sequence[Sequence[float]],
        scales: Sequence[float] | None = None,
        min_ratio: float = 0.15,
        max_ratio: float = 0.9,
        steps: Sequence[float] | None = None,
        clip: bool = True,
    ) -> None:
        num_levels = len(aspect_ratios)
        if steps is not None and len(steps) != num_levels:
            raise ValueError(f"default boxes have aspect ratios for {num_levels} levels but {len(steps)} steps")
        self.scales = [float(s) for s in scales] if scales is not None else ssd_scales(num_levels, min_ratio, max_ratio)
        if len(self.scales) != num_levels + 1:
            raise ValueError(f"default boxes need {num_levels + 1} scales for {num_levels} levels (one more for the "
                             f"last level's second square box), got {len(self.scales)}")
        self.aspect_ratios = [tuple(float(a) for a in ratios) for ratios in aspect_ratios]
        self.steps = None if steps is None else [float(s) for s in steps]
        self.clip = bool(clip)
        self._sizes = [self._level_sizes(k) for k in range(num_levels)]

    def _level_sizes(self, k: int) -> Tensor:
        """Tensor[A_k, 2] float32: (width, height) of the cell boxes of level ``k``, fractions of the image."""
        scale, next_scale = self.scales[k], self.scales[k + 1]
        pairs = [(scale, scale), (math.sqrt(scale * next_scale),) * 2]
        for ratio in self.aspect_ratios[k]:
            root = math.sqrt(ratio)
            pairs += [(scale * root, scale / root), (scale / root, scale * root)]
        sizes = torch.tensor(pairs, dtype=torch.float32)
        return sizes.clamp(min=0, max=1) if self.clip else sizes

    @property
    def num_levels(self) -> int:
        return len(self.aspect_ratios)

    def num_anchors_per_location(self) -> list[int]:
        """Boxes per cell of each level: two squares and two per aspect ratio."""
        return [2 + 2 * len(r) for r in self.aspect_ratios]

    def __call__(self, features: Sequence[Tensor], image_size: Sequence[int]) -> list[Tensor]:
        """Default boxes of each level.

        Args:
            features: one map ``[N, C, H_k, W_k]`` per level (only the grid sizes, dtype and device are used).
            image_size: ``(height, width)`` of the batch the features were computed from.

        Returns:
            One Tensor[H_k * W_k * A_k, 4] per level (xyxy input pixels, float32 or the features' float
            dtype), ordered by row, column and cell box, as a head's output laid out ``[N, H, W, A]``.
        """
        if len(features) != self.num_levels:
            raise ValueError(f"the default boxes are set for {self.num_levels} levels but got {len(features)} maps")
        height, width = int(image_size[0]), int(image_size[1])
        dtype = features[0].dtype if features[0].dtype == torch.float64 else torch.float32
        device = features[0].device
        image_wh = torch.tensor([width, height], device=device)
        boxes = []
        for k, feature in enumerate(features):
            grid_h, grid_w = feature.shape[-2:]
            cells_x = width / self.steps[k] if self.steps is not None else grid_w
            cells_y = height / self.steps[k] if self.steps is not None else grid_h
            centre_x = ((torch.arange(grid_w, device=device) + 0.5) / cells_x).to(dtype)
            centre_y = ((torch.arange(grid_h, device=device) + 0.5) / cells_y).to(dtype)
            yy, xx = torch.meshgrid(centre_y, centre_x, indexing="ij")
            centres = torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=1)  # [H*W, 2]
            sizes = self._sizes[k].to(device=device, dtype=dtype)
            num_cells, num_sizes = centres.shape[0], sizes.shape[0]
            centres = centres[:, None, :].expand(num_cells, num_sizes, 2).reshape(-1, 2)
            sizes = sizes[None].expand(num_cells, num_sizes, 2).reshape(-1, 2)
            boxes.append(torch.cat(((centres - 0.5 * sizes) * image_wh, (centres + 0.5 * sizes) * image_wh), dim=1))
        return boxes
