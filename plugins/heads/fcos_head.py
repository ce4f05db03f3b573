"""FCOS's dense head (Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection"): one point per
feature-map location, a classification tower, a regression tower predicting the distances from the point
to the four sides of its box and the point's centre-ness, assignment by centre sampling and per-level
size ranges, the focal, GIoU and centre-ness losses.

The head follows the dense-head protocol of :class:`~segkit.models.one_stage.OneStageDetector`: it
scores and decodes every point, and the detector selects the detections.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from segkit.ops import AnchorGenerator, ShapeSpec, shared_channels
from segkit.ops.conv import dense_head_tower
from segkit.ops.labels import check_labels, check_num_classes
from segkit.ops.losses import sigmoid_focal_loss_by_label
from segkit.registry import HEADS

__all__ = ["FCOSHead", "encode_distances", "decode_distances", "centerness_targets"]

_DEFAULT_FEATURES = ("p3", "p4", "p5", "p6", "p7")
# Candidate boxes of a point are ranked by this minus their area, in float32 (see ``_assign``).
_AREA_PRIORITY = 1e8


def encode_distances(boxes: Tensor, points: Tensor, sizes: Tensor) -> Tensor:
    """Distances from each point to the left, top, right and bottom side of its box, over the point's size.

    Args:
        boxes: Tensor[..., 4], xyxy pixels.
        points: Tensor[..., 2], ``(x, y)`` pixels.
        sizes: Tensor[...], the size of each point's level (its stride by default).

    Returns:
        Tensor[..., 4] ``(l, t, r, b) / size``; all positive for a point inside its box.
    """
    distances = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)
    return distances / sizes[..., None]


def decode_distances(distances: Tensor, points: Tensor, sizes: Tensor) -> Tensor:
    """The boxes :func:`encode_distances` encodes: Tensor[..., 4] xyxy pixels, the dtype of ``distances``."""
    distances = distances * sizes[..., None].to(distances.dtype)
    points = points.to(distances.dtype)
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def centerness_targets(distances: Tensor) -> Tensor:
    """FCOS's centre-ness ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` of Tensor[..., 4]
    ``(l, t, r, b)`` distances (any common scale): 1 at the box centre, towards 0 near a side."""
    left_right, top_bottom = distances[..., 0::2], distances[..., 1::2]
    ratio_x = left_right.min(dim=-1).values / left_right.max(dim=-1).values
    ratio_y = top_bottom.min(dim=-1).values / top_bottom.max(dim=-1).values
    return torch.sqrt(ratio_x * ratio_y)


@HEADS.register()
class FCOSHead(nn.Module):
    """FCOS head: a classification tower of ``num_convs`` 3x3 conv + norm + ReLU layers and a 3x3 conv
    giving one logit per class; a regression tower of the same shape whose output feeds a 3x3 conv of four
    distances (ReLU, so never negative) and a 3x3 conv of one centre-ness logit. Both towers are shared by
    every level. The class bias starts at ``-log((1 - prior_probability) / prior_probability)``, the other
    convs at N(0, 0.01) with zero bias (torchvision's ``fcos_resnet50_fpn``).

    Points: one per location of each level, at ``(column, row) * stride`` where the stride is the padded
    batch size over the grid size (torchvision's anchor generator with one square anchor of the level's
    size per location; the anchor's centre is the point). Distances are predicted in units of the level's
    size ``s_l`` (``level_sizes``, by default the level's stride: 8..128 on P3-P7).

    Training (torchvision's FCOS): a point is a candidate for a ground-truth box when it lies inside the
    box, within ``center_sampling_radius * s_l`` of the box centre (in both x and y), and the largest of its
    four distances to the box is inside the level's size range (both bounds exclusive; by default
    ``(4 s_l, 8 s_l)``, from 0 on the first level and to infinity on the last: (0, 64), (64, 128), ...,
    (512, inf) on P3-P7). Of several candidate boxes the smallest wins; areas are compared as
    ``1e8 - area`` in float32 as torchvision does, so areas closer than that precision (8 px^2) tie and
    the first box wins. ``loss_cls`` is the sigmoid focal loss over every class of every point,
    ``loss_box_reg`` the GIoU loss of the decoded boxes of the foreground points, ``loss_centerness`` the
    binary cross-entropy of their centre-ness logits against :func:`centerness_targets`; each is summed
    over the batch and divided by the batch's number of foreground points (at least 1).

    Inference: the score of (point, class) is ``sqrt(sigmoid(class logit) * sigmoid(centre-ness logit))``.

    Args:
        in_shapes: the neck's ``output_shape()``; the used maps must share one channel count.
        num_classes: number of foreground classes K (labels 1..K; one sigmoid per class, no background).
        in_features: maps to predict on, finest first.
        level_sizes: per level, the size ``s_l`` in input pixels (default: the maps' strides).
        size_ranges: per level, ``(low, high)`` of the largest point-to-side distance assigned there
            (``.inf`` in YAML for no upper bound); default from ``level_sizes`` as above.
        center_sampling_radius: radius of the centre region in units of ``s_l`` (> 0).
        num_convs: conv layers of each tower.
        norm: norm after each tower conv (``"GN"`` as torchvision, or ``None``).
        prior_probability: the initial probability of every class.
        focal_alpha / focal_gamma: focal loss weighting.

    Example:
        >>> head = FCOSHead(in_shapes={"p3": ShapeSpec(32, 8)}, num_classes=3, in_features=("p3",))
        >>> levels, _ = head.eval()({"p3": torch.rand(1, 32, 4, 4)}, (32, 32))
        >>> [tuple(t.shape) for t in levels[0]]
        [(1, 16, 3), (1, 16, 4)]
    """

    def __init__(
        self,
        *,
        in_shapes: Mapping[str, ShapeSpec],
        num_classes: int,
        in_features: Sequence[str] = _DEFAULT_FEATURES,
        level_sizes: Sequence[float] | None = None,
        size_ranges: Sequence[Sequence[float]] | None = None,
        center_sampling_radius: float = 1.5,
        num_convs: int = 4,
        norm: str | None = "GN",
        prior_probability: float = 0.01,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if not 0.0 < prior_probability < 1.0:
            raise ValueError(f"prior_probability is a probability in (0, 1), got {prior_probability}")
        if not center_sampling_radius > 0:
            raise ValueError(f"FCOSHead center_sampling_radius must be > 0 (in units of the level size), "
                             f"got {center_sampling_radius}")
        channels = shared_channels(in_shapes, in_features, owner="the FCOS head")
        self.num_classes = check_num_classes(num_classes)
        self.in_features = tuple(in_features)
        sizes = [float(in_shapes[f].stride) for f in self.in_features] if level_sizes is None else list(level_sizes)
        if len(sizes) != len(self.in_features) or any(not s > 0 for s in sizes):
            raise ValueError(f"FCOSHead level_sizes must be one positive size per level of in_features "
                             f"({len(self.in_features)}), got {list(sizes)}")
        self.size_ranges = _size_ranges(sizes, size_ranges)
        self.point_generator = AnchorGenerator(sizes=[(s,) for s in sizes], aspect_ratios=(1.0,))
        self.center_sampling_radius = float(center_sampling_radius)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

        self.cls_convs = dense_head_tower(channels, num_convs, norm=norm, bias=True, owner="FCOSHead")
        self.cls_logits = nn.Conv2d(channels, self.num_classes, 3, padding=1)
        self.bbox_convs = dense_head_tower(channels, num_convs, norm=norm, bias=True, owner="FCOSHead")
        self.bbox_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(channels, 1, 3, padding=1)
        for conv in (self.cls_logits, self.bbox_pred, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability))

    def predict(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Raw outputs per level, points ordered by row then column: class logits Tensor[N, H*W, K],
        distances Tensor[N, H*W, 4] (``(l, t, r, b) / s_l``, >= 0) and centre-ness logits Tensor[N, H*W]."""
        logits, distances, centerness = [], [], []
        for feature in features:
            cls = self.cls_logits(self.cls_convs(feature))
            box = self.bbox_convs(feature)
            logits.append(cls.flatten(2).transpose(1, 2))
            distances.append(F.relu(self.bbox_pred(box)).flatten(2).transpose(1, 2))
            centerness.append(self.centerness(box).flatten(1))
        return logits, distances, centerness

    def forward(
        self,
        features: Mapping[str, Tensor],
        padded_size: Sequence[int],
        targets: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> tuple[list[tuple[Tensor, Tensor]], dict[str, Tensor]]:
        """Score and decode every point, or compute the losses in training.

        Args:
            features: maps by name, each Tensor[N, C, H_l, W_l].
            padded_size: ``(height, width)`` of the padded batch.
            targets: in training, per image ``boxes`` Tensor[G, 4] (xyxy, padded-batch pixels) and
                ``labels`` Tensor[G] (int64, 1..K); ``G`` may be 0.

        Returns:
            ``(levels, losses)``. In training ``([], {"loss_cls", "loss_box_reg", "loss_centerness"})``; at
            inference one ``(scores, boxes)`` per level and ``{}``: scores Tensor[N, H_l*W_l, K] (float32,
            ``sqrt(class probability * centre-ness)``), boxes Tensor[N, H_l*W_l, 4] (xyxy padded-batch
            pixels, not clipped).
        """
        feats = [features[f] for f in self.in_features]
        anchors = self.point_generator(feats, padded_size)
        points = [(a[:, :2] + a[:, 2:]) / 2 for a in anchors]
        sizes = [a[:, 2] - a[:, 0] for a in anchors]
        logits, distances, centerness = self.predict(feats)
        if self.training:
            if targets is None:
                raise ValueError("the FCOS head needs targets in training mode")
            return [], self.losses(points, sizes, torch.cat(logits, 1), torch.cat(distances, 1),
                                   torch.cat(centerness, 1), targets)
        levels = []
        for level_logits, level_distances, level_centerness, level_points, level_sizes in zip(
                logits, distances, centerness, points, sizes):
            scores = torch.sqrt(torch.sigmoid(level_logits.float()) * torch.sigmoid(level_centerness.float())[..., None])
            levels.append((scores, decode_distances(level_distances.float(), level_points, level_sizes)))
        return levels, {}

    def losses(self, points: Sequence[Tensor], sizes: Sequence[Tensor], logits: Tensor, distances: Tensor,
               centerness: Tensor, targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Focal, GIoU and centre-ness losses.

        Args:
            points: per level Tensor[P_l, 2], ``(x, y)`` pixels; sizes: per level Tensor[P_l].
            logits: Tensor[N, P, K]; distances: Tensor[N, P, 4]; centerness: Tensor[N, P] (all levels).
            targets: per image ``boxes`` Tensor[G_i, 4] and ``labels`` Tensor[G_i].

        Returns:
            ``{"loss_cls", "loss_box_reg", "loss_centerness"}``, scalars.
        """
        all_points, all_sizes = torch.cat(points), torch.cat(sizes)
        labels, matched_boxes = self._assign(points, sizes, targets)
        image_idx, point_idx = torch.nonzero(labels > 0, as_tuple=True)
        num_foreground = max(1, len(image_idx))
        loss_cls = sigmoid_focal_loss_by_label(logits, labels, alpha=self.focal_alpha, gamma=self.focal_gamma).sum()
        fg_points, fg_sizes = all_points[point_idx].float(), all_sizes[point_idx].float()
        fg_boxes = matched_boxes[image_idx, point_idx].float()
        predicted = decode_distances(distances[image_idx, point_idx].float(), fg_points, fg_sizes)
        loss_box = generalized_box_iou_loss(predicted, fg_boxes, reduction="sum", eps=1e-7)
        ctr_targets = centerness_targets(encode_distances(fg_boxes, fg_points, fg_sizes))
        loss_ctr = F.binary_cross_entropy_with_logits(centerness[image_idx, point_idx].float(), ctr_targets,
                                                      reduction="sum")
        return {"loss_cls": loss_cls / num_foreground, "loss_box_reg": loss_box / num_foreground,
                "loss_centerness": loss_ctr / num_foreground}

    def _assign(self, points: Sequence[Tensor], sizes: Sequence[Tensor],
                targets: Sequence[Mapping[str, Tensor]]) -> tuple[Tensor, Tensor]:
        """Per image and point, the class (1..K foreground, 0 background) Tensor[N, P] and the assigned
        ground-truth box Tensor[N, P, 4] (meaningful for foreground points)."""
        centres, scale = torch.cat(points), torch.cat(sizes)
        bounds = [s.new_tensor(r).expand(len(s), 2) for s, r in zip(sizes, self.size_ranges)]
        low, high = torch.cat(bounds).unbind(1)
        labels, boxes = [], []
        for target in targets:
            gt = target["boxes"].to(centres.dtype)
            classes = check_labels(target["labels"], self.num_classes)
            if not len(gt):
                labels.append(torch.zeros(len(centres), dtype=torch.int64, device=centres.device))
                boxes.append(centres.new_zeros(len(centres), 4))
                continue
            offsets = torch.cat([centres[:, None] - gt[None, :, :2], gt[None, :, 2:] - centres[:, None]], dim=2)
            gt_centres = (gt[:, :2] + gt[:, 2:]) / 2
            near_centre = (centres[:, None] - gt_centres[None]).abs().amax(dim=2) < self.center_sampling_radius * scale[:, None]
            reach = offsets.amax(dim=2)
            candidate = near_centre & (offsets.amin(dim=2) > 0) & (reach > low[:, None]) & (reach < high[:, None])
            area = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])).float()
            priority = torch.where(candidate, _AREA_PRIORITY - area[None], torch.zeros_like(area[None]))
            best, matched = priority.max(dim=1)
            assigned = best >= 1e-5
            labels.append(torch.where(assigned, classes[matched], torch.zeros_like(matched)))
            boxes.append(gt[matched])
        return torch.stack(labels), torch.stack(boxes)


def _size_ranges(sizes: Sequence[float], ranges: Sequence[Sequence[float]] | None) -> list[tuple[float, float]]:
    """Per level ``(low, high)``: those given (checked), or ``(4 s, 8 s)`` opened to 0 on the first level
    and to infinity on the last."""
    if ranges is None:
        derived = [(4.0 * s, 8.0 * s) for s in sizes]
        derived[0] = (0.0, derived[0][1])
        derived[-1] = (derived[-1][0], math.inf)
        return derived
    ranges = [tuple(float(v) for v in r) for r in ranges]
    if len(ranges) != len(sizes) or any(len(r) != 2 or not r[0] < r[1] for r in ranges):
        raise ValueError(f"FCOSHead size_ranges must be one [low, high] pair with low < high per level of "
                         f"in_features ({len(sizes)}), e.g. [[0, 64], [64, 128], ..., [512, .inf]]; got {ranges}")
    return ranges  # type: ignore[return-value]

