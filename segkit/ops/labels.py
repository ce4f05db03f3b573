"""Checks shared by the detection heads and datasets: the class count, the range of the target labels
and the number of boxes an image may hold."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MAX_BOXES_PER_IMAGE", "check_box_count", "check_labels", "check_num_classes"]

#: The most ground-truth boxes one training image may hold. Matching compares every box with every
#: anchor (a [boxes, anchors] IoU matrix: 10,000 boxes x 30,000 anchors is 1.2 GB in float32), so the
#: cost of a hostile annotation file is bounded here, before that work. Dense real data stays far below
#: it (COCO: at most 93 objects per image; SKU-110K: about 700).
MAX_BOXES_PER_IMAGE = 10_000


def check_box_count(count: int, where: str) -> None:
    """Refuse more than :data:`MAX_BOXES_PER_IMAGE` boxes for one image.

    Raises:
        ValueError: naming ``where`` (the image, and its file where known), the count and the limit.
    """
    if count > MAX_BOXES_PER_IMAGE:
        raise ValueError(f"{where} has {count:,} boxes, more than the {MAX_BOXES_PER_IMAGE:,} one image may hold: "
                         f"training compares every box with every anchor, so the work and memory grow with their "
                         f"product; split the image into tiles or drop duplicate annotations.")


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
