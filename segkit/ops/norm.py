"""Normalisation layers by name, as configs spell them (``norm: GN``)."""

from __future__ import annotations

import math

from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["NORMS", "make_norm"]

#: Names :func:`make_norm` accepts.
NORMS = ("BN", "SyncBN", "GN", "FrozenBN")


def make_norm(norm: str, channels: int) -> nn.Module:
    """A normalisation layer by name: ``"BN"``, ``"SyncBN"``, ``"FrozenBN"`` or ``"GN"`` (32 groups, fewer if needed)."""
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"unknown norm '{norm}'; choose one of {', '.join(NORMS)}")
