"""Batching for detection datasets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["collate"]


def collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Turn a list of ``(image, target)`` samples into ``(images, targets)`` lists.

    Images keep their own sizes (float32 ``[3, H_i, W_i]``); the model pads them into a batch, so
    nothing is resized or padded here. Use it as a ``DataLoader``'s ``collate_fn``.

    Args:
        batch: samples as returned by a dataset's ``__getitem__``.

    Returns:
        ``(images, targets)``: a list of image tensors and the list of their target dicts, in order.
    """
    images = [sample[0] for sample in batch]
    targets = [sample[1] for sample in batch]
    return images, targets
