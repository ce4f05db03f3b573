"""Sample a fixed-size, class-balanced subset of matched predictions for the loss."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BalancedSampler"]


class BalancedSampler:
    """Pick at most ``batch_size_per_image`` predictions, of which at most a fraction are positive.

    Positives are drawn uniformly at random from the foreground labels; the remaining budget is
    filled with random background predictions. Ignored predictions (label -1) are never drawn.

    Args:
        batch_size_per_image: total number of sampled predictions per image.
        positive_fraction: the largest share of positives in the sample.

    Example:
        >>> labels = torch.tensor([1, 0, 0, -1, 1, 0])
        >>> pos, neg = BalancedSampler(batch_size_per_image=4, positive_fraction=0.5)(labels)
        >>> len(pos), len(neg)
        (2, 2)
    """

    def __init__(self, *, batch_size_per_image: int, positive_fraction: float) -> None:
        if batch_size_per_image <= 0:
            raise ValueError(f"batch_size_per_image must be positive, got {batch_size_per_image}")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)

    def __call__(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Sample one image.

        Args:
            labels: Tensor[N], integer: ``>= 1`` positive, 0 negative, -1 ignored.

        Returns:
            ``(positive_idx, negative_idx)``: int64 index tensors into ``labels``, in random order.
        """
        positive = torch.nonzero(labels >= 1).squeeze(1)
        negative = torch.nonzero(labels == 0).squeeze(1)
        num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
        num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
        pos_perm = torch.randperm(positive.numel(), device=labels.device)[:num_pos]
        neg_perm = torch.randperm(negative.numel(), device=labels.device)[:num_neg]
        return positive[pos_perm], negative[neg_perm]
