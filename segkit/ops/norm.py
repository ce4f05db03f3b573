"""Normalisation layers by name, as configs spell them (``norm: GN``)."""

from __future__ import annotations

import math

from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["NORMS", "check_norm", "make_norm"]

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


def check_norm(norm: str | None, *, owner: str = "the layer", optional: bool = True) -> None:
    """Refuse a norm name outside :data:`NORMS` (``None``, no norm, is allowed where ``optional``).

    Raises:
        ValueError: naming ``owner`` and the allowed names.
    """
    if norm is None and optional or norm in NORMS:
        return
    allowed = ("null or " if optional else "") + f"one of {', '.join(NORMS)}"
    raise ValueError(f"{owner} norm must be {allowed}, got {norm!r}")
