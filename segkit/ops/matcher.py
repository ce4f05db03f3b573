"""Assign each predicted box (anchor or proposal) to a ground-truth box by IoU."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Matcher"]


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
