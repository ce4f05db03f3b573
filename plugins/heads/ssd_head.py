"""SSD's head (Liu et al., "SSD: Single Shot MultiBox Detector"): one 3x3 conv per level scoring every
default box over the classes and the background, one predicting its box deltas; default boxes, matching
with the best prior of each ground truth, hard negative mining and the multibox loss.

The head follows the dense-head protocol of :class:`~segkit.models.one_stage.OneStageDetector`; SSD's
detections are chosen per class over all levels, the detector's ``selection: per_class``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from segkit.ops import BoxCoder, DefaultBoxGenerator, ShapeSpec
from segkit.ops.labels import check_labels, check_num_classes
from segkit.ops.losses import smooth_l1_loss
from segkit.registry import HEADS

__all__ = ["SSDHead", "match_default_boxes"]

_SSD300_FEATURES = ("conv4", "fc7", "conv8_2", "conv9_2", "conv10_2", "conv11_2")
_SSD300_RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
_SSD300_SCALES = (0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05)
_SSD300_STEPS = (8, 16, 32, 64, 100, 300)


def match_default_boxes(iou: Tensor, threshold: float) -> Tensor:
    """SSD's matching: each default box goes to its best ground truth when their IoU is ``>= threshold``,
    and every ground truth takes its best default box whatever the IoU (a later ground truth wins a box
    that is the best of two).

    Args:
        iou: Tensor[G, A], IoU of G ground-truth boxes (``G >= 1``) with A default boxes.
        threshold: the IoU of a match.

    Returns:
        Tensor[A] int64: the matched ground truth of each default box, -1 for background.
    """
    best_iou, matched = iou.max(dim=0)
    matched = torch.where(best_iou >= threshold, matched, torch.full_like(matched, -1))
    best_box = iou.max(dim=1).indices
    matched[best_box] = torch.arange(len(best_box), device=iou.device)
    return matched


@HEADS.register()
class SSDHead(nn.Module):
    """SSD head: per level, a 3x3 conv giving ``K + 1`` logits (background first) per default box and one
    giving four box deltas (weights ``box_coder_weights``), Xavier-uniform initialised with zero bias.

    Default boxes: :class:`~segkit.ops.DefaultBoxGenerator` (SSD300: scales 0.07..1.05, aspect ratios
    ``[[2], [2, 3], [2, 3], [2, 3], [2], [2]]``, steps 8..300, clipped). Inference scores are the
    softmax over background and classes, the background dropped.

    Training: :func:`match_default_boxes` at ``iou_threshold``; ``loss_box_reg`` is the smooth L1 loss
    (beta 1) of the foreground boxes' deltas, ``loss_cls`` the cross-entropy of the foreground boxes and
    of the ``negative_ratio`` times as many background boxes of the same image with the highest loss
    (hard negative mining; an image without ground truth has none). Both are summed over the batch and
    divided by its number of foreground boxes (at least 1), as torchvision does.

    Args:
        in_shapes: the neck's ``output_shape()``.
        num_classes: number of foreground classes K (labels 1..K; the classifier adds the background).
        in_features: maps to predict on, finest first.
        aspect_ratios: per level, the extra aspect ratios of the default boxes.
        scales: ``len(in_features) + 1`` box scales (fractions of the image side); ``None`` computes them
            from ``min_ratio`` / ``max_ratio``.
        min_ratio / max_ratio: the range of computed scales (SSD paper: 0.2 .. 0.9).
        steps: per level, the input pixels per cell; ``None``: the grid covers the image.
        clip: cap default boxes at the image size.
        iou_threshold: the IoU of a match.
        negative_ratio: hard negatives per foreground box.
        box_coder_weights: ``(wx, wy, ww, wh)`` of the deltas.

    Example:
        >>> head = SSDHead(in_shapes={"a": ShapeSpec(8, 8)}, num_classes=3, in_features=("a",),
        ...                aspect_ratios=[[2]], scales=[0.2, 0.5], steps=[8])
        >>> levels, _ = head.eval()({"a": torch.rand(1, 8, 4, 4)}, (32, 32))
        >>> [tuple(t.shape) for t in levels[0]]
        [(1, 64, 3), (1, 64, 4)]
    """

    def __init__(
        self,
        *,
        in_shapes: Mapping[str, ShapeSpec],
        num_classes: int,
        in_features: Sequence[str] = _SSD300_FEATURES,
        aspect_ratios: Sequence[Sequence[float]] = _SSD300_RATIOS,
        scales: Sequence[float] | None = _SSD300_SCALES,
        min_ratio: float = 0.15,
        max_ratio: float = 0.9,
        steps: Sequence[float] | None = _SSD300_STEPS,
        clip: bool = True,
        iou_threshold: float = 0.5,
        negative_ratio: float = 3.0,
        box_coder_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
    ) -> None:
        super().__init__()
        missing = [f for f in in_features if f not in in_shapes]
        if missing:
            raise ValueError(f"SSDHead in_features {missing} are not among the input maps {list(in_shapes)}")
        if len(aspect_ratios) != len(in_features):
            raise ValueError(f"SSDHead has {len(in_features)} in_features but aspect ratios for {len(aspect_ratios)} "
                             "levels; give one list of aspect ratios per level")
        if negative_ratio < 0:
            raise ValueError(f"SSDHead negative_ratio must be >= 0, got {negative_ratio}")
        self.num_classes = check_num_classes(num_classes)
        self.in_features = tuple(in_features)
        self.default_boxes = DefaultBoxGenerator(aspect_ratios=aspect_ratios, scales=scales, min_ratio=min_ratio,
                                                 max_ratio=max_ratio, steps=steps, clip=clip)
        counts = self.default_boxes.num_anchors_per_location()
        channels = [in_shapes[f].channels for f in in_features]
        self.cls_logits = nn.ModuleList(nn.Conv2d(c, a * (self.num_classes + 1), 3, padding=1)
                                        for c, a in zip(channels, counts))
        self.bbox_pred = nn.ModuleList(nn.Conv2d(c, a * 4, 3, padding=1) for c, a in zip(channels, counts))
        for conv in (*self.cls_logits, *self.bbox_pred):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.box_coder = BoxCoder(weights=box_coder_weights)
        self.iou_threshold = float(iou_threshold)
        self.negative_ratio = float(negative_ratio)

    def predict(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Raw outputs per level: logits Tensor[N, H*W*A, K+1] (background first) and deltas
        Tensor[N, H*W*A, 4], ordered by row, column and cell box (the default boxes' order)."""
        logits, deltas = [], []
        for feature, cls_conv, box_conv in zip(features, self.cls_logits, self.bbox_pred):
            logits.append(_per_box(cls_conv(feature), self.num_classes + 1))
            deltas.append(_per_box(box_conv(feature), 4))
        return logits, deltas

    def forward(
        self,
        features: Mapping[str, Tensor],
        padded_size: Sequence[int],
        targets: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> tuple[list[tuple[Tensor, Tensor]], dict[str, Tensor]]:
        """Score and decode every default box, or compute the losses in training.

        Args:
            features: maps by name, each Tensor[N, C, H_l, W_l].
            padded_size: ``(height, width)`` of the batch.
            targets: in training, per image ``boxes`` Tensor[G, 4] (xyxy batch pixels) and ``labels``
                Tensor[G] (int64, 1..K); ``G`` may be 0.

        Returns:
            ``(levels, losses)``. In training ``([], {"loss_cls", "loss_box_reg"})``; at inference one
            ``(scores, boxes)`` per level and ``{}``: scores Tensor[N, M_l, K] (float32 softmax
            probabilities of the classes), boxes Tensor[N, M_l, 4] (xyxy batch pixels, not clipped).
        """
        feats = [features[f] for f in self.in_features]
        boxes = self.default_boxes(feats, padded_size)
        logits, deltas = self.predict(feats)
        if self.training:
            if targets is None:
                raise ValueError("the SSD head needs targets in training mode")
            return [], self.losses(torch.cat(boxes), torch.cat(logits, 1), torch.cat(deltas, 1), targets)
        levels = []
        for level_logits, level_deltas, level_boxes in zip(logits, deltas, boxes):
            n = level_logits.shape[0]
            decoded = self.box_coder.decode(level_deltas.reshape(-1, 4), level_boxes.repeat(n, 1))
            scores = F.softmax(level_logits.float(), dim=-1)[..., 1:]
            levels.append((scores, decoded.view(n, -1, 4)))
        return levels, {}

    def losses(self, default_boxes: Tensor, logits: Tensor, deltas: Tensor,
               targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """SSD's multibox loss (see the class docstring).

        Args:
            default_boxes: Tensor[A, 4], xyxy, shared by all images.
            logits: Tensor[N, A, K + 1]; deltas: Tensor[N, A, 4].
            targets: per image ``boxes`` Tensor[G_i, 4] and ``labels`` Tensor[G_i].

        Returns:
            ``{"loss_cls": scalar, "loss_box_reg": scalar}``.
        """
        labels, matched_boxes = self._match(default_boxes, targets)
        foreground = labels > 0
        image_idx, box_idx = torch.nonzero(foreground, as_tuple=True)
        normaliser = max(1, int(image_idx.numel()))
        box_targets = self.box_coder.encode(matched_boxes[image_idx, box_idx], default_boxes[box_idx])
        loss_box = smooth_l1_loss(deltas[image_idx, box_idx], box_targets, beta=1.0, reduction="sum")
        num_classes = logits.shape[-1]
        cls_loss = F.cross_entropy(logits.reshape(-1, num_classes).float(), labels.reshape(-1),
                                   reduction="none").view_as(labels)
        negative_loss = cls_loss.detach().masked_fill(foreground, -float("inf"))
        # The rank of each box by loss within its image; the hard negatives are the first ratio * F_i.
        rank = negative_loss.sort(dim=1, descending=True)[1].sort(dim=1)[1]
        hard_negative = rank < self.negative_ratio * foreground.sum(1, keepdim=True)
        loss_cls = cls_loss[foreground].sum() + cls_loss[hard_negative].sum()
        return {"loss_cls": loss_cls / normaliser, "loss_box_reg": loss_box / normaliser + deltas.sum() * 0.0}

    def _match(self, default_boxes: Tensor, targets: Sequence[Mapping[str, Tensor]]) -> tuple[Tensor, Tensor]:
        """Per image and default box the class (1..K, 0 background) Tensor[N, A] and the matched
        ground-truth box Tensor[N, A, 4] (meaningful for foreground boxes)."""
        labels, boxes = [], []
        for target in targets:
            gt = target["boxes"].to(default_boxes.dtype)
            classes = check_labels(target["labels"], self.num_classes)
            if len(gt) == 0:
                labels.append(torch.zeros(len(default_boxes), dtype=torch.int64, device=default_boxes.device))
                boxes.append(torch.zeros_like(default_boxes))
                continue
            matched = match_default_boxes(box_iou(gt, default_boxes), self.iou_threshold)
            found = matched >= 0
            labels.append(torch.where(found, classes[matched.clamp(min=0)], torch.zeros_like(matched)))
            boxes.append(gt[matched.clamp(min=0)])
        return torch.stack(labels), torch.stack(boxes)


def _per_box(output: Tensor, columns: int) -> Tensor:
    """A conv output Tensor[N, A * columns, H, W] as Tensor[N, H * W * A, columns]."""
    n, _, h, w = output.shape
    return output.view(n, -1, columns, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, columns)
