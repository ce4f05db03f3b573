"""SimOTA label assignment (Ge et al., "YOLOX: Exceeding YOLO Series in 2021", section 2.2): each
ground-truth box takes the ``k`` lowest-cost grid cells among the cells near it, ``k`` chosen per box
from the IoUs of its best predictions, and a cell claimed by several boxes stays with the cheapest.

The cost of assigning cell ``a`` to box ``g`` is

    cost[g, a] = BCE(sqrt(p_cls[a] * p_obj[a]), onehot(label_g)) summed over the classes
                 + iou_weight * -log(IoU(box_g, predicted_box_a) + 1e-8)
                 + 1e5 unless the centre of cell ``a`` lies both inside box ``g`` and inside the square of
                   half side ``center_radius * stride_a`` around box ``g``'s centre.

Only cells whose centre lies inside some box or some box's centre square are candidates; every other
cell is background. Box ``g`` keeps ``k_g = max(1, int(sum of its topk_candidates best IoUs))`` cells, so
``1 <= k_g <= topk_candidates``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_iou

__all__ = ["SimOTAAssignment", "simota_assign"]


class SimOTAAssignment(NamedTuple):
    """The assignment of one image's cells (:func:`simota_assign`)."""

    foreground: Tensor
    """bool Tensor[A]: the cells assigned to a box."""
    matched_gt: Tensor
    """int64 Tensor[F]: for each foreground cell, in cell order, the index of its box."""
    matched_iou: Tensor
    """float Tensor[F]: the IoU of each foreground cell's predicted box with its box."""


def candidate_cells(centers: Tensor, strides: Tensor, gt_boxes: Tensor, center_radius: float) -> tuple[Tensor, Tensor]:
    """Which cells lie inside each box and inside each box's centre region.

    Args:
        centers: Tensor[A, 2], ``(x, y)`` of every cell centre, input pixels.
        strides: Tensor[A], the stride of each cell's level.
        gt_boxes: Tensor[G, 4], xyxy.
        center_radius: half side of the centre square, in strides.

    Returns:
        ``(candidates, in_box_and_center)``: bool Tensor[A], cells inside some box or some box's centre
        square; bool Tensor[G, A], cells inside both box ``g`` and its centre square.
    """
    x, y = centers[:, 0], centers[:, 1]
    in_box = ((x[None] > gt_boxes[:, 0:1]) & (x[None] < gt_boxes[:, 2:3])
              & (y[None] > gt_boxes[:, 1:2]) & (y[None] < gt_boxes[:, 3:4]))
    cx, cy = (gt_boxes[:, 0:1] + gt_boxes[:, 2:3]) / 2, (gt_boxes[:, 1:2] + gt_boxes[:, 3:4]) / 2
    radius = center_radius * strides[None]
    in_center = ((x[None] - cx).abs() < radius) & ((y[None] - cy).abs() < radius)
    return (in_box | in_center).any(0), in_box & in_center


@torch.no_grad()
def simota_assign(
    scores: Tensor,
    pred_boxes: Tensor,
    centers: Tensor,
    strides: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    *,
    center_radius: float = 2.5,
    topk_candidates: int = 10,
    iou_weight: float = 3.0,
) -> SimOTAAssignment:
    """Assign the cells of one image to its boxes (see the module docstring).

    Args:
        scores: Tensor[A, K], joint class probabilities ``sigmoid(cls) * sigmoid(obj)`` of every cell.
        pred_boxes: Tensor[A, 4], the decoded predicted boxes (xyxy).
        centers: Tensor[A, 2], cell centres; strides: Tensor[A], their strides.
        gt_boxes: Tensor[G, 4] (xyxy) and gt_labels: int64 Tensor[G] (0-based classes); ``G`` may be 0.
        center_radius: half side of each box's centre square, in strides of the cell's level.
        topk_candidates: how many of a box's best IoUs are summed into its ``k``.
        iou_weight: weight of the IoU cost against the class cost.

    Returns:
        A :class:`SimOTAAssignment`; every cell is background when ``G`` is 0.
    """
    num_cells = scores.shape[0]
    foreground = torch.zeros(num_cells, dtype=torch.bool, device=scores.device)
    if len(gt_boxes) == 0:
        return SimOTAAssignment(foreground, gt_labels.new_zeros(0), scores.new_zeros(0))
    candidates, geometry = candidate_cells(centers, strides, gt_boxes, center_radius)
    cand_idx = torch.nonzero(candidates).squeeze(1)
    if cand_idx.numel() == 0:
        return SimOTAAssignment(foreground, gt_labels.new_zeros(0), scores.new_zeros(0))
    ious = box_iou(gt_boxes.float(), pred_boxes[cand_idx].float())  # [G, C]
    cost = _class_cost(scores[cand_idx].float(), gt_labels) + iou_weight * -torch.log(ious + 1e-8)
    cost = cost + 1e5 * (~geometry[:, cand_idx]).float()

    top_ious = ious.topk(min(topk_candidates, len(cand_idx)), dim=1).values
    dynamic_k = top_ious.sum(1).int().clamp(min=1)  # [G]
    ranks = cost.argsort(dim=1).argsort(dim=1)  # rank of each candidate in its box's cost order
    matching = ranks < dynamic_k[:, None]  # [G, C]
    # A cell claimed by several boxes stays with the one it costs least.
    shared = matching.sum(0) > 1
    if shared.any():
        cheapest = cost[:, shared].argmin(0)
        matching[:, shared] = False
        matching[cheapest, torch.nonzero(shared).squeeze(1)] = True
    matched = matching.any(0)
    matched_gt = matching[:, matched].float().argmax(0)
    matched_iou = ious[matched_gt, torch.nonzero(matched).squeeze(1)]
    foreground[cand_idx[matched]] = True
    return SimOTAAssignment(foreground, matched_gt, matched_iou)


def _class_cost(probs: Tensor, gt_labels: Tensor) -> Tensor:
    """Tensor[G, C]: the binary cross-entropy of ``sqrt(probs)`` (Tensor[C, K]) against each box's one-hot
    class, summed over the K classes without forming the [G, C, K] tensor."""
    p = probs.sqrt().clamp(1e-6, 1 - 1e-6)
    negative = -torch.log1p(-p)  # the cost of each class being a negative, [C, K]
    p_true = p[:, gt_labels].T  # [G, C]
    return negative.sum(1)[None] - torch.log(p_true) + torch.log1p(-p_true)
