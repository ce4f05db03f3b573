"""SSD's training augmentation (Liu et al., "SSD: Single Shot MultiBox Detector", section 2.2 and 3.6), as
albumentations transforms registered in ``TRANSFORMS``: :class:`PhotometricDistort`, :class:`ZoomOut`
(the paper's "expansion") and :class:`MinIoURandomCrop`. torchvision's SSD recipe (``--data-augmentation
ssd``) applies them in this order, then a horizontal flip; in a dataset config::

    transforms:
      - {type: PhotometricDistort}
      - {type: ZoomOut, fill: [123, 117, 104], max_scale: 4.0, p: 0.5}
      - {type: MinIoURandomCrop}
      - {type: HorizontalFlip, p: 0.5}

They draw from the pipeline's random generators, so a pipeline seeded with ``set_random_seed`` repeats
its draws. Boxes are those of :func:`~segkit.data.transforms.build_transforms` (``pascal_voc``, with the
label and index columns riding along); masks follow the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np

from segkit.registry import TRANSFORMS

__all__ = ["PhotometricDistort", "ZoomOut", "MinIoURandomCrop"]


@TRANSFORMS.register()
class PhotometricDistort(A.ImageOnlyTransform):
    """SSD's colour distortion, each step with probability ``p_each``, in SSD's random order: brightness;
    then contrast either before or after (one coin) saturation and hue; then a random permutation of
    the colour channels.

    Brightness multiplies the pixels by a factor of ``brightness``; contrast blends with the image's mean
    grey level, saturation with each pixel's grey level (ITU-R 601 weights), by a factor of their ranges;
    hue rotates the HSV hue by a fraction of a turn drawn from ``hue``. The image stays uint8 (or float).

    Args:
        brightness / contrast / saturation: ``(low, high)`` ranges of the factors (torchvision's).
        hue: ``(low, high)`` range of the hue shift, fractions of a full turn.
        p_each: probability of each of the five steps.
        p: probability of applying the transform at all.

    Example:
        >>> PhotometricDistort()(image=np.zeros((8, 8, 3), np.uint8))["image"].shape
        (8, 8, 3)
    """

    def __init__(self, *, brightness: Sequence[float] = (0.875, 1.125), contrast: Sequence[float] = (0.5, 1.5),
                 saturation: Sequence[float] = (0.5, 1.5), hue: Sequence[float] = (-0.05, 0.05),
                 p_each: float = 0.5, p: float = 1.0) -> None:
        super().__init__(p=p)
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if len(value) != 2 or not 0 <= value[0] <= value[1]:
                raise ValueError(f"PhotometricDistort {name} must be a range [low, high] with 0 <= low <= high, got {value}")
        if len(hue) != 2 or not -0.5 <= hue[0] <= hue[1] <= 0.5:
            raise ValueError(f"PhotometricDistort hue must be a range [low, high] within [-0.5, 0.5], got {hue}")
        if not 0.0 <= p_each <= 1.0:
            raise ValueError(f"PhotometricDistort p_each is a probability, got {p_each}")
        self.brightness, self.contrast, self.saturation = tuple(brightness), tuple(contrast), tuple(saturation)
        self.hue, self.p_each = tuple(hue), float(p_each)

    def get_params(self) -> dict[str, Any]:
        rand = self.py_random

        def factor(limits: Sequence[float]) -> float | None:
            return rand.uniform(*limits) if rand.random() < self.p_each else None

        brightness, contrast_first = factor(self.brightness), rand.random() < 0.5
        contrast, saturation, hue = factor(self.contrast), factor(self.saturation), factor(self.hue)
        steps = [("brightness", brightness)]
        steps += [("contrast", contrast)] if contrast_first else []
        steps += [("saturation", saturation), ("hue", hue)]
        steps += [] if contrast_first else [("contrast", contrast)]
        permute = rand.random() < self.p_each
        order = list(range(3))
        if permute:
            rand.shuffle(order)
        return {"steps": [(name, value) for name, value in steps if value is not None], "channels": order}

    def apply(self, img: np.ndarray, steps: Sequence[tuple[str, float]] = (), channels: Sequence[int] = (0, 1, 2),
              **params: Any) -> np.ndarray:
        top = 255.0 if img.dtype == np.uint8 else 1.0
        x = img.astype(np.float32)
        for name, value in steps:
            if name == "brightness":
                x = x * value
            elif name == "contrast":
                x = value * x + (1.0 - value) * float(_grey(x).mean())
            elif name == "saturation":
                x = value * x + (1.0 - value) * _grey(x)[..., None]
            else:
                hsv = cv2.cvtColor(np.clip(x / top, 0.0, 1.0), cv2.COLOR_RGB2HSV)
                hsv[..., 0] = (hsv[..., 0] + value * 360.0) % 360.0
                x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * top
            x = np.clip(x, 0.0, top)
        x = x[..., list(channels)]
        return np.round(x).astype(np.uint8) if img.dtype == np.uint8 else x.astype(img.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness", "contrast", "saturation", "hue", "p_each")


def _grey(x: np.ndarray) -> np.ndarray:
    """ITU-R 601 grey level Tensor[H, W] of an RGB image [H, W, 3]."""
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


@TRANSFORMS.register()
class ZoomOut(A.DualTransform):
    """SSD's "expansion": place the image on a canvas ``r`` times its size (``r`` uniform in
    ``[1, max_scale]``), filled with ``fill``, at a uniform random position; boxes move with it, so the
    objects get smaller. Masks are filled with 0.

    Args:
        fill: canvas colour per channel, in the image's range (the dataset mean: 123, 117, 104 in uint8).
        max_scale: largest canvas side as a multiple of the image's (4 in SSD).
        p: probability of zooming out.

    Example:
        >>> out = ZoomOut(max_scale=2.0, p=1.0)(image=np.zeros((10, 10, 3), np.uint8))["image"]
        >>> 10 <= out.shape[0] <= 20
        True
    """

    def __init__(self, *, fill: Sequence[float] = (123.0, 117.0, 104.0), max_scale: float = 4.0, p: float = 0.5) -> None:
        super().__init__(p=p)
        if len(fill) != 3:
            raise ValueError(f"ZoomOut fill needs one value per channel (3), got {fill}")
        if max_scale < 1.0:
            raise ValueError(f"ZoomOut max_scale is the canvas side over the image's and must be >= 1, got {max_scale}")
        self.fill, self.max_scale = tuple(float(v) for v in fill), float(max_scale)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        ratio = self.py_random.uniform(1.0, self.max_scale)
        canvas = (int(height * ratio), int(width * ratio))
        top = int((canvas[0] - height) * self.py_random.random())
        left = int((canvas[1] - width) * self.py_random.random())
        return {"canvas": canvas, "top": top, "left": left, "source": (height, width)}

    def _paste(self, array: np.ndarray, canvas: tuple[int, int], top: int, left: int, fill: Any) -> np.ndarray:
        out = np.empty((*canvas, *array.shape[2:]), dtype=array.dtype)
        out[...] = np.asarray(fill, dtype=array.dtype)
        out[top:top + array.shape[0], left:left + array.shape[1]] = array
        return out

    def apply(self, img: np.ndarray, canvas: tuple[int, int] = (0, 0), top: int = 0, left: int = 0,
              **params: Any) -> np.ndarray:
        return self._paste(img, canvas, top, left, self.fill[: img.shape[2]] if img.ndim == 3 else self.fill[0])

    def apply_to_mask(self, mask: np.ndarray, canvas: tuple[int, int] = (0, 0), top: int = 0, left: int = 0,
                      **params: Any) -> np.ndarray:
        return self._paste(mask, canvas, top, left, 0)

    def apply_to_bboxes(self, bboxes: np.ndarray, canvas: tuple[int, int] = (0, 0), top: int = 0, left: int = 0,
                        source: tuple[int, int] = (1, 1), **params: Any) -> np.ndarray:
        out = np.array(bboxes, dtype=np.float32, copy=True)
        scale = np.array([source[1], source[0]] * 2, dtype=np.float32)
        pixels = out[:, :4] * scale + np.array([left, top, left, top], dtype=np.float32)
        out[:, :4] = pixels / np.array([canvas[1], canvas[0]] * 2, dtype=np.float32)
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("fill", "max_scale")


@TRANSFORMS.register()
class MinIoURandomCrop(A.DualTransform):
    """SSD's random crop: a minimum IoU is drawn from ``min_ious``; ``>= 1`` keeps the whole image,
    otherwise up to ``max_trials`` crops are drawn (sides ``min_scale``..1 of the image's, width / height
    in ``aspect_ratio``) until one holds the centre of some box and has IoU ``>=`` the drawn value with one
    of those boxes (0 accepts any crop holding a centre); if none does, the minimum is drawn again
    (at most ``max_rounds`` times, then the image is kept). The boxes whose centres are inside the crop
    are kept, clipped to it; the others are dropped with their labels and masks. An image without
    boxes is kept whole. These are torchvision's ``RandomIoUCrop`` rules.

    Args:
        min_ious: the minimum IoUs to draw from (SSD: any crop, 0.1, 0.3, 0.5, 0.7, 0.9, the whole image).
        min_scale: smallest crop side as a fraction of the image's.
        aspect_ratio: ``(low, high)`` of the crop's width / height (in pixels).
        max_trials: crops drawn per minimum IoU.
        max_rounds: minimum IoUs drawn before the image is kept as it is.
        p: probability of cropping.

    Example:
        >>> crop = MinIoURandomCrop(min_ious=[0.5])
    """

    def __init__(self, *, min_ious: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0), min_scale: float = 0.3,
                 aspect_ratio: Sequence[float] = (0.5, 2.0), max_trials: int = 40, max_rounds: int = 50,
                 p: float = 1.0) -> None:
        super().__init__(p=p)
        if not min_ious:
            raise ValueError("MinIoURandomCrop min_ious needs at least one value")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"MinIoURandomCrop min_scale must lie in (0, 1], got {min_scale}")
        if len(aspect_ratio) != 2 or not 0 < aspect_ratio[0] <= aspect_ratio[1]:
            raise ValueError(f"MinIoURandomCrop aspect_ratio must be a range [low, high] with 0 < low <= high, "
                             f"got {aspect_ratio}")
        if max_trials < 1 or max_rounds < 1:
            raise ValueError(f"MinIoURandomCrop max_trials and max_rounds must be >= 1, got {max_trials}, {max_rounds}")
        self.min_ious, self.min_scale = tuple(float(v) for v in min_ious), float(min_scale)
        self.aspect_ratio, self.max_trials, self.max_rounds = tuple(aspect_ratio), int(max_trials), int(max_rounds)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        whole = {"crop": None, "source": (height, width)}
        bboxes = data.get("bboxes")
        if bboxes is None or len(bboxes) == 0:
            return whole
        boxes = np.asarray(bboxes, dtype=np.float32)[:, :4] * np.array([width, height, width, height], np.float32)
        for _ in range(self.max_rounds):
            min_iou = self.py_random.choice(self.min_ious)
            if min_iou >= 1.0:
                return whole
            crop = self._draw(boxes, height, width, min_iou)
            if crop is not None:
                return {"crop": crop, "source": (height, width)}
        return whole

    def _draw(self, boxes: np.ndarray, height: int, width: int, min_iou: float) -> tuple[int, int, int, int] | None:
        """A crop ``(x1, y1, x2, y2)`` meeting ``min_iou``, or ``None`` after ``max_trials`` draws."""
        rand = self.py_random
        centres = (boxes[:, :2] + boxes[:, 2:4]) / 2
        for _ in range(self.max_trials):
            new_w = int(width * rand.uniform(self.min_scale, 1.0))
            new_h = int(height * rand.uniform(self.min_scale, 1.0))
            if new_w < 1 or new_h < 1 or not self.aspect_ratio[0] <= new_w / new_h <= self.aspect_ratio[1]:
                continue
            left, top = int((width - new_w) * rand.random()), int((height - new_h) * rand.random())
            crop = (left, top, left + new_w, top + new_h)
            inside = _centres_inside(centres, crop)
            if inside.any() and _iou_with(boxes[inside], crop).max() >= min_iou:
                return crop
        return None

    def apply(self, img: np.ndarray, crop: tuple[int, int, int, int] | None = None, **params: Any) -> np.ndarray:
        return img if crop is None else img[crop[1]:crop[3], crop[0]:crop[2]]

    def apply_to_mask(self, mask: np.ndarray, crop: tuple[int, int, int, int] | None = None, **params: Any) -> np.ndarray:
        return self.apply(mask, crop)

    def apply_to_bboxes(self, bboxes: np.ndarray, crop: tuple[int, int, int, int] | None = None,
                        source: tuple[int, int] = (1, 1), **params: Any) -> np.ndarray:
        if crop is None:
            return bboxes
        height, width = source
        out = np.array(bboxes, dtype=np.float32, copy=True)
        pixels = out[:, :4] * np.array([width, height, width, height], dtype=np.float32)
        inside = _centres_inside((pixels[:, :2] + pixels[:, 2:]) / 2, crop)
        out, pixels = out[inside], pixels[inside]
        x1, y1, x2, y2 = crop
        pixels[:, 0::2] = np.clip(pixels[:, 0::2], x1, x2) - x1
        pixels[:, 1::2] = np.clip(pixels[:, 1::2], y1, y2) - y1
        out[:, :4] = pixels / np.array([x2 - x1, y2 - y1] * 2, dtype=np.float32)
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_ious", "min_scale", "aspect_ratio", "max_trials", "max_rounds")


def _centres_inside(centres: np.ndarray, crop: tuple[int, int, int, int]) -> np.ndarray:
    """Bool [N]: the centre ``(x, y)`` lies strictly inside the crop."""
    x1, y1, x2, y2 = crop
    return (centres[:, 0] > x1) & (centres[:, 0] < x2) & (centres[:, 1] > y1) & (centres[:, 1] < y2)


def _iou_with(boxes: np.ndarray, crop: tuple[int, int, int, int]) -> np.ndarray:
    """IoU [N] of xyxy pixel boxes [N, 4] with the crop."""
    x1, y1, x2, y2 = crop
    inter_w = np.clip(np.minimum(boxes[:, 2], x2) - np.maximum(boxes[:, 0], x1), 0, None)
    inter_h = np.clip(np.minimum(boxes[:, 3], y2) - np.maximum(boxes[:, 1], y1), 0, None)
    inter = inter_w * inter_h
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (areas + (x2 - x1) * (y2 - y1) - inter)
