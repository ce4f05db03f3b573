"""Small synthetic scenes shared by the transform tests."""

from __future__ import annotations

import numpy as np
import torch


def two_rectangles() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A 40x60 image with two filled rectangles, one on the left, one on the right: the image, their boxes
    (``x1, y1, x2, y2``), labels ``[1, 2]`` and masks."""
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    masks = np.zeros((2, 40, 60), dtype=np.uint8)
    masks[0, 5:15, 2:12] = 1
    masks[1, 20:35, 40:55] = 1
    image[masks[0] == 1] = (255, 0, 0)
    image[masks[1] == 1] = (0, 255, 0)
    boxes = np.array([[2, 5, 12, 15], [40, 20, 55, 35]], dtype=np.float32)
    return image, boxes, np.array([1, 2]), masks


def tight_box(mask: torch.Tensor) -> list[float]:
    """The smallest box ``[x1, y1, x2, y2]`` around the pixels of ``mask``."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
