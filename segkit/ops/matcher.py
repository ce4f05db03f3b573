"""Assign each predicted box (anchor or proposal) to a ground-truth box: by fixed IoU thresholds, or by
ATSS's per-box adaptive threshold."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

__all__ = ["ATSSMatcher", "Matcher"]


class Matcher:
    """Match predictions to ground truth with foreground / background IoU thresholds.

    A prediction whose best IoU is ``>= high_threshold`` is foreground (label 1), ``< low_threshold``
    background (label 0), and in between ignored (label -1). With ``allow_low_quality_matches``,
    every prediction that has the highest IoU of some ground-truth box (ties included) becomes
    foreground too, matched to its own best ground truth, so that each ground-truth box gets at
    least one match. A ground-truth box overlapping no prediction at all (IoU 0 everywhere, e.g. a
    degenerate box) creates no such match.

    Args:
        high_threshold: minimum IoU for a foreground match.
        low_threshold: IoU below which a prediction is background; ``<= high_threshold``.
        allow_low_quality_matches: add the best prediction(s) of each ground-truth box as foreground.

    Example:
        >>> iou = torch.tensor([[0.9, 0.4, 0.1]])  # one ground truth, three anchors
        >>> Matcher(high_threshold=0.7, low_threshold=0.3)(iou)
        (tensor([0, 0, 0]), tensor([ 1, -1,  0], dtype=torch.int8))
    """

    def __init__(
        self, *, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False
    ) -> None:
        if low_threshold > high_threshold:
            raise ValueError(
                f"the matcher's low_threshold ({low_threshold}) must not exceed its high_threshold ({high_threshold})"
            )
        self.high_threshold = float(high_threshold)
        self.low_threshold = float(low_threshold)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __call__(self, quality: Tensor) -> tuple[Tensor, Tensor]:
        """Match the columns (predictions) of an IoU matrix to its rows (ground truth).

        Args:
            quality: Tensor[M, N], float, IoU between M ground-truth and N predicted boxes. With
                ``M == 0`` every prediction is background.

        Returns:
            ``(matched_idxs, labels)``: matched_idxs Tensor[N], int64, the best ground-truth index
            of each prediction (0 when ``M == 0``; meaningful only where the label is 1);
            labels Tensor[N], int8: 1 foreground, 0 background, -1 ignored.
        """
        num_gt, num_pred = quality.shape
        if num_gt == 0 or num_pred == 0:
            zeros = torch.zeros(num_pred, dtype=torch.int64, device=quality.device)
            return zeros, zeros.to(torch.int8)
        best_iou, matched_idxs = quality.max(dim=0)
        labels = torch.ones(num_pred, dtype=torch.int8, device=quality.device)
        labels[best_iou < self.high_threshold] = -1
        labels[best_iou < self.low_threshold] = 0
        if self.allow_low_quality_matches:
            best_per_gt = quality.max(dim=1).values
            is_best = (quality == best_per_gt[:, None]) & (best_per_gt[:, None] > 0)
            labels[is_best.any(dim=0)] = 1
        return matched_idxs, labels


class ATSSMatcher:
    """Adaptive training sample selection (Zhang et al., "Bridging the Gap Between Anchor-based and
    Anchor-free Detection via Adaptive Training Sample Selection", CVPR 2020).

    For each ground-truth box: on every pyramid level, the ``topk`` anchors whose centres lie closest
    to the box centre are candidates; the box's IoU threshold is the mean plus the standard deviation
    of the candidates' IoUs; a candidate is foreground when its IoU reaches that threshold and its
    centre lies inside the box. An anchor chosen by several boxes goes to the one it overlaps most.
    Every other anchor is background (no anchor is ignored). The threshold adapts to each box: a small
    or oddly shaped box, whose anchors all overlap it poorly, still gets positives on the levels that
    fit it, which a fixed IoU threshold would deny it.

    Args:
        topk: candidates per level and box (9 in the paper).

    Example:
        >>> anchors = torch.tensor([[0., 0, 8, 8], [8, 0, 16, 8], [0, 8, 8, 16],  # level 1
        ...                         [0, 0, 16, 16], [16, 0, 32, 16]])               # level 2
        >>> ATSSMatcher(topk=2)(torch.tensor([[1., 1, 10, 10]]), anchors, [3, 2])  # IoUs .51 .11 .11 .32 0
        (tensor([0, 0, 0, 0, 0]), tensor([1, 0, 0, 0, 0], dtype=torch.int8))
    """

    def __init__(self, *, topk: int = 9) -> None:
        if int(topk) < 1:
            raise ValueError(f"the ATSS matcher's topk must be >= 1, got {topk}")
        self.topk = int(topk)

    def __call__(self, gt_boxes: Tensor, anchors: Tensor, level_sizes: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Match anchors to ground-truth boxes.

        Args:
            gt_boxes: Tensor[M, 4], xyxy. With ``M == 0`` every anchor is background.
            anchors: Tensor[N, 4], xyxy, the levels' anchors one after another.
            level_sizes: the number of anchors of each level, summing to N.

        Returns:
            ``(matched_idxs, labels)`` as :class:`Matcher` returns them (labels 1 or 0, never -1).
        """
        num_gt, num_anchors = len(gt_boxes), len(anchors)
        if sum(level_sizes) != num_anchors:
            raise ValueError(f"the ATSS matcher got {num_anchors} anchors but level sizes summing to {sum(level_sizes)}")
        if num_gt == 0 or num_anchors == 0:
            zeros = torch.zeros(num_anchors, dtype=torch.int64, device=anchors.device)
            return zeros, zeros.to(torch.int8)
        iou = box_iou(gt_boxes, anchors)
        gt_centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        distances = torch.cdist(gt_centres, anchor_centres)
        candidates, start = [], 0
        for size in level_sizes:
            if size:
                nearest = distances[:, start:start + size].topk(min(self.topk, size), dim=1, largest=False).indices
                candidates.append(nearest + start)
            start += size
        candidates = torch.cat(candidates, dim=1)  # [M, C]
        candidate_iou = iou.gather(1, candidates)
        threshold = candidate_iou.mean(1) + (candidate_iou.std(1) if candidates.shape[1] > 1 else 0.0)
        centres = anchor_centres[candidates]  # [M, C, 2]
        inside = torch.minimum((centres - gt_boxes[:, None, :2]).amin(-1),
                               (gt_boxes[:, None, 2:] - centres).amin(-1)) > 0.01
        positive = (candidate_iou >= threshold[:, None]) & inside
        chosen = torch.full_like(iou, -1.0).scatter_(1, candidates, torch.where(positive, candidate_iou, -1.0))
        best_iou, matched_idxs = chosen.max(dim=0)
        return matched_idxs, (best_iou >= 0).to(torch.int8)
