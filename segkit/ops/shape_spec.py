"""Feature-map shape declarations shared by backbones, necks and heads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

__all__ = ["ShapeSpec", "shared_channels"]


class ShapeSpec(NamedTuple):
    """Channels and stride (input pixels per feature pixel) of one feature map."""

    channels: int
    stride: int


def shared_channels(in_shapes: Mapping[str, ShapeSpec], in_features: Sequence[str], *, owner: str) -> int:
    """The channel count shared by ``in_features`` of ``in_shapes``, for a head applied to every level.

    Raises:
        ValueError: a feature is not among ``in_shapes``, or the features differ in channels.
    """
    missing = [f for f in in_features if f not in in_shapes]
    if missing:
        raise ValueError(f"{owner} in_features {missing} are not among the input maps {list(in_shapes)}")
    channels = {in_shapes[f].channels for f in in_features}
    if len(channels) != 1:
        raise ValueError(f"{owner} is shared across levels, so its inputs need one channel count; got {channels}")
    return channels.pop()
