"""Instance-mask helpers: training targets cut out of full-image masks, and pasting RoI masks back.

Both follow torchvision's Mask R-CNN exactly, so converted torchvision models give the same
masks, but :func:`paste_masks_in_image` is vectorised: every mask is resized and placed with two
batched matrix products instead of one interpolation call per box.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["paste_masks_in_image", "project_masks_on_boxes", "resize_masks"]


def project_masks_on_boxes(gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor, size: int) -> Tensor:
    """Crop and resize ground-truth masks to the RoIs they were matched to.

    Args:
        gt_masks: uint8 or bool Tensor[G, H, W], one image's instance masks.
        boxes: Tensor[P, 4], xyxy RoIs in the masks' pixels.
        matched_idxs: int64 Tensor[P], for each RoI the index of its ground-truth mask.
        size: side ``M`` of the targets.

    Returns:
        float Tensor[P, M, M] in [0, 1]: the fraction of each bin covered by the mask (RoIAlign with
        adaptive sampling, no half-pixel offset, as torchvision computes its targets).
    """
    rois = torch.cat([matched_idxs.to(boxes)[:, None], boxes], dim=1)
    return roi_align(gt_masks[:, None].to(boxes), rois, (size, size), spatial_scale=1.0)[:, 0]


def resize_masks(masks: Tensor, scale: float) -> Tensor:
    """Resize uint8 Tensor[N, H, W] masks by ``scale`` with nearest neighbours, rounding the output
    size down like an image resized with ``F.interpolate(..., recompute_scale_factor=True)``."""
    if masks.shape[0] == 0:
        h, w = masks.shape[-2:]
        return masks.new_zeros((0, int(h * scale), int(w * scale)))
    resized = F.interpolate(masks[:, None].float(), scale_factor=scale, recompute_scale_factor=True)
    return resized[:, 0].to(masks.dtype)


def paste_masks_in_image(masks: Tensor, boxes: Tensor, image_size: Sequence[int], padding: int = 1) -> Tensor:
    """Paste RoI-sized mask probabilities into full images.

    Each ``M x M`` mask is padded by ``padding`` pixels of zeros, its box grown by the same ratio
    (``(M + 2 * padding) / M``) around its centre and truncated to integer pixels, and the padded mask
    resized bilinearly (half-pixel centres) to the box's ``(x2 - x1 + 1) x (y2 - y1 + 1)`` pixels,
    outside of which the result is 0. This is torchvision's ``paste_masks_in_image``; the resize is
    done for all masks at once as ``R_y @ mask @ R_x^T`` with per-box interpolation matrices.

    Args:
        masks: float Tensor[N, M, M] (or [N, 1, M, M]) probabilities.
        boxes: Tensor[N, 4], xyxy in the pixels of the output image.
        image_size: ``(height, width)`` of the output.
        padding: zero border added before resizing; softens the mask's edge at the box border.

    Returns:
        float Tensor[N, height, width].
    """
    height, width = int(image_size[0]), int(image_size[1])
    masks = masks.reshape(masks.shape[0], masks.shape[-2], masks.shape[-1])
    if masks.shape[0] == 0:
        return masks.new_zeros((0, height, width))
    side = masks.shape[-1]
    scale = (side + 2 * padding) / side
    masks = F.pad(masks, (padding,) * 4)
    centre = (boxes[:, :2] + boxes[:, 2:]) * 0.5
    half = (boxes[:, 2:] - boxes[:, :2]) * 0.5 * scale
    grown = torch.cat([centre - half, centre + half], dim=1).to(torch.int64)
    rows = _interpolation_matrix(grown[:, 1], grown[:, 3], height, masks.shape[-2], masks.dtype)
    cols = _interpolation_matrix(grown[:, 0], grown[:, 2], width, masks.shape[-1], masks.dtype)
    with torch.autocast(masks.device.type, enabled=False):  # probabilities stay float32 under mixed precision
        return rows @ masks @ cols.transpose(1, 2)


def _interpolation_matrix(start: Tensor, end: Tensor, out_len: int, in_len: int, dtype: torch.dtype) -> Tensor:
    """Tensor[N, out_len, in_len]: row ``p`` holds the bilinear weights (``align_corners=False``, source
    index clamped at 0 and ``in_len - 1``) with which output pixel ``p`` samples an ``in_len`` signal
    stretched over the integer pixels ``start..end`` (inclusive); rows outside that span are zero."""
    length = (end - start + 1).clamp(min=1)
    pos = torch.arange(out_len, device=start.device)
    local = pos[None, :] - start[:, None]
    inside = (local >= 0) & (local < length[:, None]) & (pos[None, :] <= end[:, None])
    step = in_len / length.to(dtype)
    src = ((local.to(dtype) + 0.5) * step[:, None] - 0.5).clamp(min=0)
    low = src.floor().to(torch.int64).clamp(max=in_len - 1)
    high = (low + 1).clamp(max=in_len - 1)
    frac = (src - low.to(dtype)).clamp(0, 1) * inside
    weights = torch.zeros((start.shape[0], out_len, in_len), dtype=dtype, device=start.device)
    weights.scatter_add_(2, low[..., None], ((1 - frac) * inside)[..., None])
    weights.scatter_add_(2, high[..., None], frac[..., None])
    return weights
