"""Box heads with PANet's adaptive feature pooling (AFP): every RoI uses every pyramid level.

Liu et al., "Path Aggregation Network for Instance Segmentation" (CVPR 2018), section 3.2: each
RoI is pooled from all L levels; each level's grid goes through its own first layer (separate
weights per level); the L results are fused element-wise (max in the paper and the authors' code)
and the fused feature goes through the rest of the head, shared by all levels.

Parameter layout: an AFP head is its plain head (``TwoFCHead`` / ``ConvFCHead``) whose first layer
is replaced by a ``ModuleList`` holding one copy per level, so every shared parameter keeps the
plain head's name (``fc7``; ``convs.<i>`` for ``i >= 1``, ``fcs.<j>``). With
``adaptive_pooling=False`` the first layer is the plain one and the head *is* the plain head
(same forward, same state-dict keys): ablating AFP is one config override.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.registry import HEADS
from segkit_plugins.heads.box_heads import ConvFCHead, TwoFCHead, pooled_linear

__all__ = ["AFPTwoFCHead", "AFPConvFCHead", "fuse_levels"]

FUSIONS = ("max", "sum")  # what fuse_levels can do


def _check_afp_options(owner: str, num_levels: int, fusion: str) -> None:
    if fusion not in FUSIONS:
        raise ValueError(f"{owner} fusion must be one of {FUSIONS}, got {fusion!r}")
    if num_levels < 1:
        raise ValueError(f"{owner} needs num_levels >= 1 (the number of pooled pyramid levels), got {num_levels}")


def fuse_levels(per_level: Iterable[Tensor], fusion: str) -> Tensor:
    """``relu`` of every level's output, fused element-wise across the levels (max or sum).

    For ``max`` the ReLU is applied once, after the fusion: ``relu(max(a, b)) == max(relu(a), relu(b))``
    in value and in gradient (ReLU is monotonic, and where every level is <= 0 both give zero), so
    one pass over the fused map replaces L passes over the levels. Levels are fused pairwise as they
    come, so no [L, ...] stack is made; each level's output is consumed (ReLU in place), so it must
    be a fresh result that no backward pass reads (a conv's or a norm's output).
    """
    levels = iter(per_level)
    out = next(levels)
    if fusion == "max":
        for x in levels:
            out = torch.maximum(out, x)
        return F.relu(out, inplace=True)
    out = F.relu(out, inplace=True)
    for x in levels:
        out = out + F.relu(x, inplace=True)
    return out


def _check_levels(owner: str, x: Tensor, num_levels: int) -> None:
    if x.dim() != 5 or x.shape[0] != num_levels:
        raise ValueError(
            f"{owner} with adaptive_pooling=True expects RoIs pooled from every level, "
            f"Tensor[L={num_levels}, R, C, S, S], got shape {tuple(x.shape)}; set num_levels to the "
            f"number of pooled maps (len(in_features)) or adaptive_pooling=False for Tensor[R, C, S, S]"
        )


@HEADS.register()
class AFPTwoFCHead(TwoFCHead):
    """``TwoFCHead`` with adaptive feature pooling: one fc6 per level, fusion, then the shared fc7.

    As in the authors' code, each level's fc6 is followed by its ReLU *before* the fusion
    (``relu(fc6_l(x_l))``, then max or sum, then ``relu(fc7(.))``). For ``max`` the order does not
    matter (ReLU is monotonic), and :func:`fuse_levels` applies it once after the fusion; for
    ``sum`` it does. (The authors' 2fc variant also puts GroupNorm after fc7; this head keeps
    ``TwoFCHead``'s plain fc7.) Layers use PyTorch's default initialisation, like ``TwoFCHead``.

    Parameter names: ``fc6.<l>`` for level ``l < num_levels`` (finest first) and ``fc7``; with
    ``adaptive_pooling=False``, ``fc6`` and ``fc7`` exactly as ``TwoFCHead``.

    Args:
        in_channels: channels of the pooled features.
        resolution: side of the pooled features (``7`` for ``7 x 7``).
        num_levels: number of pooled pyramid levels L (set to ``len(in_features)`` by
            ``StandardRoIHead`` when built from a config).
        fc_dim: width of fc6 and fc7, also the output size (``out_channels``).
        fusion: ``"max"`` (the paper's) or ``"sum"``, element-wise across levels.
        adaptive_pooling: ``False`` turns the head into a plain ``TwoFCHead`` (input
            Tensor[R, C, S, S]); ``num_levels`` and ``fusion`` are then unused.

    Raises:
        ValueError: an unknown ``fusion`` or ``num_levels < 1``.

    Example:
        >>> head = AFPTwoFCHead(in_channels=8, resolution=7, num_levels=4, fc_dim=32)
        >>> head(torch.rand(4, 5, 8, 7, 7)).shape
        torch.Size([5, 32])
    """

    def __init__(
        self,
        *,
        in_channels: int,
        resolution: int,
        num_levels: int = 4,
        fc_dim: int = 1024,
        fusion: str = "max",
        adaptive_pooling: bool = True,
    ) -> None:
        _check_afp_options(type(self).__name__, num_levels, fusion)
        super().__init__(in_channels=in_channels, resolution=resolution, fc_dim=fc_dim)
        self.adaptive_pooling = bool(adaptive_pooling)
        self.num_levels = int(num_levels)
        self.fusion = fusion
        if self.adaptive_pooling:
            width = in_channels * resolution * resolution
            self.fc6 = nn.ModuleList(nn.Linear(width, fc_dim) for _ in range(num_levels))

    def forward(self, x: Tensor) -> Tensor:
        """Map Tensor[L, R, C, S, S] (every RoI from every level, finest first) to Tensor[R, fc_dim].

        With ``adaptive_pooling=False``: Tensor[R, C, S, S] to Tensor[R, fc_dim], as ``TwoFCHead``.
        """
        if not self.adaptive_pooling:
            return super().forward(x)
        _check_levels(type(self).__name__, x, self.num_levels)
        # fc6 of every level; pooled_linear orders the weights' columns as the bins are laid out
        fused = fuse_levels((pooled_linear(x_level, fc.weight, fc.bias) for fc, x_level in zip(self.fc6, x)),
                            self.fusion)
        return F.relu(self.fc7(fused), inplace=True)


@HEADS.register()
class AFPConvFCHead(ConvFCHead):
    """``ConvFCHead`` with adaptive feature pooling: one first 3x3 conv (+ norm + ReLU) per level,
    fusion, then the shared ``num_convs - 1`` convs and ``num_fcs`` fully connected layers.

    With ``num_convs=4, num_fcs=1, norm="GN"`` this is the box head of the authors' PANet configs.
    As there, each level's conv, norm and ReLU come before the fusion (:func:`fuse_levels`). Initialisation is
    ``ConvFCHead``'s (every level's conv drawn independently).

    Parameter names: ``convs.0.<l>.0`` (conv) and ``convs.0.<l>.1`` (norm, if any) for level
    ``l < num_levels`` (finest first); ``convs.<i>`` for ``1 <= i < num_convs`` and ``fcs.<j>``
    exactly as ``ConvFCHead``. With ``adaptive_pooling=False`` the head is a plain ``ConvFCHead``.

    Args:
        in_channels: channels of the pooled features.
        resolution: side of the pooled features (``7`` for ``7 x 7``).
        num_levels: number of pooled pyramid levels L (set to ``len(in_features)`` by
            ``StandardRoIHead`` when built from a config).
        num_convs: number of 3x3 convs including the per-level first one (``>= 1`` with AFP).
        conv_dim: channels of every conv.
        num_fcs: number of fully connected layers (``fc_dim`` wide).
        fc_dim: width of the fully connected layers.
        norm: ``None``, ``"BN"``, ``"SyncBN"`` or ``"GN"`` after every conv.
        fusion: ``"max"`` (the paper's) or ``"sum"``, element-wise across levels.
        adaptive_pooling: ``False`` turns the head into a plain ``ConvFCHead`` (input
            Tensor[R, C, S, S]); ``num_levels`` and ``fusion`` are then unused.

    Raises:
        ValueError: an unknown ``fusion`` or ``norm``, ``num_levels < 1``, ``num_convs < 1`` with
            adaptive pooling, or no layer at all.

    Example:
        >>> head = AFPConvFCHead(in_channels=8, resolution=7, num_levels=3, num_convs=2, conv_dim=16,
        ...                      fc_dim=32, norm="GN")
        >>> head(torch.rand(3, 5, 8, 7, 7)).shape, head.out_channels
        (torch.Size([5, 32]), 32)
    """

    def __init__(
        self,
        *,
        in_channels: int,
        resolution: int,
        num_levels: int = 4,
        num_convs: int = 4,
        conv_dim: int = 256,
        num_fcs: int = 1,
        fc_dim: int = 1024,
        norm: str | None = None,
        fusion: str = "max",
        adaptive_pooling: bool = True,
    ) -> None:
        owner = type(self).__name__
        _check_afp_options(owner, num_levels, fusion)
        if adaptive_pooling and num_convs < 1:
            raise ValueError(f"{owner} fuses levels after its first conv and needs num_convs >= 1, got "
                             f"{num_convs}; use AFPTwoFCHead for a head without convs")
        super().__init__(in_channels=in_channels, resolution=resolution, num_convs=num_convs,
                         conv_dim=conv_dim, num_fcs=num_fcs, fc_dim=fc_dim, norm=norm)
        self.adaptive_pooling = bool(adaptive_pooling)
        self.num_levels = int(num_levels)
        self.fusion = fusion
        if self.adaptive_pooling:
            # A one-conv ConvFCHead builds the first block exactly as ConvFCHead does (layers, init).
            self.convs[0] = nn.ModuleList(
                ConvFCHead(in_channels=in_channels, resolution=resolution, num_convs=1, conv_dim=conv_dim,
                           num_fcs=0, norm=norm).convs[0]
                for _ in range(num_levels)
            )

    def forward(self, x: Tensor) -> Tensor:
        """Map Tensor[L, R, C, S, S] (every RoI from every level, finest first) to Tensor[R, out_channels].

        With ``adaptive_pooling=False``: Tensor[R, C, S, S] to Tensor[R, out_channels], as ``ConvFCHead``.
        """
        if not self.adaptive_pooling:
            return super().forward(x)
        _check_levels(type(self).__name__, x, self.num_levels)
        x = fuse_levels((conv(x_level) for conv, x_level in zip(self.convs[0], x)), self.fusion)
        for conv in self.convs[1:]:
            x = F.relu(conv(x), inplace=True)
        x = x.flatten(1)
        for fc in self.fcs:
            x = F.relu(fc(x), inplace=True)
        return x
