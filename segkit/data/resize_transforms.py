"""Random resizes that keep the aspect ratio, for every pipeline: image, boxes, instance masks and label maps.

* :class:`RandomShortSideResize`: the short side is one of ``sizes`` or a whole number of pixels in
  ``[min_size, max_size]``, the long side optionally capped (Detectron2's ``ResizeShortestEdge``,
  MMDetection's ``RandomChoiceResize`` / ``RandomResize`` with ``keep_ratio``).
* :class:`BaseSizeJitter`: PyTorch-Encoding's scale jitter for EncNet: a side (the long one by default)
  becomes a whole number of pixels drawn in ``[0.5, 2.0] x base_size``; follow it with
  :class:`~segkit.data.transforms.SegRandomCrop` for the padded random crop.

The image is resampled with ``interpolation`` and every mask (instance masks, label maps) with nearest
neighbours, so class indices never blend. Boxes follow exactly: the pipelines of
:func:`~segkit.data.transforms.build_transforms` carry boxes normalised to the image's size, which a
resize leaves unchanged, and they are mapped back to the pixels of the resized image at the end.

Detectors whose preprocessing resizes the images again (a ``min_size`` in the model) undo a data-level
resize; multi-scale training for them is the model's ``train_min_size`` (see
:class:`~segkit.models.preprocess.ImagePreprocessor`). These transforms serve models that take the
images at the size the pipeline gives (``min_size: null``) and semantic segmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np

from segkit.errors import ArgumentError
from segkit.registry import TRANSFORMS

__all__ = ["RandomShortSideResize", "BaseSizeJitter"]


class _KeepRatioResize(A.DualTransform):
    """Resize to the ``(height, width)`` that :meth:`target_size` draws; boxes (normalised) follow as they are."""

    def __init__(self, *, interpolation: int, p: float) -> None:
        super().__init__(p=p)
        self.interpolation = interpolation

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        raise NotImplementedError

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        return {"size": self.target_size(height, width)}

    def apply(self, img: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(img, (size[1], size[0]), interpolation=self.interpolation)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes  # normalised to the image size, which the resize scales with them


def _pixels(value: Any, argument: str, owner: str) -> int:
    """``value`` as a whole number of pixels >= 1, or an :class:`ArgumentError` naming ``argument``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise ArgumentError(f"{owner} {argument} must be a whole number of pixels >= 1, got {value!r}",
                            argument=argument)
    return int(value)


@TRANSFORMS.register()
class RandomShortSideResize(_KeepRatioResize):
    """Resize so that the short side is one of ``sizes``, or a random whole number of pixels in
    ``[min_size, max_size]``; the aspect ratio is kept and ``max_long_side`` caps the long side (the
    short side then ends up smaller).

    Give either ``sizes`` (drawn uniformly, Detectron2's "choice") or ``min_size`` and ``max_size``
    (every size in between equally likely, Detectron2's "range"). Masks use nearest neighbours; boxes
    follow the image.

    Args:
        sizes: short sides to choose from, in pixels.
        min_size / max_size: range of the short side in pixels (inclusive).
        max_long_side: upper bound of the long side in pixels, or ``None``.
        interpolation: OpenCV interpolation flag for the image.
        p: probability of applying the transform.

    Raises:
        ArgumentError: neither or both of ``sizes`` and the range, an empty list, a size below one
            pixel, or ``min_size > max_size``; naming the argument.

    Example:
        >>> resize = RandomShortSideResize(min_size=260, max_size=1040)  # 520 px x 0.5..2.0
        >>> resize = RandomShortSideResize(sizes=[640, 672, 704, 736, 768, 800], max_long_side=1333)
    """

    def __init__(self, *, sizes: Sequence[int] | None = None, min_size: int | None = None,
                 max_size: int | None = None, max_long_side: int | None = None,
                 interpolation: int = cv2.INTER_LINEAR, p: float = 1.0) -> None:
        super().__init__(interpolation=interpolation, p=p)
        name = type(self).__name__
        if sizes is not None:
            if min_size is not None or max_size is not None:
                raise ArgumentError(f"{name} takes either sizes (a choice) or min_size and max_size (a range), "
                                    "not both; remove one", argument="sizes")
            if isinstance(sizes, (str, int)) or len(sizes) == 0:
                raise ArgumentError(f"{name} sizes must be a non-empty list of short sides in pixels, got {sizes!r}",
                                    argument="sizes")
            self.sizes: tuple[int, ...] | None = tuple(_pixels(v, "sizes", name) for v in sizes)
            self.min_size, self.max_size = min(self.sizes), max(self.sizes)
        else:
            if min_size is None or max_size is None:
                raise ArgumentError(f"{name} needs sizes (a choice) or both min_size and max_size (a range)",
                                    argument="min_size" if min_size is None else "max_size")
            self.sizes = None
            self.min_size, self.max_size = _pixels(min_size, "min_size", name), _pixels(max_size, "max_size", name)
            if self.min_size > self.max_size:
                raise ArgumentError(f"{name} needs min_size <= max_size, got min_size={min_size}, "
                                    f"max_size={max_size}", argument="min_size")
        self.max_long_side = None if max_long_side is None else _pixels(max_long_side, "max_long_side", name)

    def draw_short_side(self) -> int:
        """A short side in pixels: one of ``sizes``, or one in ``[min_size, max_size]``."""
        if self.sizes is not None:
            return self.py_random.choice(self.sizes)
        return self.py_random.randint(self.min_size, self.max_size)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        scale = self.draw_short_side() / min(height, width)
        if self.max_long_side is not None:
            scale = min(scale, self.max_long_side / max(height, width))
        return max(1, round(height * scale)), max(1, round(width * scale))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sizes", "min_size", "max_size", "max_long_side", "interpolation")


_SIDES = ("long", "short")


@TRANSFORMS.register()
class BaseSizeJitter(_KeepRatioResize):
    """PyTorch-Encoding's scale jitter (its datasets' ``_sync_transform``): one side of the image, the
    long one by default, becomes ``S`` pixels, ``S`` a whole number drawn uniformly in
    ``[int(ratio_range[0] * base_size), int(ratio_range[1] * base_size)]``; the other side keeps the
    aspect ratio (rounded half up). Earlier PyTorch-Encoding releases drew the short side
    (``side: short``).

    PyTorch-Encoding then pads the image and the map at the bottom and right up to the crop size and
    crops at random, :class:`~segkit.data.transforms.SegRandomCrop` here (which pads the map with
    ``ignore_index`` where PyTorch-Encoding pads it with 0).

    Args:
        base_size: the base size in pixels (520 in PyTorch-Encoding, with a 480 crop).
        ratio_range: ``(low, high)`` multiples of ``base_size`` the side is drawn between.
        side: ``"long"`` or ``"short"``, the side that gets the drawn size.
        interpolation: OpenCV interpolation flag for the image (masks: nearest neighbours).
        p: probability of applying the transform.

    Raises:
        ArgumentError: a base size below one pixel, a range that is not ``0 < low <= high``, or an
            unknown ``side``; naming the argument.

    Example:
        >>> jitter = BaseSizeJitter(base_size=520)  # long side 260..1040 px
    """

    def __init__(self, *, base_size: int, ratio_range: Sequence[float] = (0.5, 2.0), side: str = "long",
                 interpolation: int = cv2.INTER_LINEAR, p: float = 1.0) -> None:
        super().__init__(interpolation=interpolation, p=p)
        name = type(self).__name__
        self.base_size = _pixels(base_size, "base_size", name)
        if isinstance(ratio_range, str) or len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
            raise ArgumentError(f"{name} ratio_range must be [low, high] with 0 < low <= high, got {ratio_range!r}",
                                argument="ratio_range")
        if side not in _SIDES:
            raise ArgumentError(f"{name} side must be one of {', '.join(_SIDES)}, got {side!r}", argument="side")
        self.ratio_range, self.side = (float(ratio_range[0]), float(ratio_range[1])), side
        self.size_range = (max(1, int(self.base_size * self.ratio_range[0])), int(self.base_size * self.ratio_range[1]))
        if self.size_range[0] > self.size_range[1]:
            raise ArgumentError(f"{name} ratio_range {list(ratio_range)} x base_size {base_size} holds no whole "
                                "number of pixels", argument="ratio_range")

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        size = self.py_random.randint(*self.size_range)
        long_is_height = height > width
        if (self.side == "long") == long_is_height:  # the drawn size is the height
            return size, max(1, int(width * size / height + 0.5))
        return max(1, int(height * size / width + 0.5)), size

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("base_size", "ratio_range", "side", "interpolation")
