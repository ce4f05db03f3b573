"""Feature-map shape declarations shared by backbones, necks and heads."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["ShapeSpec"]


class ShapeSpec(NamedTuple):
    """Channels and stride (input pixels per feature pixel) of one feature map."""

    channels: int
    stride: int
