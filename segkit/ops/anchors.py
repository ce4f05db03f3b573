"""Anchor boxes laid on the grid of each feature level."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["AnchorGenerator", "cell_anchors", "octave_anchor_sizes"]


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Zero-centred anchors for one level, one per (aspect ratio, size) pair.

    An aspect ratio is height / width; each anchor keeps the area ``size ** 2``. Corners are
    rounded to integers, so the anchors of a level are symmetric about the cell origin.

    Args:
        sizes: anchor side lengths in input pixels (the square root of the area).
        aspect_ratios: height / width ratios.

    Returns:
        Tensor[len(aspect_ratios) * len(sizes), 4], float32: xyxy offsets from the cell origin,
        ordered aspect-ratio-major (all sizes of the first ratio, then the next ratio).
    """
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def octave_anchor_sizes(base_sizes: Sequence[float] = (32, 64, 128, 256, 512),
                        scales_per_octave: int = 3) -> tuple[tuple[int, ...], ...]:
    """Per level, the sizes ``base * 2 ** (i / scales_per_octave)`` for ``i < scales_per_octave``,
    truncated to integers as torchvision's RetinaNet does (its anchors, exactly).

    Example:
        >>> octave_anchor_sizes((32, 64))
        ((32, 40, 50), (64, 80, 101))
    """
    if scales_per_octave < 1:
        raise ValueError(f"scales_per_octave must be >= 1, got {scales_per_octave}")
    return tuple(tuple(int(base * 2 ** (i / scales_per_octave)) for i in range(scales_per_octave))
                 for base in base_sizes)


class AnchorGenerator(nn.Module):
    """Anchors for every position of every feature level.

    At a level with grid ``(gh, gw)`` the stride is the padded batch size divided by the grid size
    (integer division, per axis); with inputs padded to a multiple of the coarsest stride this is
    the level's nominal stride. Anchors are ordered position-major (row, column), then by cell
    anchor, matching a head output laid out as ``[N, H, W, A]``.

    Args:
        sizes: per level, the anchor sizes in input pixels, e.g. ``((32,), (64,), ...)``.
        aspect_ratios: height / width ratios, shared by all levels, or one sequence per level.

    Example:
        >>> gen = AnchorGenerator(sizes=((32,), (64,)), aspect_ratios=(0.5, 1.0, 2.0))
        >>> feats = [torch.zeros(1, 8, 16, 16), torch.zeros(1, 8, 8, 8)]
        >>> [a.shape for a in gen(feats, (64, 64))]
        [torch.Size([768, 4]), torch.Size([192, 4])]
    """

    def __init__(
        self,
        *,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[float] | Sequence[Sequence[float]] = (0.5, 1.0, 2.0),
    ) -> None:
        super().__init__()
        sizes = [tuple(s) if isinstance(s, (list, tuple)) else (s,) for s in sizes]
        if aspect_ratios and isinstance(aspect_ratios[0], (list, tuple)):
            ratios = [tuple(r) for r in aspect_ratios]  # type: ignore[arg-type]
        else:
            ratios = [tuple(aspect_ratios)] * len(sizes)  # type: ignore[arg-type]
        if len(ratios) != len(sizes):
            raise ValueError(
                f"got anchor sizes for {len(sizes)} levels but aspect ratios for {len(ratios)}; "
                "give one aspect-ratio sequence for all levels or one per level"
            )
        self.sizes = sizes
        self.aspect_ratios = ratios
        self._cells = [cell_anchors(s, r) for s, r in zip(sizes, ratios)]

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    def num_anchors_per_location(self) -> list[int]:
        """Number of cell anchors at each level."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def forward(self, features: Sequence[Tensor], padded_size: Sequence[int]) -> list[Tensor]:
        """Anchors of each level.

        Args:
            features: one map ``[N, C, H, W]`` per level (only the shape, dtype and device are used).
            padded_size: ``(height, width)`` of the padded batch the features were computed from.

        Returns:
            One Tensor[H * W * A, 4] per level, the dtype of the features (float32 for half-precision
            features under autocast: bfloat16 would round the coordinates to several pixels), xyxy
            input pixels.
        """
        if len(features) != self.num_levels:
            raise ValueError(
                f"the anchor generator has sizes for {self.num_levels} levels but got {len(features)} feature maps"
            )
        anchors = []
        for feature, cells in zip(features, self._cells):
            grid_h, grid_w = feature.shape[-2:]
            stride_h = int(padded_size[0]) // grid_h
            stride_w = int(padded_size[1]) // grid_w
            device = feature.device
            shift_x = torch.arange(grid_w, dtype=torch.int32, device=device) * stride_w
            shift_y = torch.arange(grid_h, dtype=torch.int32, device=device) * stride_h
            yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            dtype = feature.dtype
            if dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(device.type):
                dtype = torch.float32
            shifts = torch.stack((xx, yy, xx, yy), dim=1).to(dtype)
            cells = cells.to(dtype=dtype, device=device)
            anchors.append((shifts[:, None, :] + cells[None, :, :]).reshape(-1, 4))
        return anchors
