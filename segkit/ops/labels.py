"""Checks shared by the detection heads: the class count and the range of the target labels."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_labels", "check_num_classes"]


def check_num_classes(num_classes: int) -> int:
    """``num_classes`` (the number of foreground classes K) as an int, refused below 1."""
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes is the number of foreground classes and must be >= 1, got {num_classes}")
    return int(num_classes)


def check_labels(labels: Tensor, num_classes: int) -> Tensor:
    """Target labels as int64, refused unless every one is a foreground class 1..K.

    Example:
        >>> check_labels(torch.tensor([1, 3]), 3)
        tensor([1, 3])
        >>> check_labels(torch.tensor([0, 2]), 3)
        Traceback (most recent call last):
        ...
        ValueError: target labels must be in 1..3 (num_classes=3 foreground classes; 0 is background), got values from 0 to 2
    """
    labels = labels.to(torch.int64)
    if labels.numel() and (labels.min() < 1 or labels.max() > num_classes):
        raise ValueError(f"target labels must be in 1..{num_classes} (num_classes={num_classes} foreground classes; "
                         f"0 is background), got values from {int(labels.min())} to {int(labels.max())}")
    return labels
