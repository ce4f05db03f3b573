"""Loss functions shared by detection heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss as _torchvision_focal_loss

__all__ = ["sigmoid_focal_loss", "smooth_l1_loss"]


def smooth_l1_loss(input: Tensor, target: Tensor, *, beta: float, reduction: str = "sum") -> Tensor:
    """Smooth L1 (Huber-like) loss: ``0.5 * x**2 / beta`` for ``|x| < beta``, else ``|x| - 0.5 * beta``.

    Args:
        input: Tensor[...], predictions.
        target: Tensor of the same shape.
        beta: the transition point between the quadratic and the linear part; ``beta < 1e-5``
            gives the plain L1 loss (avoids dividing by a vanishing beta).
        reduction: ``"sum"``, ``"mean"`` or ``"none"``.

    Returns:
        The reduced loss (a scalar unless ``reduction="none"``), the dtype of ``input``; float32 for
        half-precision inputs (mixed precision), which are computed in float32.
    """
    if input.dtype in (torch.float16, torch.bfloat16) or target.dtype in (torch.float16, torch.bfloat16):
        input, target = input.float(), target.float()
    if beta < 1e-5:
        loss = torch.abs(input - target)
        if reduction == "sum":
            return loss.sum()
        if reduction == "mean":
            return loss.mean()
        return loss
    return F.smooth_l1_loss(input, target, beta=beta, reduction=reduction)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss of Lin et al. ("Focal Loss for Dense Object Detection") per element, unreduced:
    binary cross-entropy of ``sigmoid(logits)`` against ``targets``, weighted by ``(1 - p_t) ** gamma``
    and by ``alpha`` for positives, ``1 - alpha`` for negatives (``alpha < 0``: no weighting), as
    :func:`torchvision.ops.sigmoid_focal_loss` computes it.

    Args:
        logits: Tensor[...], one logit per (anchor, class).
        targets: Tensor of the same shape, 1.0 for the true class of a foreground anchor, else 0.0.

    Returns:
        Tensor of the same shape, float32 for half-precision inputs (computed in float32).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return _torchvision_focal_loss(logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma, reduction="none")
