"""PANet mask heads: adaptive feature pooling and the fused (FCN + FC) mask branch.

Liu et al., "Path Aggregation Network for Instance Segmentation" (CVPR 2018), sections 3.2-3.3.
Both parts are independent switches on :class:`PANetMaskHead`, a :class:`MaskRCNNHead` whose
targets, loss, inference, ``class_agnostic``, ``max_train_rois`` and ``mask_threshold`` are inherited.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from segkit.ops import ShapeSpec
from segkit.ops.conv import conv_norm_act
from segkit.registry import HEADS
from segkit_plugins.heads.afp_box_heads import FUSIONS, fuse_levels
from segkit_plugins.heads.mask_heads import DEFAULT_FEATURES, MaskRCNNHead

__all__ = ["AFPMaskHead", "FusedMaskHead", "PANetMaskHead"]


@HEADS.register()
class PANetMaskHead(MaskRCNNHead):
    """PANet's mask head: adaptive feature pooling plus the fused FCN + FC mask branch.

    Adaptive feature pooling (``adaptive_pooling``): every RoI is pooled from **every** pyramid level
    (:meth:`pool` returns Tensor[L, R, C, S, S]); the first conv of the FCN has separate weights per
    level (``level_convs``, each Sequential(conv[, norm]) followed by ReLU, as in the authors' code),
    the L results are fused element-wise (``fusion``: ``"max"`` as the paper, or ``"sum"``) and go on
    through the shared convs 2..``num_convs``. ``convs[0]`` is then an unused ``nn.Identity`` so that
    the shared convs keep :class:`MaskRCNNHead`'s parameter names (``convs.1``, ``convs.2``, ...).

    Fused mask branch (``fused``): from the output of the third conv, two 3x3 convs (``fc_convs``:
    ``fc_conv_dim`` then ``fc_conv_dim // 2`` channels, each + norm + ReLU) and a fully connected
    layer ``fc`` with ReLU give one class-agnostic (2S)x(2S) logit map per RoI, added to the FCN's
    logits of every class (Tensor[R, 1, 2S, 2S] broadcast over K) before the sigmoid.

    Args:
        adaptive_pooling: pool from all levels and fuse after per-level first convs; ``False``
            uses the inherited single-level pooling (each RoI from the level of its size).
        fused: add the FC path's map to the logits; needs ``num_convs >= 3``.
        fusion: ``"max"`` or ``"sum"``, how the per-level features are fused.
        fc_conv_dim: channels of the first conv of the FC path (``None``: ``conv_dim``).
        The rest: as :class:`MaskRCNNHead`.

    Raises:
        ValueError: for an unknown ``fusion``, ``fused`` with ``num_convs < 3``, adaptive pooling
            with ``num_convs < 1``, or ``fc_conv_dim < 2``.

    Example:
        >>> shapes = {"p2": ShapeSpec(16, 4), "p3": ShapeSpec(16, 8)}
        >>> head = PANetMaskHead(in_shapes=shapes, num_classes=3, in_features=["p2", "p3"], conv_dim=16)
        >>> feats = {"p2": torch.rand(1, 16, 32, 32), "p3": torch.rand(1, 16, 16, 16)}
        >>> instances = [{"boxes": torch.tensor([[8.0, 8.0, 60.0, 40.0]]), "labels": torch.tensor([2])}]
        >>> det = head.eval()(feats, instances)
        >>> det[0]["roi_masks"].shape
        torch.Size([1, 1, 28, 28])
    """

    def __init__(
        self,
        *,
        in_shapes: Mapping[str, ShapeSpec],
        num_classes: int,
        adaptive_pooling: bool = True,
        fused: bool = True,
        fusion: str = "max",
        fc_conv_dim: int | None = None,
        in_features: Sequence[str] = DEFAULT_FEATURES,
        pooler_resolution: int = 14,
        pooler_sampling_ratio: int = 2,
        pooler_aligned: bool = False,
        num_convs: int = 4,
        conv_dim: int = 256,
        norm: str | None = None,
        class_agnostic: bool = False,
        loss_weight: float = 1.0,
        target_threshold: float | None = None,
        mask_threshold: float = 0.5,
        max_train_rois: int | None = None,
    ) -> None:
        name = type(self).__name__
        if fusion not in FUSIONS:
            choices = ", ".join(map(repr, FUSIONS))
            raise ValueError(f"{name}: mask_head.fusion must be one of {choices}, got {fusion!r}")
        if fused and num_convs < 3:
            raise ValueError(
                f"{name}: the fused mask branch starts from the third conv, so it needs mask_head.num_convs >= 3 "
                f"(got {num_convs}); raise num_convs or set fused: false"
            )
        if adaptive_pooling and num_convs < 1:
            raise ValueError(
                f"{name}: adaptive feature pooling fuses the levels after a per-level first conv, so it needs "
                f"mask_head.num_convs >= 1 (got {num_convs}); raise num_convs or set adaptive_pooling: false"
            )
        if fc_conv_dim is not None and fc_conv_dim < 2:
            raise ValueError(
                f"{name}: mask_head.fc_conv_dim must be >= 2 (the second conv of the FC path has half its "
                f"channels), got {fc_conv_dim}"
            )
        super().__init__(
            in_shapes=in_shapes, num_classes=num_classes, in_features=in_features,
            pooler_resolution=pooler_resolution, pooler_sampling_ratio=pooler_sampling_ratio,
            pooler_aligned=pooler_aligned, num_convs=num_convs, conv_dim=conv_dim, norm=norm,
            class_agnostic=class_agnostic, loss_weight=loss_weight, target_threshold=target_threshold,
            mask_threshold=mask_threshold, max_train_rois=max_train_rois,
        )
        self.adaptive_pooling = bool(adaptive_pooling)
        self.fused = bool(fused)
        self.fusion = fusion
        if self.adaptive_pooling:
            in_channels = self.convs[0][0].in_channels
            self.level_convs = nn.ModuleList(conv_norm_act(in_channels, conv_dim, 3, norm=norm) for _ in self.in_features)
            self.convs[0] = nn.Identity()
        if self.fused:
            fc_conv_dim = conv_dim if fc_conv_dim is None else int(fc_conv_dim)
            height, width = self.pooler.output_size
            self.fc_convs = nn.ModuleList([
                conv_norm_act(conv_dim, fc_conv_dim, 3, norm=norm), conv_norm_act(fc_conv_dim, fc_conv_dim // 2, 3, norm=norm),
            ])
            self.fc = nn.Linear(fc_conv_dim // 2 * height * width, 4 * height * width)
            # The authors initialise the FC with N(0, 0.01) and a zero bias.
            nn.init.normal_(self.fc.weight, std=0.01)
            nn.init.zeros_(self.fc.bias)

    def pool(self, feats: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        """RoI features for :meth:`layers`: Tensor[L, R, C, S, S] from every level (adaptive pooling),
        else the inherited Tensor[R, C, S, S] from the level of each box's size."""
        if self.adaptive_pooling:
            return self.pooler.pool_all_levels(feats, boxes)
        return super().pool(feats, boxes)

    def fuse_levels(self, x: Tensor) -> Tensor:
        """The first conv of the FCN on all levels: Tensor[L, R, C, S, S] -> Tensor[R, conv_dim, S, S].

        Each level has its own conv (+ norm), followed by ReLU *before* the element-wise fusion, as in
        the authors' code (``mask_conv1[i]`` = conv, GN, ReLU; then ``torch.max`` across levels).
        """
        if x.dim() != 5 or len(x) != len(self.level_convs):
            raise ValueError(
                f"adaptive pooling expects pooled features Tensor[L={len(self.level_convs)}, R, C, S, S], "
                f"got shape {tuple(x.shape)}"
            )
        return fuse_levels((conv(level) for conv, level in zip(self.level_convs, x)), self.fusion)

    def fused_map(self, x: Tensor) -> Tensor:
        """The FC path: output of the third conv Tensor[R, conv_dim, S, S] -> Tensor[R, 1, 2S, 2S].

        The authors' code (``mask_fc`` = Linear + ReLU) and the issue text agree that the FC output
        goes through ReLU, so this map is non-negative.
        """
        for conv in self.fc_convs:
            x = F.relu(conv(x), inplace=True)
        height, width = x.shape[-2:]
        return F.relu(self.fc(x.flatten(1)), inplace=True).reshape(x.shape[0], 1, 2 * height, 2 * width)

    def layers(self, x: Tensor) -> Tensor:
        """Mask logits Tensor[R, K or 1, 2S, 2S] of pooled features (see :meth:`pool` for the shape)."""
        first = 0
        if self.adaptive_pooling:
            x, first = self.fuse_levels(x), 1
        branch = None
        for index in range(first, len(self.convs)):
            x = F.relu(self.convs[index](x), inplace=True)
            if index == 2 and self.fused:
                branch = self.fused_map(x)
        logits = self.predictor(F.relu(self.deconv(x), inplace=True))
        return logits if branch is None else logits + branch


AFPMaskHead = HEADS.add_variant(
    PANetMaskHead, "AFPMaskHead", ":class:`PANetMaskHead` with adaptive feature pooling only.",
    defaults={"adaptive_pooling": True, "fused": False})
FusedMaskHead = HEADS.add_variant(
    PANetMaskHead, "FusedMaskHead", ":class:`PANetMaskHead` with the fused FCN + FC branch only.",
    defaults={"adaptive_pooling": False, "fused": True})
