"""Loss functions shared by detection heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss as _torchvision_focal_loss

__all__ = ["sigmoid_focal_loss", "sigmoid_focal_loss_by_label", "smooth_l1_loss"]


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


def sigmoid_focal_loss_by_label(logits: Tensor, labels: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """:func:`sigmoid_focal_loss` of every class of every anchor, summed over the classes, with the
    targets given as one label per anchor: the same values with a fraction of the memory.

    The per-element loss is computed without recording the graph; the backward pass recomputes it
    from ``logits`` and ``labels`` alone, so training keeps no [..., K] intermediates alive (the plain
    composition keeps about five, plus the one-hot targets: several times the logits' size on a dense
    detector with 100k anchors and 80 classes).

    Args:
        logits: Tensor[..., K], one logit per (anchor, class).
        labels: int64 Tensor[...]: 1..K the true class of a foreground anchor (its target is 1.0 for
            that class, 0.0 for the others), 0 background (all targets 0.0), -1 ignored (no loss, no
            gradient).
        alpha: weight of the positives (``1 - alpha`` for the negatives); ``alpha < 0``: no weighting.
        gamma: focusing exponent (>= 0).

    Returns:
        Tensor[...] (float32 for half-precision logits): the loss of each anchor.

    Example:
        >>> logits, labels = torch.randn(2, 5, 3), torch.tensor([[0, 1, 3, -1, 2], [0, 0, 0, 0, 1]])
        >>> targets = F.one_hot(labels.clamp(min=0), 4)[..., 1:].float()
        >>> plain = sigmoid_focal_loss(logits, targets).sum(-1) * (labels >= 0)
        >>> torch.allclose(sigmoid_focal_loss_by_label(logits, labels), plain)
        True
    """
    if gamma < 0:
        raise ValueError(f"the focal loss's gamma must be >= 0, got {gamma}")
    return _FocalLossByLabel.apply(logits, labels, float(alpha), float(gamma))


def _focal_terms(logits: Tensor, labels: Tensor, alpha: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x`` (the logits, half precision made float32), the one-hot targets ``t``, ``p = sigmoid(x)`` and the
    class weights of each element."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    classes = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=labels.dtype)
    t = (labels.unsqueeze(-1) == classes).to(x.dtype)
    weight = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else torch.ones_like(t)
    return x, t, torch.sigmoid(x), weight


class _FocalLossByLabel(torch.autograd.Function):
    """Forward: the focal loss per anchor. Backward: its gradient, recomputed from the saved inputs:
    with ``p_t = p t + (1 - p)(1 - t)`` and ``ce = -log p_t``, the derivative of ``w (1 - p_t)^gamma ce``
    in ``x`` is ``w ((1 - p_t)^gamma (p - t) - gamma (1 - p_t)^(gamma - 1) (2t - 1) p (1 - p) ce)``.

    Both passes run over chunks of at most :data:`_FOCAL_CHUNK` elements, so their [..., K]
    temporaries stay a few MB however many anchors a batch has (the values are those of one pass over
    everything: every operation is elementwise, or a sum over the classes of one anchor)."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
        ctx.save_for_backward(logits, labels)
        ctx.alpha, ctx.gamma = alpha, gamma
        num_classes = logits.shape[-1]
        flat_logits, flat_labels = logits.reshape(-1, num_classes), labels.reshape(-1)
        dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        out = torch.empty(flat_labels.shape, dtype=dtype, device=logits.device)
        for rows in _chunks(len(flat_labels), num_classes):
            x, t, p, weight = _focal_terms(flat_logits[rows], flat_labels[rows], alpha)
            ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
            p_t = p * t + (1 - p) * (1 - t)
            loss = weight * (ce * ((1 - p_t) ** gamma))
            out[rows] = loss.sum(-1) * (flat_labels[rows] >= 0)
        return out.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, None, None, None]:
        logits, labels = ctx.saved_tensors
        gamma = ctx.gamma
        num_classes = logits.shape[-1]
        flat_logits, flat_labels = logits.reshape(-1, num_classes), labels.reshape(-1)
        flat_grad_output = grad_output.reshape(-1)
        out = torch.empty_like(flat_logits)
        for rows in _chunks(len(flat_labels), num_classes):
            chunk_labels = flat_labels[rows]
            x, t, p, weight = _focal_terms(flat_logits[rows], chunk_labels, ctx.alpha)
            one_minus_pt = 1 - (p * t + (1 - p) * (1 - t))
            grad = one_minus_pt**gamma * (p - t)
            if gamma != 0:
                ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
                # (1 - p_t)^(gamma - 1) is infinite at p_t = 1 for gamma < 1, where the term's limit is 0
                power = torch.where(one_minus_pt > 0, one_minus_pt.clamp(min=torch.finfo(x.dtype).tiny) ** (gamma - 1),
                                    torch.zeros_like(one_minus_pt))
                grad = grad - gamma * power * (2 * t - 1) * p * (1 - p) * ce
            scale = (flat_grad_output[rows].to(x.dtype) * (chunk_labels >= 0)).unsqueeze(-1)
            out[rows] = (weight * grad * scale).to(logits.dtype)
        return out.view(logits.shape), None, None, None


#: Elements of [..., K] per chunk of the focal loss by label (1 Mi: 4 MB per float32 temporary).
_FOCAL_CHUNK = 1 << 20


def _chunks(num_rows: int, num_classes: int) -> list[slice]:
    """Row slices of at most :data:`_FOCAL_CHUNK` elements (at least one row each)."""
    step = max(1, _FOCAL_CHUNK // max(num_classes, 1))
    return [slice(start, start + step) for start in range(0, num_rows, step)] or [slice(0, 0)]
