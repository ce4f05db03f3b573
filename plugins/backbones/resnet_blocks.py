"""Building blocks of the ResNet family: squeeze-and-excitation, residual blocks and their 3x3
convolution, plain or modulated deformable (normalisation by name comes from :mod:`segkit.ops.norm`).

Parameter names follow torchvision (``conv1``, ``bn1``, ``downsample.0``) and timm (``se.fc1``), so
their state dicts load into :class:`~segkit_plugins.backbones.resnet.ResNet` unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from segkit.ops.deform_conv import ModulatedDeformConv2d
from segkit.ops.norm import NORMS, fold_conv_norm, make_norm

__all__ = ["NORMS", "make_norm", "DeformOptions", "SqueezeExcite", "BasicBlock", "Bottleneck", "conv3x3"]


@dataclass(frozen=True)
class DeformOptions:
    """How a block's 3x3 convolutions deform (:class:`~segkit.ops.deform_conv.ModulatedDeformConv2d`).

    Args:
        deform_groups: channel groups with their own offsets and masks.
        mask_scale: the masks' upper bound; 2 starts each layer as the plain convolution, 1 is DCNv2's.
    """

    deform_groups: int = 1
    mask_scale: float = 2.0


def conv3x3(in_channels: int, out_channels: int, *, stride: int = 1, dilation: int = 1, groups: int = 1,
            deform: DeformOptions | None = None) -> nn.Conv2d | ModulatedDeformConv2d:
    """A bias-free 3x3 convolution with "same" padding (``dilation``); modulated deformable with ``deform``.

    Both keep the parameter name ``weight``, so a plain network's state dict loads into a deformable one.
    """
    if deform is None:
        return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation,
                         groups=groups, bias=False)
    return ModulatedDeformConv2d(in_channels=in_channels, out_channels=out_channels, kernel_size=3, stride=stride,
                                 padding=dilation, dilation=dilation, groups=groups,
                                 deform_groups=deform.deform_groups, bias=False, mask_scale=deform.mask_scale)


def se_channels(channels: int, reduction: int) -> int:
    """Hidden width of a squeeze-and-excitation unit: ``channels / reduction`` rounded to a multiple of 8 (at least 8)."""
    value = channels / reduction
    return max(8, int(value + 4) // 8 * 8)


class SqueezeExcite(nn.Module):
    """Channel gating: global average pool, 1x1 reduce, ReLU, 1x1 expand, sigmoid, scale the input.

    Args:
        channels: channels C of the input.
        reduction: ratio of C to the hidden width (16 in SENet).
    """

    def __init__(self, *, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = se_channels(channels, reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Scale ``x`` (Tensor[N, C, H, W]) by per-channel gates in (0, 1)."""
        gate = self.fc2(self.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * gate.sigmoid()


class _Residual(nn.Module):
    """Shared tail of a residual block: optional SE and stochastic depth on the branch, then the sum."""

    se: SqueezeExcite | None
    drop_path: StochasticDepth | None
    downsample: nn.Module | None

    def _finish(self, out_channels: int, se_reduction: int | None, drop_path: float, fold_norm: bool) -> None:
        self.fold_norm = fold_norm
        self.se = None if se_reduction is None else SqueezeExcite(channels=out_channels, reduction=se_reduction)
        self.drop_path = StochasticDepth(drop_path, mode="row") if drop_path > 0 else None
        self.relu = nn.ReLU(inplace=True)

    def _merge(self, branch: Tensor, x: Tensor) -> Tensor:
        identity = x
        if self.downsample is not None:
            identity = fold_conv_norm(self.downsample[0], self.downsample[1], x, self.fold_norm)
        if self.se is not None:
            branch = self.se(branch)
        if self.drop_path is not None:
            branch = self.drop_path(branch)
        branch += identity  # in place, as the branch's last op saves no output for backward: no new map
        return self.relu(branch)


class BasicBlock(_Residual):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut; output width ``width``.

    Args:
        in_channels: input channels.
        width: channels of both convolutions and of the output.
        stride: stride of the first convolution and of the shortcut.
        norm: builds a normalisation layer for a channel count.
        dilation: dilation (and padding) of both convolutions.
        se_reduction: add squeeze-and-excitation with this reduction; ``None`` for none.
        drop_path: probability of dropping the residual branch per sample in training.
        fold_norm: compute each convolution and a fixed-affine norm after it as one convolution
            (:func:`segkit.ops.norm.fold_conv_norm`).
        deform: make both 3x3 convolutions modulated deformable ones; ``None`` for plain ones.
    """

    expansion = 1

    def __init__(self, *, in_channels: int, width: int, stride: int, norm: Callable[[int], nn.Module],
                 dilation: int = 1, se_reduction: int | None = None, drop_path: float = 0.0,
                 fold_norm: bool = False, deform: DeformOptions | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, width, stride=stride, dilation=dilation, deform=deform)
        self.bn1 = norm(width)
        self.conv2 = conv3x3(width, width, dilation=dilation, deform=deform)
        self.bn2 = norm(width)
        self.downsample = shortcut(in_channels, width, stride, norm)
        self._finish(width, se_reduction, drop_path, fold_norm)

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        """Tensor[N, C_in, H, W] -> Tensor[N, width, H / stride, W / stride]."""
        out = self.relu(fold_conv_norm(self.conv1, self.bn1, x, self.fold_norm))
        return self._merge(fold_conv_norm(self.conv2, self.bn2, out, self.fold_norm), x)


class Bottleneck(_Residual):
    """1x1 reduce, 3x3 grouped (strided, dilated), 1x1 expand to ``4 * width``, with a shortcut.

    Args:
        in_channels: input channels.
        width: the stage's base width; the output has ``4 * width`` channels.
        stride: stride of the 3x3 convolution and of the shortcut.
        norm: builds a normalisation layer for a channel count.
        groups: groups of the 3x3 convolution (ResNeXt cardinality).
        width_per_group: channels per group at ``width=64``; the 3x3 convolution has
            ``floor(width * width_per_group / 64) * groups`` channels.
        half_first: the first 1x1 convolution outputs half the 3x3's input width (SENet-154).
        dilation: dilation (and padding) of the 3x3 convolution.
        shortcut_kernel: kernel size of a projection shortcut (1, or 3 in SENet-154).
        se_reduction: add squeeze-and-excitation with this reduction; ``None`` for none.
        drop_path: probability of dropping the residual branch per sample in training.
        fold_norm: compute each convolution and a fixed-affine norm after it as one convolution
            (:func:`segkit.ops.norm.fold_conv_norm`).
        deform: make the 3x3 convolution a modulated deformable one; ``None`` for a plain one.
    """

    expansion = 4

    def __init__(self, *, in_channels: int, width: int, stride: int, norm: Callable[[int], nn.Module],
                 groups: int = 1, width_per_group: int = 64, half_first: bool = False, dilation: int = 1,
                 shortcut_kernel: int = 1, se_reduction: int | None = None, drop_path: float = 0.0,
                 fold_norm: bool = False, deform: DeformOptions | None = None) -> None:
        super().__init__()
        inner = int(width * width_per_group / 64) * groups
        first = inner // 2 if half_first else inner
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, first, 1, bias=False)
        self.bn1 = norm(first)
        self.conv2 = conv3x3(first, inner, stride=stride, dilation=dilation, groups=groups, deform=deform)
        self.bn2 = norm(inner)
        self.conv3 = nn.Conv2d(inner, out_channels, 1, bias=False)
        self.bn3 = norm(out_channels)
        self.downsample = shortcut(in_channels, out_channels, stride, norm, kernel=shortcut_kernel)
        self._finish(out_channels, se_reduction, drop_path, fold_norm)

    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        """Tensor[N, C_in, H, W] -> Tensor[N, 4 * width, H / stride, W / stride]."""
        out = self.relu(fold_conv_norm(self.conv1, self.bn1, x, self.fold_norm))
        out = self.relu(fold_conv_norm(self.conv2, self.bn2, out, self.fold_norm))
        return self._merge(fold_conv_norm(self.conv3, self.bn3, out, self.fold_norm), x)


def shortcut(in_channels: int, out_channels: int, stride: int, norm: Callable[[int], nn.Module],
             kernel: int = 1) -> nn.Module | None:
    """``None`` (identity) when shapes agree, else a strided ``kernel x kernel`` projection and a norm."""
    if stride == 1 and in_channels == out_channels:
        return None
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, norm(out_channels))
