"""Modulated deformable convolution (Deformable ConvNets v2, Zhu et al., CVPR 2019) on
:func:`torchvision.ops.deform_conv2d`.

Each output position samples its ``k x k`` inputs at the regular grid moved by learned offsets
(bilinear interpolation, zeros outside the map) and scales each sample by a learned mask. A plain
convolution over the same input, with the same stride, padding and dilation, predicts both per
position.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

__all__ = ["ModulatedDeformConv2d"]


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"ModulatedDeformConv2d {name} must be an integer or a pair of integers, got {value!r}")
    return pair  # type: ignore[return-value]


class ModulatedDeformConv2d(nn.Module):
    """A ``kernel_size`` convolution whose samples move by learned offsets and are scaled by learned masks.

    ``conv_offset`` (a plain convolution with bias, the geometry of the main one) predicts, per
    deformable group g and kernel position k (row-major), the row and column offsets ``(dy, dx)`` in
    input pixels, then the mask logits: channels ``[2 * K * G offsets | K * G logits]`` with
    ``K = kernel_size**2``, offsets interleaved ``(dy, dx)`` per (g, k) as :func:`~torchvision.ops.deform_conv2d`
    reads them. The mask is ``mask_scale * sigmoid(logit)``.

    Initialisation: ``conv_offset`` is zero, so the offsets are 0 and every mask is
    ``mask_scale * 0.5``. With the default ``mask_scale=2`` the mask starts at exactly 1 and the layer
    *is* the plain convolution with the same ``weight`` and ``bias``: a pretrained convolution put in its
    place keeps its function until the offsets learn, even under frozen normalisation. The DCNv2 paper
    (and MMCV / Detectron2) use ``mask_scale=1``: masks in (0, 1), 0.5 at initialisation, which halves the
    layer's output until training adapts; set it to load weights trained that way. ``weight`` and
    ``bias`` keep ``nn.Conv2d``'s names and shapes (and its default initialisation), so a plain
    convolution's state dict loads with only ``conv_offset.*`` missing.

    Args:
        in_channels: channels C_in of the input.
        out_channels: channels of the output.
        kernel_size: side of the square kernel.
        stride: stride of the convolution (and of ``conv_offset``).
        padding: zero padding on each side.
        dilation: spacing of the regular sampling grid, before the offsets.
        groups: groups of the main convolution (ResNeXt cardinality); ``conv_offset`` is not grouped.
        deform_groups: channel groups with their own offsets and masks; must divide C_in.
        bias: give the main convolution a bias.
        mask_scale: the masks' upper bound: 2 starts the layer as a plain convolution, 1 is DCNv2's.

    Example:
        >>> conv = ModulatedDeformConv2d(in_channels=8, out_channels=16, kernel_size=3, padding=1)
        >>> conv(torch.rand(2, 8, 20, 30)).shape
        torch.Size([2, 16, 20, 30])
    """

    def __init__(self, *, in_channels: int, out_channels: int, kernel_size: int, stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1, groups: int = 1,
                 deform_groups: int = 1, bias: bool = True, mask_scale: float = 2.0) -> None:
        super().__init__()
        if min(in_channels, out_channels, kernel_size, groups, deform_groups) < 1:
            raise ValueError("ModulatedDeformConv2d channels, kernel_size, groups and deform_groups must be positive, "
                             f"got {in_channels}, {out_channels}, {kernel_size}, {groups}, {deform_groups}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"ModulatedDeformConv2d groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        if in_channels % deform_groups:
            raise ValueError(f"ModulatedDeformConv2d deform_groups={deform_groups} must divide "
                             f"in_channels={in_channels}")
        if not mask_scale > 0:
            raise ValueError(f"ModulatedDeformConv2d mask_scale must be positive (2 or DCNv2's 1), got {mask_scale}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding = _pair(stride, "stride"), _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.groups, self.deform_groups, self.mask_scale = groups, deform_groups, float(mask_scale)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.conv_offset = nn.Conv2d(in_channels, 3 * deform_groups * kernel_size**2, kernel_size, stride=self.stride,
                                     padding=self.padding, dilation=self.dilation, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``weight`` and ``bias`` as ``nn.Conv2d`` draws them; ``conv_offset`` zero (:meth:`zero_offsets`)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, groups=self.groups,
                         bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if self.bias is not None:
                self.bias.copy_(conv.bias)
        self.zero_offsets()

    def zero_offsets(self) -> None:
        """Zero ``conv_offset``: offsets 0 and masks ``mask_scale / 2`` everywhere (the layer's initial state)."""
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def offsets_and_masks(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The sampling offsets, Tensor[N, 2 * G * K, H_out, W_out] (input pixels, ``(dy, dx)`` per group
        and kernel position), and masks, Tensor[N, G * K, H_out, W_out] in ``(0, mask_scale)``, for ``x``."""
        out = self.conv_offset(x)
        split = 2 * self.deform_groups * self.kernel_size**2
        return out[:, :split], out[:, split:].sigmoid() * self.mask_scale

    def forward(self, x: Tensor) -> Tensor:
        """Tensor[N, C_in, H, W] -> Tensor[N, out_channels, H_out, W_out], H_out as ``nn.Conv2d`` computes it."""
        return self._deform(x, self.weight, self.bias)

    def forward_affine(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """``self(x) * scale + shift`` per output channel (Tensor[out_channels] each), as one deformable
        convolution: the deformable sum is linear in the weights, so the scale goes into them and the
        shift into the bias (how :func:`segkit.ops.norm.fold_conv_norm` folds a fixed-affine norm)."""
        if self.bias is not None:
            shift = self.bias * scale + shift
        return self._deform(x, self.weight * scale.reshape(-1, 1, 1, 1), shift)

    def _deform(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):
            # torchvision's CPU kernel has no float16 / bfloat16 path (its CUDA autocast casts to float32 too):
            # the whole layer, offsets included, runs in float32 and hands back the input's dtype.
            with torch.autocast(x.device.type, enabled=False):
                out = self._deform(x.float(), weight.float(), None if bias is None else bias.float())
            return out.to(x.dtype)
        offset, mask = self.offsets_and_masks(x)
        return deform_conv2d(x, offset, weight, bias, self.stride, self.padding, self.dilation, mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"deform_groups={self.deform_groups}, bias={self.bias is not None}, mask_scale={self.mask_scale}")
