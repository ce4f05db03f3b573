"""Shared losses: the focal loss by label against torchvision's focal loss (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as torchvision_focal_loss

from segkit.ops import sigmoid_focal_loss_by_label


def _reference(logits: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    targets = F.one_hot(labels.clamp(min=0), logits.shape[-1] + 1)[..., 1:].to(logits.dtype)
    return torchvision_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none").sum(-1) * (labels >= 0)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.25, 0.0), (-1.0, 0.5), (0.4, 1.5)])
def test_focal_loss_by_label_equals_torchvision_in_value_and_gradient(alpha, gamma):
    torch.manual_seed(0)
    logits = (torch.randn(2, 60, 7) * 4).requires_grad_()
    labels = torch.randint(-1, 8, (2, 60))  # -1 ignored, 0 background, 1..7 classes
    weights = torch.randn(2, 60)
    ours = sigmoid_focal_loss_by_label(logits, labels, alpha=alpha, gamma=gamma)
    reference = _reference(logits, labels, alpha, gamma)
    assert torch.equal(ours, reference)  # the same operations: identical values
    (grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    (expected,) = torch.autograd.grad((reference * weights).sum(), logits)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(grad[labels < 0], torch.zeros_like(grad[labels < 0]))  # ignored anchors: no gradient
    double = logits.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sigmoid_focal_loss_by_label(x, labels, alpha=alpha, gamma=gamma),
                                    (double,))


def test_focal_loss_by_label_computes_half_precision_in_float32_and_refuses_negative_gamma():
    logits, labels = torch.randn(3, 5, dtype=torch.bfloat16, requires_grad=True), torch.tensor([0, 2, -1])
    loss = sigmoid_focal_loss_by_label(logits, labels)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        sigmoid_focal_loss_by_label(logits, labels, gamma=-1.0)
