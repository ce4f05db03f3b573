"""Box heads: turn pooled RoI features into one feature vector per RoI."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from segkit.registry import HEADS

__all__ = ["TwoFCHead"]


@HEADS.register()
class TwoFCHead(nn.Module):
    """Flatten, then two fully connected layers with ReLU (the Faster R-CNN "2fc" box head).

    Args:
        in_channels: channels of the pooled features.
        resolution: side of the pooled features (``7`` for ``7 x 7``).
        fc_dim: width of both layers, also the output size (``out_channels``).

    Example:
        >>> head = TwoFCHead(in_channels=8, resolution=7, fc_dim=32)
        >>> head(torch.rand(5, 8, 7, 7)).shape
        torch.Size([5, 32])
    """

    def __init__(self, *, in_channels: int, resolution: int, fc_dim: int = 1024) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_channels * resolution * resolution, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.out_channels = fc_dim

    def forward(self, x: Tensor) -> Tensor:
        """Map Tensor[R, C, S, S] pooled features to Tensor[R, fc_dim]."""
        x = F.relu(self.fc6(x.flatten(1)))
        return F.relu(self.fc7(x))
