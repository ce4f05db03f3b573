"""RoIAlign with a vectorised CPU backward.

The forward pass is torchvision's ``roi_align``. On the CPU its backward kernel walks every output
element in one thread, and at a Mask R-CNN's RoI counts it costs more than every convolution of the
heads together. Here the backward is the same sum written as one scatter: each output bin's
bilinear sampling weights are computed for all RoIs at once (the same float32 arithmetic, boundary
rules and averaging as the kernel), and the weighted output gradients are accumulated into a
channels-last gradient with ``index_add_``. The result equals torchvision's gradient up to
float summation order (tested). CUDA tensors, ``sampling_ratio <= 0`` (a per-RoI adaptive grid)
and inputs that need no gradient use torchvision's own kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import roi_align as tv_roi_align

__all__ = ["roi_align", "roi_align_backward"]


def _axis_samples(start: Tensor, length: Tensor, bins: int, grid: int, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear sample positions of one axis: ``low`` / ``high`` pixel indices and their weights.

    Args:
        start: Tensor[R], the RoI's first coordinate on the feature map.
        length: Tensor[R], its extent (already clamped as the kernel does).
        bins: pooled bins along the axis.
        grid: samples per bin along the axis.
        size: the feature map's extent along the axis.

    Returns:
        ``index`` Tensor[R, bins, grid, 2] (int64, low then high), ``weight`` Tensor[R, bins, grid, 2]
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


def roi_align_backward(
    grad_output: Tensor,
    rois: Tensor,
    input_shape: Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """Gradient of ``roi_align`` with respect to its input (``sampling_ratio > 0``).

    Args:
        grad_output: Tensor[R, C, PH, PW].
        rois: Tensor[R, 5], (image index, x1, y1, x2, y2) in input pixels.
        input_shape: ``(N, C, H, W)`` of the pooled feature map.
        spatial_scale, sampling_ratio, aligned: as given to ``roi_align``.

    Returns:
        Tensor[N, C, H, W], the gradient, dtype and device of ``grad_output``.
    """
    if sampling_ratio <= 0:
        raise ValueError(f"roi_align_backward needs a fixed sampling_ratio > 0, got {sampling_ratio}")
    n, c, h, w = (int(s) for s in input_shape)
    r, _, ph, pw = grad_output.shape
    grad_input = grad_output.new_zeros((n * h * w, c))
    if r == 0:
        return grad_input.view(n, h, w, c).permute(0, 3, 1, 2).contiguous()
    rois = rois.to(grad_output.dtype)
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    width = rois[:, 3] * spatial_scale - offset - x1
    height = rois[:, 4] * spatial_scale - offset - y1
    if not aligned:
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    s = sampling_ratio
    y_idx, y_w = _axis_samples(y1, height, ph, s, h)  # [R, PH, S, 2]
    x_idx, x_w = _axis_samples(x1, width, pw, s, w)  # [R, PW, S, 2]
    # every (RoI, bin y, bin x, sample y, sample x, corner y, corner x): flat pixel index and weight
    base = rois[:, 0].to(torch.int64) * (h * w)
    index = (base[:, None, None, None, None, None, None]
             + y_idx[:, :, None, :, None, :, None] * w
             + x_idx[:, None, :, None, :, None, :])
    weight = y_w[:, :, None, :, None, :, None] * x_w[:, None, :, None, :, None, :] / float(s * s)
    index = index.expand(r, ph, pw, s, s, 2, 2).reshape(r * ph * pw, -1)
    weight = weight.expand(r, ph, pw, s, s, 2, 2).reshape(r * ph * pw, -1)
    rows = grad_output.permute(0, 2, 3, 1).reshape(r * ph * pw, 1, c)
    source = (rows * weight[:, :, None]).reshape(-1, c)
    grad_input.index_add_(0, index.reshape(-1), source)
    return grad_input.view(n, h, w, c).permute(0, 3, 1, 2).contiguous()


class _RoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, rois, output_size, spatial_scale, sampling_ratio, aligned):  # noqa: D102
        ctx.save_for_backward(rois)
        ctx.settings = (tuple(input.shape), spatial_scale, sampling_ratio, aligned)
        return tv_roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        (rois,) = ctx.saved_tensors
        shape, spatial_scale, sampling_ratio, aligned = ctx.settings
        grad = roi_align_backward(grad_output, rois, shape, spatial_scale, sampling_ratio, aligned)
        return grad, None, None, None, None, None


def roi_align(
    input: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """``torchvision.ops.roi_align`` (same arguments and values) with a fast CPU backward.

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
        >>> out = roi_align(x, torch.tensor([[0.0, 1.0, 1.0, 9.0, 9.0]]), 7, 1.0, 2)
        >>> out.shape
        torch.Size([1, 4, 7, 7])
    """
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if (input.device.type == "cpu" and input.requires_grad and torch.is_grad_enabled()
            and sampling_ratio > 0 and input.dtype in (torch.float32, torch.float64)):
        return _RoIAlign.apply(input, rois, size, float(spatial_scale), int(sampling_ratio), bool(aligned))
    return tv_roi_align(input, rois, size, spatial_scale, sampling_ratio, aligned)
