"""Box heads: turn pooled RoI features into one feature vector per RoI."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from segkit.registry import HEADS
from segkit.ops.conv import conv_norm_act
from segkit.ops.norm import check_norm

__all__ = ["TwoFCHead", "ConvFCHead", "pooled_linear"]



def _channels_last_rows(x: Tensor) -> Tensor | None:
    """``x`` Tensor[..., C, S, S] as Tensor[..., S*S*C] without a copy, if its memory is channels-last.

    RoIAlign's CPU training path returns its bins channels-last; ``None`` for any other layout.
    """
    moved = x.movedim(-3, -1)
    return moved.flatten(-3) if moved.is_contiguous() else None


def pooled_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x.flatten(1), weight, bias)`` for pooled features Tensor[R, C, S, S].

    When ``x`` is laid out channels-last and is the larger operand, the weight's columns are put in
    that order instead of copying ``x`` into channel-major order (forward and backward); the result
    is the same product, summed in another order.
    """
    rows = _channels_last_rows(x)
    if rows is None or x.numel() <= weight.numel():
        return F.linear(x.flatten(1), weight, bias)
    c, h, w = x.shape[1:]
    return F.linear(rows, weight.view(-1, c, h, w).movedim(1, -1).reshape(weight.shape[0], -1), bias)


@HEADS.register()
class TwoFCHead(nn.Module):
    """Flatten, then two fully connected layers with ReLU (the Faster R-CNN "2fc" box head).

    Args:
        in_channels: channels of the pooled features.
        resolution: side of the pooled features (``7`` for ``7 x 7``).
        fc_dim: width of both layers, also the output size (``out_channels``).

    Example:
        >>> head = TwoFCHead(in_channels=8, resolution=7, fc_dim=32)
        >>> head(torch.rand(5, 8, 7, 7)).shape
        torch.Size([5, 32])
    """

    def __init__(self, *, in_channels: int, resolution: int, fc_dim: int = 1024) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_channels * resolution * resolution, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.out_channels = fc_dim

    def forward(self, x: Tensor) -> Tensor:
        """Map Tensor[R, C, S, S] pooled features to Tensor[R, fc_dim]."""
        x = F.relu(pooled_linear(x, self.fc6.weight, self.fc6.bias), inplace=True)
        return F.relu(self.fc7(x), inplace=True)


@HEADS.register()
class ConvFCHead(nn.Module):
    """``num_convs`` 3x3 convs, then ``num_fcs`` fully connected layers, each followed by ReLU.

    With ``num_convs=4, num_fcs=1, norm="BN"`` this is the "4conv1fc" box head of torchvision's
    ``fasterrcnn_resnet50_fpn_v2`` / ``maskrcnn_resnet50_fpn_v2``; with ``norm="GN"`` that of
    PANet and of Detectron2's GN baselines. Convs have a bias only without a norm. Initialisation
    follows Detectron2: convs Kaiming-normal (fan out), fully connected layers Kaiming-uniform with
    ``a=1``, biases zero.

    Parameter names: ``convs.<i>.0`` (conv) and ``convs.<i>.1`` (norm, if any) for ``i < num_convs``;
    ``fcs.<j>`` for ``j < num_fcs``.

    Args:
        in_channels: channels of the pooled features.
        resolution: side of the pooled features (``7`` for ``7 x 7``).
        num_convs: number of 3x3 convs (``conv_dim`` channels, padding 1).
        conv_dim: channels of every conv.
        num_fcs: number of fully connected layers (``fc_dim`` wide); with 0 the output is the
            flattened last feature map.
        fc_dim: width of the fully connected layers.
        norm: ``None``, ``"BN"``, ``"SyncBN"`` or ``"GN"`` after every conv.

    Example:
        >>> head = ConvFCHead(in_channels=8, resolution=7, num_convs=2, conv_dim=16, fc_dim=32, norm="GN")
        >>> head(torch.rand(5, 8, 7, 7)).shape, head.out_channels
        (torch.Size([5, 32]), 32)
    """

    def __init__(
        self,
        *,
        in_channels: int,
        resolution: int,
        num_convs: int = 4,
        conv_dim: int = 256,
        num_fcs: int = 1,
        fc_dim: int = 1024,
        norm: str | None = None,
    ) -> None:
        super().__init__()
        check_norm(norm, owner="ConvFCHead")
        if num_convs < 0 or num_fcs < 0 or num_convs + num_fcs == 0:
            raise ValueError(f"ConvFCHead needs num_convs >= 0, num_fcs >= 0 and at least one layer, "
                             f"got num_convs={num_convs}, num_fcs={num_fcs}")
        channels = in_channels
        self.convs = nn.ModuleList()
        for _ in range(num_convs):
            self.convs.append(conv_norm_act(channels, conv_dim, 3, norm=norm))
            channels = conv_dim
        width = channels * resolution * resolution
        self.fcs = nn.ModuleList()
        for _ in range(num_fcs):
            fc = nn.Linear(width, fc_dim)
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
            self.fcs.append(fc)
            width = fc_dim
        self.out_channels = width

    def forward(self, x: Tensor) -> Tensor:
        """Map Tensor[R, C, S, S] pooled features to Tensor[R, out_channels]."""
        for conv in self.convs:
            x = F.relu(conv(x), inplace=True)
        x = x.flatten(1)
        for fc in self.fcs:
            x = F.relu(fc(x), inplace=True)
        return x
