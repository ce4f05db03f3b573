"""RetinaNet's dense head (Lin et al., "Focal Loss for Dense Object Detection"): a classification and a
box regression subnet shared across pyramid levels, anchors, IoU matching and the focal loss.

The head follows the dense-head protocol of :class:`~segkit.models.one_stage.OneStageDetector`: it
scores and decodes every anchor, and the detector selects the detections.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou, generalized_box_iou_loss

from segkit.ops import (ATSSMatcher, AnchorGenerator, BoxCoder, Matcher, ShapeSpec, octave_anchor_sizes,
                        shared_channels)
from segkit.ops.conv import dense_head_tower
from segkit.ops.labels import check_labels, check_num_classes
from segkit.ops.losses import sigmoid_focal_loss_by_label, smooth_l1_loss
from segkit.registry import HEADS

__all__ = ["RetinaNetHead"]

_BOX_LOSSES = ("l1", "smooth_l1", "giou")
_ASSIGNERS = ("max_iou", "atss")
_DEFAULT_FEATURES = ("p3", "p4", "p5", "p6", "p7")


@HEADS.register()
class RetinaNetHead(nn.Module):
    """RetinaNet head: ``num_convs`` 3x3 conv (+ norm) + ReLU layers, then a 3x3 conv giving one logit per
    (anchor, class); a second tower of the same shape gives four box deltas per anchor. Both are shared
    by every level; the logits' bias starts at ``-log((1 - prior_probability) / prior_probability)`` so
    that every anchor starts with that probability of every class, the other convs at N(0, 0.01).

    Anchors: at each level, every size of ``anchor_sizes`` with every aspect ratio (torchvision's
    RetinaNet: sizes 32..512 times ``2 ** (0, 1/3, 2/3)``, truncated to integers, ratios 0.5, 1, 2).

    Training: with ``assigner="max_iou"`` anchors are matched to the ground truth by IoU (``>=
    fg_iou_threshold`` foreground, ``< bg_iou_threshold`` background, in between ignored, plus each
    box's best anchors), as in the paper and torchvision; with ``"atss"`` by adaptive training sample
    selection (:class:`~segkit.ops.ATSSMatcher`: per box, the ``atss_topk`` anchors nearest its centre
    on each level, foreground where their IoU reaches the mean plus the standard deviation of those
    candidates' IoUs; it is meant for one anchor per position, ``aspect_ratios: [1.0]`` and one size
    per level). ``loss_cls`` is
    the sigmoid focal loss over every class of every non-ignored anchor, ``loss_box_reg`` the box loss
    of the foreground anchors: ``"l1"`` on the deltas (torchvision's ``retinanet_resnet50_fpn``),
    ``"smooth_l1"`` with ``smooth_l1_beta``, or ``"giou"`` on the decoded boxes (``_v2``). Each is
    summed over an image, divided by that image's number of foreground anchors (at least 1), and
    averaged over the images, as torchvision does.

    Args:
        in_shapes: the neck's ``output_shape()``; the used maps must share one channel count.
        num_classes: number of foreground classes K (labels 1..K; one sigmoid per class, no background).
        in_features: maps to predict on, finest first.
        anchor_sizes: per level, anchor sizes in input pixels (the same count at every level).
        aspect_ratios: anchor height / width ratios.
        num_convs: conv layers of each tower.
        norm: ``None`` or a norm name after each tower conv (``"GN"`` in torchvision's ``_v2``).
        prior_probability: the initial probability of every class.
        assigner: ``"max_iou"`` or ``"atss"``.
        fg_iou_threshold / bg_iou_threshold: the ``"max_iou"`` thresholds.
        atss_topk: the ``"atss"`` candidates per level and box.
        focal_alpha / focal_gamma: focal loss weighting.
        box_loss: ``"l1"``, ``"smooth_l1"`` or ``"giou"``.
        smooth_l1_beta: beta of the ``"smooth_l1"`` box loss.
        box_coder_weights: ``(wx, wy, ww, wh)`` of the anchor deltas.

    Example:
        >>> head = RetinaNetHead(in_shapes={"p3": ShapeSpec(8, 8)}, num_classes=3, in_features=("p3",),
        ...                      anchor_sizes=((32,),))
        >>> levels, _ = head.eval()({"p3": torch.rand(1, 8, 4, 4)}, (32, 32))
        >>> [tuple(t.shape) for t in levels[0]]
        [(1, 48, 3), (1, 48, 4)]
    """

    def __init__(
        self,
        *,
        in_shapes: Mapping[str, ShapeSpec],
        num_classes: int,
        in_features: Sequence[str] = _DEFAULT_FEATURES,
        anchor_sizes: Sequence[Sequence[float]] = octave_anchor_sizes(),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        num_convs: int = 4,
        norm: str | None = None,
        prior_probability: float = 0.01,
        assigner: str = "max_iou",
        fg_iou_threshold: float = 0.5,
        bg_iou_threshold: float = 0.4,
        atss_topk: int = 9,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_loss: str = "l1",
        smooth_l1_beta: float = 0.1,
        box_coder_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    ) -> None:
        super().__init__()
        if box_loss not in _BOX_LOSSES:
            raise ValueError(f"RetinaNetHead box_loss must be one of {', '.join(_BOX_LOSSES)}, got {box_loss!r}")
        if assigner not in _ASSIGNERS:
            raise ValueError(f"RetinaNetHead assigner must be one of {', '.join(_ASSIGNERS)}, got {assigner!r}")
        if not 0.0 < prior_probability < 1.0:
            raise ValueError(f"prior_probability is a probability in (0, 1), got {prior_probability}")
        if len(anchor_sizes) != len(in_features):
            raise ValueError(f"RetinaNetHead has {len(in_features)} in_features but anchor sizes for "
                             f"{len(anchor_sizes)} levels; give one tuple of sizes per level")
        if len({len(s) if isinstance(s, (list, tuple)) else 1 for s in anchor_sizes}) != 1:
            raise ValueError("every RetinaNetHead level needs the same number of anchor sizes, since the head is shared")
        channels = shared_channels(in_shapes, in_features, owner="the RetinaNet head")
        self.num_classes = check_num_classes(num_classes)
        self.in_features = tuple(in_features)
        self.anchor_generator = AnchorGenerator(sizes=anchor_sizes, aspect_ratios=aspect_ratios)
        num_anchors = self.anchor_generator.num_anchors_per_location()[0]
        self.cls_convs = dense_head_tower(channels, num_convs, norm=norm, owner="RetinaNetHead")
        self.cls_logits = nn.Conv2d(channels, num_anchors * self.num_classes, 3, padding=1)
        self.bbox_convs = dense_head_tower(channels, num_convs, norm=norm, owner="RetinaNetHead")
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        for conv in (self.cls_logits, self.bbox_pred):
            nn.init.normal_(conv.weight, std=0.01)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability))
        nn.init.zeros_(self.bbox_pred.bias)

        self.box_coder = BoxCoder(weights=box_coder_weights)
        self.assigner = assigner
        self.matcher = Matcher(high_threshold=fg_iou_threshold, low_threshold=bg_iou_threshold,
                               allow_low_quality_matches=True)
        self.atss = ATSSMatcher(topk=atss_topk)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.box_loss = box_loss
        self.smooth_l1_beta = float(smooth_l1_beta)

    def predict(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Raw outputs per level: logits Tensor[N, H*W*A, K] and deltas Tensor[N, H*W*A, 4], anchors
        ordered by row, column and cell anchor (the anchor generator's order)."""
        logits, deltas = [], []
        for feature in features:
            n, _, h, w = feature.shape
            cls = self.cls_logits(self.cls_convs(feature))
            logits.append(cls.view(n, -1, self.num_classes, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, self.num_classes))
            box = self.bbox_pred(self.bbox_convs(feature))
            deltas.append(box.view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        return logits, deltas

    def forward(
        self,
        features: Mapping[str, Tensor],
        padded_size: Sequence[int],
        targets: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> tuple[list[tuple[Tensor, Tensor]], dict[str, Tensor]]:
        """Score and decode every anchor, or compute the losses in training.

        Args:
            features: maps by name, each Tensor[N, C, H_l, W_l].
            padded_size: ``(height, width)`` of the padded batch.
            targets: in training, per image ``boxes`` Tensor[G, 4] (xyxy, padded-batch pixels) and
                ``labels`` Tensor[G] (int64, 1..K); ``G`` may be 0.

        Returns:
            ``(levels, losses)``. In training ``([], {"loss_cls", "loss_box_reg"})``; at inference one
            ``(scores, boxes)`` per level and ``{}``: scores Tensor[N, M_l, K] (float32 class
            probabilities), boxes Tensor[N, M_l, 4] (xyxy padded-batch pixels, not clipped).
        """
        feats = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(feats, padded_size)
        logits, deltas = self.predict(feats)
        if self.training:
            if targets is None:
                raise ValueError("the RetinaNet head needs targets in training mode")
            return [], self.losses(torch.cat(anchors), torch.cat(logits, 1), torch.cat(deltas, 1), targets,
                                   level_sizes=[len(a) for a in anchors])
        levels = []
        for level_logits, level_deltas, level_anchors in zip(logits, deltas, anchors):
            n = level_logits.shape[0]
            boxes = self.box_coder.decode(level_deltas.reshape(-1, 4), level_anchors.repeat(n, 1))
            levels.append((torch.sigmoid(level_logits.float()), boxes.view(n, -1, 4)))
        return levels, {}

    def losses(self, anchors: Tensor, logits: Tensor, deltas: Tensor, targets: Sequence[Mapping[str, Tensor]],
               level_sizes: Sequence[int] | None = None) -> dict[str, Tensor]:
        """Focal and box losses.

        Args:
            anchors: Tensor[A, 4], xyxy, shared by all images.
            logits: Tensor[N, A, K]; deltas: Tensor[N, A, 4].
            targets: per image ``boxes`` Tensor[G_i, 4] and ``labels`` Tensor[G_i].
            level_sizes: anchors per level (needed by the ``"atss"`` assigner; default: one level).

        Returns:
            ``{"loss_cls": scalar, "loss_box_reg": scalar}``.
        """
        labels, matched_boxes = self._match(anchors, targets, [len(anchors)] if level_sizes is None else level_sizes)
        image_idx, anchor_idx = torch.nonzero(labels > 0, as_tuple=True)
        num_foreground = torch.bincount(image_idx, minlength=len(targets)).clamp(min=1).to(torch.float32)
        # Per anchor, over every class; anchors between the thresholds (label -1) are ignored.
        focal = sigmoid_focal_loss_by_label(logits, labels, alpha=self.focal_alpha, gamma=self.focal_gamma)
        loss_cls = (focal.sum(1) / num_foreground).mean()
        box = self._box_losses(deltas[image_idx, anchor_idx], matched_boxes[image_idx, anchor_idx], anchors[anchor_idx])
        per_image = box.new_zeros(len(targets)).index_add(0, image_idx, box)
        loss_box = (per_image / num_foreground).mean() + deltas.sum() * 0.0  # keeps every delta in the graph
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box}

    def _match(self, anchors: Tensor, targets: Sequence[Mapping[str, Tensor]],
               level_sizes: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Per image and anchor, the class (1..K foreground, 0 background, -1 ignored) Tensor[N, A] and
        the matched ground-truth box Tensor[N, A, 4] (meaningful for foreground anchors)."""
        labels, boxes = [], []
        for target in targets:
            gt = target["boxes"].to(anchors.dtype)
            classes = check_labels(target["labels"], self.num_classes)
            if self.assigner == "atss":
                matched_idxs, match = self.atss(gt, anchors, level_sizes)
            else:
                matched_idxs, match = self.matcher(box_iou(gt, anchors))
            if len(gt):
                labels.append(torch.where(match == 1, classes[matched_idxs], match.to(torch.int64)))
                boxes.append(gt[matched_idxs])
            else:
                labels.append(torch.zeros(len(anchors), dtype=torch.int64, device=anchors.device))
                boxes.append(torch.zeros_like(anchors))
        return torch.stack(labels), torch.stack(boxes)

    def _box_losses(self, deltas: Tensor, gt_boxes: Tensor, anchors: Tensor) -> Tensor:
        """The box loss of each foreground anchor, Tensor[F] (float32)."""
        if self.box_loss == "giou":
            boxes = self.box_coder.decode(deltas.float(), anchors.float())
            return generalized_box_iou_loss(boxes, gt_boxes.float(), reduction="none", eps=1e-7)
        beta = self.smooth_l1_beta if self.box_loss == "smooth_l1" else 0.0
        targets = self.box_coder.encode(gt_boxes, anchors)
        return smooth_l1_loss(deltas, targets, beta=beta, reduction="none").float().sum(1)

