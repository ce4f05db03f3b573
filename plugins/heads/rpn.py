"""Region Proposal Network: objectness and box deltas for anchors on every pyramid level."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

from segkit.ops import AnchorGenerator, BalancedSampler, BoxCoder, Matcher, ShapeSpec, shared_channels, smooth_l1_loss
from segkit.registry import HEADS

__all__ = ["RPN"]

_DEFAULT_SIZES = ((32,), (64,), (128,), (256,), (512,))


@HEADS.register()
class RPN(nn.Module):
    """Region Proposal Network (as in Faster R-CNN), shared across pyramid levels.

    ``conv_depth`` 3x3 convs, each followed by ReLU, feed a 1x1 objectness conv (one logit per
    anchor) and a 1x1 delta conv (four deltas per anchor); one conv is Faster R-CNN's head, two
    that of torchvision's ``*_v2`` detectors (Li et al., "Benchmarking Detection Transfer Learning
    with Vision Transformers"). Proposals are decoded from the anchors, the ``pre_nms_top_n`` best of each
    level are kept, clipped to the image, small and low-scoring ones dropped, NMS applied per
    level, and the ``post_nms_top_n`` best of the image returned. In training the anchors are
    matched to the ground truth (IoU ``>= fg_iou_threshold`` positive, ``< bg_iou_threshold``
    negative, plus each box's best anchors) and ``batch_size_per_image`` of them are sampled for
    ``loss_rpn_cls`` (binary cross-entropy, mean over sampled anchors) and ``loss_rpn_box``
    (smooth L1 over sampled positives, summed, divided by the number of sampled anchors).

    Args:
        in_shapes: the neck's ``output_shape()``; the used maps must share one channel count.
        in_features: maps to predict on, finest first.
        anchor_sizes: per level, anchor sizes in input pixels.
        aspect_ratios: anchor height / width ratios (the same at every level).
        fg_iou_threshold: IoU at or above which an anchor is positive.
        bg_iou_threshold: IoU below which an anchor is negative.
        batch_size_per_image: anchors sampled per image for the losses.
        positive_fraction: largest share of positives among sampled anchors.
        pre_nms_top_n_train / pre_nms_top_n_test: proposals kept per level before NMS.
        post_nms_top_n_train / post_nms_top_n_test: proposals kept per image after NMS.
        nms_threshold: IoU threshold of the per-level NMS.
        min_box_size: proposals with a side shorter than this (pixels) are dropped.
        score_threshold: proposals with an objectness probability below this are dropped.
        box_coder_weights: ``(wx, wy, ww, wh)`` of the anchor deltas.
        smooth_l1_beta: beta of the box loss.
        conv_depth: number of 3x3 conv + ReLU layers before the predictors (at least 1). Parameter
            names: ``conv.weight`` / ``conv.bias`` for one conv (the Faster R-CNN names, so existing
            checkpoints load); ``convs.0.*`` .. ``convs.<conv_depth - 1>.*`` for more.

    Example:
        >>> rpn = RPN(in_shapes={"p2": ShapeSpec(8, 4)}, in_features=("p2",), anchor_sizes=((16,),))
        >>> props, _ = rpn.eval()({"p2": torch.rand(1, 8, 16, 16)}, [(64, 64)], (64, 64))
        >>> props[0].shape[1]
        4
    """

    def __init__(
        self,
        *,
        in_shapes: Mapping[str, ShapeSpec],
        in_features: Sequence[str] = ("p2", "p3", "p4", "p5", "p6"),
        anchor_sizes: Sequence[Sequence[float]] = _DEFAULT_SIZES,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        fg_iou_threshold: float = 0.7,
        bg_iou_threshold: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_top_n_train: int = 2000,
        pre_nms_top_n_test: int = 1000,
        post_nms_top_n_train: int = 2000,
        post_nms_top_n_test: int = 1000,
        nms_threshold: float = 0.7,
        min_box_size: float = 1e-3,
        score_threshold: float = 0.0,
        box_coder_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        smooth_l1_beta: float = 1.0 / 9,
        conv_depth: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(conv_depth, int) or isinstance(conv_depth, bool) or conv_depth < 1:
            raise ValueError(f"RPN conv_depth is the number of 3x3 convs before the predictors and must be >= 1, "
                             f"got {conv_depth!r}")
        in_channels = shared_channels(in_shapes, in_features, owner="the RPN head")
        if len(anchor_sizes) != len(in_features):
            raise ValueError(
                f"RPN has {len(in_features)} in_features but anchor sizes for {len(anchor_sizes)} levels; "
                "give one tuple of sizes per level"
            )
        if len({len(s) if isinstance(s, (list, tuple)) else 1 for s in anchor_sizes}) != 1:
            raise ValueError("every RPN level needs the same number of anchor sizes, since the head is shared")
        self.in_features = tuple(in_features)
        self.anchor_generator = AnchorGenerator(sizes=anchor_sizes, aspect_ratios=aspect_ratios)
        num_anchors = self.anchor_generator.num_anchors_per_location()[0]
        tower = [nn.Conv2d(in_channels, in_channels, 3, padding=1) for _ in range(conv_depth)]
        if len(tower) == 1:
            self.conv = tower[0]
        else:
            self.convs = nn.ModuleList(tower)
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in (*tower, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

        self.box_coder = BoxCoder(weights=box_coder_weights)
        self.matcher = Matcher(
            high_threshold=fg_iou_threshold, low_threshold=bg_iou_threshold, allow_low_quality_matches=True
        )
        self.sampler = BalancedSampler(batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction)
        self.pre_nms_top_n = {True: int(pre_nms_top_n_train), False: int(pre_nms_top_n_test)}
        self.post_nms_top_n = {True: int(post_nms_top_n_train), False: int(post_nms_top_n_test)}
        self.nms_threshold = float(nms_threshold)
        self.min_box_size = float(min_box_size)
        self.score_threshold = float(score_threshold)
        self.smooth_l1_beta = float(smooth_l1_beta)

    def _conv_tower(self) -> list[nn.Module]:
        return list(self.convs) if hasattr(self, "convs") else [self.conv]

    def predict(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Raw head outputs, all levels concatenated in anchor order.

        Returns:
            ``(logits Tensor[N, A_total], deltas Tensor[N, A_total, 4])``, anchors ordered by level,
            then row, column and cell anchor.
        """
        logits, deltas = [], []
        for feature in features:
            t = feature
            for conv in self._conv_tower():
                t = F.relu(conv(t))
            n, _, h, w = feature.shape
            logits.append(self.objectness_logits(t).permute(0, 2, 3, 1).reshape(n, -1))
            deltas.append(self.anchor_deltas(t).view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        return torch.cat(logits, dim=1), torch.cat(deltas, dim=1)

    def forward(
        self,
        features: Mapping[str, Tensor],
        image_sizes: Sequence[tuple[int, int]],
        padded_size: Sequence[int],
        targets: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Propose boxes and, in training, compute the RPN losses.

        Args:
            features: maps by name, each Tensor[N, C, H_l, W_l].
            image_sizes: ``(height, width)`` of each image inside the padded batch.
            padded_size: ``(height, width)`` of the padded batch tensor.
            targets: in training, per image ``boxes`` Tensor[G, 4], xyxy pixels of the padded batch.

        Returns:
            ``(proposals, losses)``: one Tensor[P_i, 4] (xyxy, detached) per image, sorted by
            decreasing objectness; ``{"loss_rpn_cls", "loss_rpn_box"}`` in training, else ``{}``.
        """
        feats = [features[f] for f in self.in_features]
        anchors_per_level = self.anchor_generator(feats, padded_size)
        anchors = torch.cat(anchors_per_level, dim=0)
        logits, deltas = self.predict(feats)
        num_images = logits.shape[0]
        proposals = self.box_coder.decode(deltas.detach().reshape(-1, 4), anchors.repeat(num_images, 1))
        proposals = proposals.view(num_images, -1, 4)
        boxes = self._select_proposals(
            proposals, logits.detach(), [len(a) for a in anchors_per_level], image_sizes
        )
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("the RPN needs targets in training mode")
            losses = self.losses(anchors, logits, deltas, targets)
        return boxes, losses

    def _select_proposals(
        self,
        proposals: Tensor,
        logits: Tensor,
        num_per_level: Sequence[int],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[Tensor]:
        pre_nms = self.pre_nms_top_n[self.training]
        post_nms = self.post_nms_top_n[self.training]
        top_idx, levels, offset = [], [], 0
        for level, count in enumerate(num_per_level):
            k = min(pre_nms, count)
            top_idx.append(logits[:, offset : offset + count].topk(k, dim=1).indices + offset)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=logits.device))
            offset += count
        top_idx = torch.cat(top_idx, dim=1)
        level_ids = torch.cat(levels)
        batch_idx = torch.arange(len(proposals), device=proposals.device)[:, None]
        scores = torch.sigmoid(logits[batch_idx, top_idx].float())  # float32 under mixed precision too
        boxes = proposals[batch_idx, top_idx]

        results = []
        for boxes_i, scores_i, size in zip(boxes, scores, image_sizes):
            boxes_i = clip_boxes_to_image(boxes_i, size)
            keep = remove_small_boxes(boxes_i, self.min_box_size)
            keep = keep[scores_i[keep] >= self.score_threshold]
            boxes_i, scores_i, lvl = boxes_i[keep], scores_i[keep], level_ids[keep]
            keep = batched_nms(boxes_i, scores_i, lvl, self.nms_threshold)[:post_nms]
            results.append(boxes_i[keep])
        return results

    def losses(
        self, anchors: Tensor, logits: Tensor, deltas: Tensor, targets: Sequence[Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        """RPN losses over sampled anchors.

        Args:
            anchors: Tensor[A, 4], xyxy, shared by all images.
            logits: Tensor[N, A], objectness logits.
            deltas: Tensor[N, A, 4], predicted anchor deltas.
            targets: per image, ``boxes`` Tensor[G_i, 4] xyxy (``G_i`` may be 0).

        Returns:
            ``{"loss_rpn_cls": scalar, "loss_rpn_box": scalar}``.
        """
        sampled_logits, sampled_labels, pos_deltas, pos_targets = [], [], [], []
        for i, target in enumerate(targets):
            gt = target["boxes"].to(anchors.dtype)
            matched_idxs, labels = self.matcher(box_iou(gt, anchors))
            pos, neg = self.sampler(labels)
            sampled = torch.cat([pos, neg])
            sampled_logits.append(logits[i, sampled])
            sampled_labels.append((labels[sampled] == 1).to(logits.dtype))
            pos_deltas.append(deltas[i, pos])
            pos_targets.append(self.box_coder.encode(gt[matched_idxs[pos]], anchors[pos]))
        sampled_logits = torch.cat(sampled_logits)
        num_sampled = max(sampled_logits.numel(), 1)
        loss_box = smooth_l1_loss(
            torch.cat(pos_deltas), torch.cat(pos_targets), beta=self.smooth_l1_beta, reduction="sum"
        ) / num_sampled
        loss_cls = F.binary_cross_entropy_with_logits(sampled_logits, torch.cat(sampled_labels), reduction="sum")
        return {"loss_rpn_cls": loss_cls / num_sampled, "loss_rpn_box": loss_box}
