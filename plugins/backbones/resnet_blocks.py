"""Building blocks of the ResNet family: squeeze-and-excitation and residual blocks (normalisation by
name comes from :mod:`segkit.ops.norm`).

Parameter names follow torchvision (``conv1``, ``bn1``, ``downsample.0``) and timm (``se.fc1``), so
their state dicts load into :class:`~segkit_plugins.backbones.resnet.ResNet` unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from segkit.ops.norm import NORMS, fold_conv_norm, make_norm

__all__ = ["NORMS", "make_norm", "SqueezeExcite", "BasicBlock", "Bottleneck"]


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
    """

    expansion = 1

    def __init__(self, *, in_channels: int, width: int, stride: int, norm: Callable[[int], nn.Module],
                 dilation: int = 1, se_reduction: int | None = None, drop_path: float = 0.0,
                 fold_norm: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, bias=False)
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
    """

    expansion = 4

    def __init__(self, *, in_channels: int, width: int, stride: int, norm: Callable[[int], nn.Module],
                 groups: int = 1, width_per_group: int = 64, half_first: bool = False, dilation: int = 1,
                 shortcut_kernel: int = 1, se_reduction: int | None = None, drop_path: float = 0.0,
                 fold_norm: bool = False) -> None:
        super().__init__()
        inner = int(width * width_per_group / 64) * groups
        first = inner // 2 if half_first else inner
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, first, 1, bias=False)
        self.bn1 = norm(first)
        self.conv2 = nn.Conv2d(first, inner, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups,
                               bias=False)
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
