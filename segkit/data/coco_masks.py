"""COCO instance-mask annotations: cheap validation and conversion to RLE."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pycocotools import mask as mask_utils

__all__ = ["mask_problem", "to_rle"]

_NUMBER_TYPES = frozenset({int, float})


def to_rle(segm: Any, height: int, width: int) -> dict[str, Any]:
    """One RLE of a valid segmentation: polygons merged, uncompressed RLE compressed."""
    if isinstance(segm, list):  # polygons
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(segm, height, width)
    return segm


_RLE_FORM = "an RLE mask is {'size': [height, width], 'counts': <string or run lengths>}"


def mask_problem(ann: Mapping[str, Any], height: int, width: int) -> str | None:
    """What is wrong with ``ann['segmentation']`` for an image of ``height x width``, or ``None``.

    Cheap: polygons are checked for length and number types, RLE for ``size`` and, when
    uncompressed, the sum of its run lengths; nothing is rasterised.
    """
    if "segmentation" not in ann:
        return ("has no 'segmentation', but the config asks for masks (with_masks: true); add its polygons "
                "[[x1, y1, x2, y2, ...]] or RLE mask")
    segm = ann["segmentation"]
    if isinstance(segm, list) and segm:
        return _polygon_problem(segm)
    if isinstance(segm, dict) and segm:
        return _rle_problem(segm, height, width)
    if not segm:
        return (f"has an empty 'segmentation' ({segm!r}), but the config asks for masks (with_masks: true); "
                f"add its polygons [[x1, y1, x2, y2, ...]] or RLE mask")
    return (f"has a 'segmentation' of type {type(segm).__name__}; expected a list of polygons "
            f"[[x1, y1, x2, y2, ...], ...] or an RLE dict ({_RLE_FORM})")


def _polygon_problem(polygons: list[Any]) -> str | None:
    if all(type(v) in _NUMBER_TYPES for v in polygons):
        return ("has a 'segmentation' that is a flat list of numbers; polygons are nested, one list per "
                "polygon: [[x1, y1, x2, y2, ...], ...]")
    for k, poly in enumerate(polygons):
        where = f"has a 'segmentation' whose polygon {k}"
        if not isinstance(poly, list):
            return f"{where} is a {type(poly).__name__}, not a list of numbers [x1, y1, x2, y2, ...]"
        if len(poly) < 6:
            return (f"{where} has {len(poly)} number(s); a polygon needs at least 3 points "
                    f"(6 numbers x1, y1, x2, y2, x3, y3)")
        if len(poly) % 2:
            return f"{where} has an odd count of numbers ({len(poly)}); it must list x, y pairs"
        if not set(map(type, poly)) <= _NUMBER_TYPES or not math.isfinite(sum(poly)):
            bad = next((v for v in poly if type(v) not in _NUMBER_TYPES or not math.isfinite(v)), None)
            return f"{where} holds {bad!r}, which is not a finite number; coordinates are pixels"
    return None


def _rle_problem(rle: Mapping[str, Any], height: int, width: int) -> str | None:
    missing = [key for key in ("size", "counts") if key not in rle]
    if missing:
        return f"has an RLE 'segmentation' without {' or '.join(repr(k) for k in missing)}; {_RLE_FORM}"
    size, counts = rle["size"], rle["counts"]
    is_pair = isinstance(size, (list, tuple)) and all(type(v) is int for v in size)
    if not is_pair or list(size) != [height, width]:
        hint = " (it looks like [width, height])" if is_pair and list(size) == [width, height] else ""
        return (f"has an RLE 'segmentation' of size {size!r}{hint} but its image is {height}x{width} (HxW); "
                f"'size' must be [height, width] of the image: re-encode the mask at the image's size")
    if isinstance(counts, (str, bytes)):
        return None if counts else "has an RLE 'segmentation' with empty 'counts'"
    if not isinstance(counts, list):
        return (f"has an RLE 'segmentation' whose 'counts' is of type {type(counts).__name__}; it must be a "
                f"compressed string or a list of run lengths")
    if not set(map(type, counts)) <= {int} or (counts and min(counts) < 0):
        return "has an uncompressed RLE 'segmentation' whose 'counts' are not all non-negative integers"
    if sum(counts) != height * width:
        return (f"has an uncompressed RLE 'segmentation' whose run lengths sum to {sum(counts)}, but its "
                f"image has {height}x{width} = {height * width} pixels; the runs (column-major, starting "
                f"with background) must cover the image exactly")
    return None
