"""Drawing model outputs on images: boxes with "name score" labels, translucent instance masks, and
semantic label maps with a legend.

Every function takes a uint8 ``[H, W, 3]`` RGB image (or any form :func:`segkit.predict.as_image_array`
accepts) and returns a new uint8 ``[H, W, 3]`` array; the input is never modified. Colours come from
a fixed palette indexed by class, so a class has the same colour in every picture.
"""

from __future__ import annotations

import colorsys
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from segkit.predict import ImageInput, as_image_array

__all__ = ["class_colors", "draw_detections", "draw_semantic", "draw_predictions"]

_GOLDEN = 0.6180339887498949
_PALETTE_SIZE = 256


def class_colors(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """The colour of each class index: uint8 ``[N, 3]`` RGB, the same in every call.

    Successive indices are a golden-ratio step apart in hue, with alternating saturation and
    brightness, so neighbouring classes never look alike.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    return _palette()[labels % _PALETTE_SIZE]


@functools.lru_cache(maxsize=1)
def _palette() -> np.ndarray:
    colors = []
    for i in range(_PALETTE_SIZE):
        hue = (0.07 + i * _GOLDEN) % 1.0
        saturation = (0.85, 0.6, 0.75)[i % 3]
        value = (0.95, 0.8)[i % 2]
        colors.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)])
    return np.asarray(colors, dtype=np.uint8)


def draw_detections(image: ImageInput, output: Mapping[str, Any], class_names: Sequence[str], *,
                    score_threshold: float = 0.3, mask_threshold: float = 0.5, alpha: float = 0.45) -> np.ndarray:
    """Draw detections: translucent masks, box outlines and a "name score" label per detection.

    Args:
        image: uint8 ``[H, W, 3]`` RGB (or a path, PIL image, float ``[3, H, W]`` tensor).
        output: one image's model output: ``boxes`` (``[N, 4]`` xyxy pixels of ``image``),
            ``labels`` (``[N]``, 1..K), ``scores`` (``[N]``) and optionally ``masks`` (``[N, 1, H, W]``
            or ``[N, H, W]``, probabilities or binary, at the image's size); tensors or arrays.
        class_names: ``class_names[label - 1]`` names ``label`` (``class_<label>`` beyond the list).
        score_threshold: detections scoring below this are not drawn.
        mask_threshold: probability from which a mask pixel is drawn.
        alpha: opacity of the masks.

    Returns:
        uint8 ``[H, W, 3]``: the image with the detections drawn, highest scores on top.

    Raises:
        ValueError: mismatched lengths, or masks of another size than the image.

    Example:
        >>> picture = draw_detections(image, predictor(image), predictor.class_names)
    """
    canvas = as_image_array(image).copy()
    boxes = _numpy(output.get("boxes", np.zeros((0, 4))), np.float64).reshape(-1, 4)
    labels = _numpy(output.get("labels", np.zeros(0)), np.int64).reshape(-1)
    scores = _numpy(output.get("scores", np.ones(len(boxes))), np.float64).reshape(-1)
    if not len(boxes) == len(labels) == len(scores):
        raise ValueError(f"output has {len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores; "
                         f"they must have one entry per detection")
    order = np.argsort(scores, kind="stable")  # ascending: the best detection is drawn last, on top
    order = order[scores[order] >= score_threshold]
    colors = class_colors(labels)
    if output.get("masks") is not None and len(order):
        masks = binary_masks(output["masks"], mask_threshold, canvas.shape[:2])[order]
        canvas = blend_masks(canvas, masks, colors[order], alpha)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    height, width = canvas.shape[:2]
    line = max(1, round(max(height, width) / 320))
    font = label_font(height, width)
    for i in order:
        color = tuple(int(c) for c in colors[i])
        x0, y0, x1, y1 = boxes[i]
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=color, width=line)
        text = f"{class_name_of(class_names, int(labels[i]))} {scores[i]:.2f}"
        draw_label(draw, (x0, y0), text, color, font, (height, width))
    return np.asarray(picture)


def draw_semantic(image: ImageInput, sem_seg: Any, class_names: Sequence[str], *, alpha: float = 0.45,
                  ignore_index: int | None = None) -> np.ndarray:
    """Colour each pixel by its class and add a legend of the classes present.

    Args:
        image: uint8 ``[H, W, 3]`` RGB (or another form :func:`as_image_array` accepts).
        sem_seg: class scores ``[C, H, W]`` (the arg-max is taken) or a label map ``[H, W]`` of
            class indices ``0..C-1``, at the image's size.
        class_names: ``class_names[c]`` names class index ``c``.
        alpha: opacity of the colours.
        ignore_index: a label-map value left uncoloured (``255`` in segkit's targets).

    Returns:
        uint8 ``[H, W, 3]``: the blended picture, with the legend in the top-left corner (classes by
        decreasing area).
    """
    canvas = as_image_array(image).copy()
    label_map = _numpy(sem_seg, None)
    if label_map.ndim == 3:
        label_map = label_map.argmax(axis=0)
    label_map = label_map.astype(np.int64)
    if label_map.shape != canvas.shape[:2]:
        raise ValueError(f"sem_seg is {label_map.shape} but the image is {canvas.shape[:2]}")
    valid = label_map != ignore_index if ignore_index is not None else np.ones(label_map.shape, dtype=bool)
    colored = class_colors(label_map).reshape(canvas.shape).astype(np.float32)
    mixed = canvas.astype(np.float32) * (1 - alpha) + colored * alpha
    canvas = np.where(valid[..., None], mixed.round(), canvas).astype(np.uint8)
    present, counts = np.unique(label_map[valid], return_counts=True)
    entries = [(int(c), _class_name(class_names, int(c))) for c in present[np.argsort(-counts, kind="stable")]]
    return _draw_legend(canvas, entries)


def draw_predictions(image: ImageInput, output: Mapping[str, Any], class_names: Sequence[str],
                     **kwargs: Any) -> np.ndarray:
    """:func:`draw_semantic` for outputs with ``sem_seg``, otherwise :func:`draw_detections`."""
    if output.get("sem_seg") is not None:
        kwargs = {k: v for k, v in kwargs.items() if k in ("alpha", "ignore_index")}
        return draw_semantic(image, output["sem_seg"], class_names, **kwargs)
    return draw_detections(image, output, class_names, **kwargs)


# ------------------------------------------------------------------------------- helpers
def _numpy(value: Any, dtype: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value) if dtype is None else np.asarray(value, dtype=dtype)


def binary_masks(masks: Any, threshold: float, size: tuple[int, int]) -> np.ndarray:
    """Masks ``[N, 1, H, W]`` or ``[N, H, W]`` (probabilities or binary) as bool ``[N, H, W]``."""
    array = _numpy(masks, None)
    if array.ndim == 4:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[1:] != tuple(size):
        raise ValueError(f"masks must be [N, 1, H, W] or [N, H, W] at the image's size {tuple(size)}, "
                         f"got shape {array.shape}")
    return array >= threshold if np.issubdtype(array.dtype, np.floating) else array > 0


def blend_masks(canvas: np.ndarray, masks: np.ndarray, colors: np.ndarray, alpha: float) -> np.ndarray:
    """Blend ``colors[i]`` where ``masks[i]``; where masks overlap the last one (highest score) wins."""
    covered = masks.any(axis=0)
    if not covered.any():
        return canvas
    top = masks.shape[0] - 1 - masks[::-1].argmax(axis=0)  # index of the last mask covering each pixel
    pixels = canvas[covered].astype(np.float32)
    blended = pixels * (1 - alpha) + colors[top[covered]].astype(np.float32) * alpha
    out = canvas.copy()
    out[covered] = np.clip(blended.round(), 0, 255).astype(np.uint8)
    return out


def label_font(height: int, width: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = int(np.clip(round(min(height, width) / 32), 9, 28))
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: fixed bitmap font
        return ImageFont.load_default()


def draw_label(draw: ImageDraw.ImageDraw, corner: tuple[float, float], text: str, color: tuple[int, ...],
                font: Any, size: tuple[int, int]) -> None:
    """A filled label with contrasting text above the box corner, or just inside the box when the
    corner is at the top of the image; kept inside the image horizontally."""
    height, width = size
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(1, (bottom - top) // 6)
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    x = min(max(0.0, corner[0]), max(0.0, width - w))
    y = corner[1] - h if corner[1] - h >= 0 else max(0.0, min(corner[1], height - h))
    draw.rectangle([x, y, x + w - 1, y + h - 1], fill=color)
    draw.text((x + pad - left, y + pad - top), text, fill=_text_color(color), font=font)


def _text_color(background: Sequence[int]) -> tuple[int, int, int]:
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def _draw_legend(canvas: np.ndarray, entries: Sequence[tuple[int, str]]) -> np.ndarray:
    """A white panel in the top-left corner: one row (colour swatch, class name) per entry, as many
    rows as fit in the image."""
    if not entries:
        return canvas
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    font = label_font(*canvas.shape[:2])
    boxes = [draw.textbbox((0, 0), name, font=font) for _, name in entries]
    row = max(b[3] - b[1] for b in boxes) + 4
    rows = max(1, min(len(entries), (canvas.shape[0] - 4) // row))
    width = row + 4 + max(b[2] - b[0] for b in boxes[:rows]) + 4
    draw.rectangle([0, 0, width, rows * row + 4], fill=(255, 255, 255))
    for k, ((index, name), (left, top, _, _)) in enumerate(zip(entries[:rows], boxes)):
        y = 2 + k * row
        color = tuple(int(c) for c in class_colors([index])[0])
        draw.rectangle([2, y + 1, row - 1, y + row - 2], fill=color, outline=(0, 0, 0))
        draw.text((row + 3 - left, y + 2 - top), name, fill=(0, 0, 0), font=font)
    return np.asarray(picture)


def class_name_of(names: Sequence[str], label: int) -> str:
    return str(names[label - 1]) if 1 <= label <= len(names) else f"class_{label}"


def _class_name(names: Sequence[str], index: int) -> str:
    return str(names[index]) if 0 <= index < len(names) else f"class_{index}"
