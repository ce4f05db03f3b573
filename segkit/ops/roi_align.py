"""RoIAlign on the CPU as one weighted gather, for training.

torchvision's CPU ``roi_align`` kernels loop over every output element in one thread, and its
backward costs more than every convolution of a Mask R-CNN's heads. For a CPU input that needs a
gradient, this module writes RoIAlign as what it is, a weighted sum of feature-map pixels: each
output bin's bilinear sampling positions and weights are computed for all RoIs at once (the
kernel's float arithmetic, boundary rules and averaging), and ``F.embedding_bag`` gathers and sums
the channels-last pixels (its backward, one sparse matrix product). Values equal torchvision's up to
float summation order (tested, about 1e-6). Several pyramid levels pooled for the same RoIs
(PANet's adaptive feature pooling) are one gather over the concatenated levels. CUDA tensors,
``sampling_ratio <= 0`` (a per-RoI adaptive grid) and inference use torchvision's kernels.

Under autocast (mixed precision) half-precision features are pooled in float32 and the result is
float32: bilinear weights and box coordinates in bfloat16 would be off by whole pixels.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align as tv_roi_align

__all__ = ["roi_align", "roi_align_levels", "float32_under_autocast"]

_HALF = (torch.float16, torch.bfloat16)


def float32_under_autocast(features: Sequence[Tensor]) -> list[Tensor]:
    """``features`` in float32 when autocast is on for their device and they are half precision.

    RoI pooling and box geometry stay in float32 under mixed precision (torchvision's autocast rule
    for ``roi_align`` casts to float32 too); outside autocast the tensors are returned as they are.
    """
    features = list(features)
    if features and any(f.dtype in _HALF for f in features) and torch.is_autocast_enabled(features[0].device.type):
        return [f.float() if f.dtype in _HALF else f for f in features]
    return features


def _axis_samples(start: Tensor, length: Tensor, bins: int, grid: int, size: int) -> tuple[Tensor, Tensor]:
    """Bilinear sample positions of one axis: ``low`` / ``high`` pixel indices and their weights.

    Args:
        start: Tensor[R], the RoI's first coordinate on the feature map.
        length: Tensor[R], its extent (already clamped as the kernel does).
        bins: pooled bins along the axis.
        grid: samples per bin along the axis.
        size: the feature map's extent along the axis.

    Returns:
        ``index`` Tensor[R, bins, grid, 2] (int64, low then high) and ``weight`` of the same shape
        (zero for samples outside the map), in the kernel's float arithmetic.
    """
    bin_size = length / bins
    pos = torch.arange(bins, dtype=start.dtype, device=start.device)
    off = torch.arange(grid, dtype=start.dtype, device=start.device) + 0.5
    # start + p * bin_size + (i + 0.5) * bin_size / grid, evaluated in the kernel's order
    coord = (start[:, None] + pos[None, :] * bin_size[:, None])[:, :, None] + (off[None, :] * bin_size[:, None] / grid)[:, None, :]
    valid = (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0)
    low = coord.to(torch.int64)
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    coord = torch.where(at_edge, low.to(coord.dtype), coord)
    frac = coord - low.to(coord.dtype)
    weight = torch.stack([1.0 - frac, frac], dim=-1) * valid[..., None]
    return torch.stack([low, high], dim=-1), weight


def _sampling(rois: Tensor, shape: Sequence[int], scale: float, size: tuple[int, int], grid: int,
              aligned: bool, first_row: int) -> tuple[Tensor, Tensor]:
    """Rows of the channels-last pixel table and weights summed by every output bin.

    Returns:
        ``index`` int64 and ``weight`` Tensor[R * PH * PW, 4 * grid**2]; ``index`` counts from
        ``first_row``, the row of pixel (0, 0, 0) of this map in the table.
    """
    _, _, h, w = shape
    (ph, pw), r = size, rois.shape[0]
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * scale - offset
    y1 = rois[:, 2] * scale - offset
    width = rois[:, 3] * scale - offset - x1
    height = rois[:, 4] * scale - offset - y1
    if not aligned:
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    y_idx, y_w = _axis_samples(y1, height, ph, grid, h)  # [R, PH, S, 2]
    x_idx, x_w = _axis_samples(x1, width, pw, grid, w)  # [R, PW, S, 2]
    # every (RoI, bin y, bin x, sample y, sample x, corner y, corner x)
    base = rois[:, 0].to(torch.int64) * (h * w) + first_row
    index = (base[:, None, None, None, None, None, None]
             + y_idx[:, :, None, :, None, :, None] * w
             + x_idx[:, None, :, None, :, None, :])
    weight = y_w[:, :, None, :, None, :, None] * x_w[:, None, :, None, :, None, :] / float(grid * grid)
    shape7 = (r, ph, pw, grid, grid, 2, 2)
    per_bin = 4 * grid * grid
    return index.expand(shape7).reshape(r * ph * pw, per_bin), weight.expand(shape7).reshape(r * ph * pw, per_bin)


def _use_gather(features: Sequence[Tensor], sampling_ratio: int) -> bool:
    return (sampling_ratio > 0 and torch.is_grad_enabled()
            and all(f.device.type == "cpu" and f.dtype in (torch.float32, torch.float64) for f in features)
            and any(f.requires_grad for f in features))


def _gather(features: Sequence[Tensor], rois: Tensor, size: tuple[int, int], scales: Sequence[float],
            sampling_ratio: int, aligned: bool) -> Tensor:
    """Pool every RoI from every map in one ``embedding_bag``: Tensor[L, R, C, PH, PW]."""
    channels = features[0].shape[1]
    rois = rois.to(features[0].dtype)
    indices, weights, tables, first_row = [], [], [], 0
    for feature, scale in zip(features, scales):
        index, weight = _sampling(rois, feature.shape, scale, size, sampling_ratio, aligned, first_row)
        indices.append(index)
        weights.append(weight)
        tables.append(feature.permute(0, 2, 3, 1).reshape(-1, channels))
        first_row += tables[-1].shape[0]
    table = tables[0] if len(tables) == 1 else torch.cat(tables)
    index = indices[0] if len(indices) == 1 else torch.cat(indices)
    weight = weights[0] if len(weights) == 1 else torch.cat(weights)
    out = _WeightedGather.apply(table, index, weight.to(table.dtype))
    return out.view(len(features), rois.shape[0], *size, channels).permute(0, 1, 4, 2, 3)


class _WeightedGather(torch.autograd.Function):
    """``out[b] = sum_k weight[b, k] * table[index[b, k]]``, differentiable with respect to ``table``.

    The forward is ``F.embedding_bag``. Its own backward sorts and reduces one gradient row per
    (bag, sample) pair; this backward is the transposed sampling matrix times the output gradient,
    ``A^T @ grad``, with ``A^T`` built in CSR form from one stable sort of the pixel indices
    (three times faster for RoI pooling, and deterministic: every pixel's contributions are summed
    in bag order). The weights get no gradient, as in torchvision's ``roi_align`` (RoIs are not
    differentiated).
    """

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(index, weight)
        ctx.rows = table.shape[0]
        return F.embedding_bag(index, table, per_sample_weights=weight, mode="sum")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        index, weight = ctx.saved_tensors
        rows, per_bag = ctx.rows, index.shape[1]
        flat = index.flatten()
        # int32 keys sort twice as fast; pixel tables stay far below 2**31 rows
        keys = flat.to(torch.int32) if rows < 2**31 else flat
        order = torch.sort(keys, stable=True).indices
        counts = torch.bincount(flat, minlength=rows)
        crow = torch.zeros(rows + 1, dtype=torch.int64, device=flat.device)
        torch.cumsum(counts, 0, out=crow[1:])
        bags = torch.div(order, per_bag, rounding_mode="floor")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            transposed = torch.sparse_csr_tensor(crow, bags, weight.flatten()[order], (rows, index.shape[0]),
                                                 check_invariants=False)
            return transposed @ grad.contiguous(), None, None


def _pair(output_size: int | Sequence[int]) -> tuple[int, int]:
    return (output_size, output_size) if isinstance(output_size, int) else (int(output_size[0]), int(output_size[1]))


def roi_align(
    input: Tensor,
    rois: Tensor,
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """``torchvision.ops.roi_align`` (same arguments and values) with fast CPU training.

    Args:
        input: Tensor[N, C, H, W].
        rois: Tensor[R, 5], (image index, x1, y1, x2, y2) in input pixels.
        output_size: ``(PH, PW)`` or one int.
        spatial_scale: input pixels to feature-map cells.
        sampling_ratio: bilinear samples per bin side; ``<= 0`` for torchvision's adaptive grid.
        aligned: shift the RoI by half a pixel.

    Returns:
        Tensor[R, C, PH, PW].

    Example:
        >>> x = torch.rand(1, 4, 16, 16, requires_grad=True)
        >>> roi_align(x, torch.tensor([[0.0, 1.0, 1.0, 9.0, 9.0]]), 7, 1.0, 2).shape
        torch.Size([1, 4, 7, 7])
    """
    size = _pair(output_size)
    (input,) = float32_under_autocast([input])
    rois = rois.to(input.dtype) if rois.dtype in _HALF and input.dtype not in _HALF else rois
    if _use_gather([input], sampling_ratio):
        return _gather([input], rois, size, [float(spatial_scale)], int(sampling_ratio), bool(aligned))[0]
    return tv_roi_align(input, rois, size, spatial_scale, sampling_ratio, aligned)


def roi_align_levels(
    features: Sequence[Tensor],
    rois: Tensor,
    output_size: int | Sequence[int],
    spatial_scales: Sequence[float],
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign of the same RoIs from several maps of a pyramid (same channels, own scales).

    Args:
        features: L maps Tensor[N, C, H_l, W_l].
        rois: Tensor[R, 5], (image index, x1, y1, x2, y2) in input pixels.
        output_size: ``(PH, PW)`` or one int.
        spatial_scales: one per map (``1 / stride``).
        sampling_ratio, aligned: as in :func:`roi_align`.

    Returns:
        Tensor[L, R, C, PH, PW]; ``[l]`` equals ``roi_align(features[l], rois, ..., spatial_scales[l])``.
    """
    size = _pair(output_size)
    if len(features) != len(spatial_scales):
        raise ValueError(f"got {len(features)} feature maps but {len(spatial_scales)} spatial scales")
    features = float32_under_autocast(features)
    rois = rois.to(features[0].dtype) if rois.dtype in _HALF and features[0].dtype not in _HALF else rois
    if _use_gather(features, sampling_ratio):
        return _gather(features, rois, size, [float(s) for s in spatial_scales], int(sampling_ratio), bool(aligned))
    return torch.stack([tv_roi_align(f, rois, size, s, sampling_ratio, aligned) for f, s in zip(features, spatial_scales)])
