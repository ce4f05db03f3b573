"""COCO instance-mask annotations: cheap validation and conversion to RLE.

Every mask segkit rasterises or decodes (dataset targets, ``segkit data check``, the ground truth
of a ``segm`` evaluation and ``segkit score``, results files) is checked here first, because
pycocotools trusts its input: a polygon point at 1e9 makes it allocate gigabytes and then crash
the interpreter, and a compressed RLE string of garbage is read past its end or scored as an empty
mask. The checks bound the work before it is done:

* a polygon point may lie at most :data:`POLYGON_MARGIN` image widths (x) or heights (y) outside
  its image;
* the polygons of one annotation may have at most :data:`POLYGON_BUDGET` x (height + width) points
  plus outline length in pixels (the rasteriser walks every pixel of the outline);
* a compressed RLE string must be made of COCO's RLE alphabet and its run lengths must be
  non-negative and cover the image exactly, as for an uncompressed one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from segkit.config_types import is_finite_number

__all__ = ["POLYGON_BUDGET", "POLYGON_MARGIN", "compressed_counts_problems", "mask_problem", "rle_problem", "to_rle"]

_NUMBER_TYPES = frozenset({int, float})
#: How far outside its image a polygon point may lie, in image widths (x) or heights (y).
#: Annotation tools leave points a little outside; far outside means a wrong coordinate system.
POLYGON_MARGIN = 1.0
#: Largest rasterising work for one annotation's polygons, as points plus outline length in pixels,
#: per pixel of the image's height + width. A traced object's outline is a few times the image's
#: half-perimeter at most; 100 times bounds the rasteriser's memory to a few megabytes per
#: thousand pixels of image side.
POLYGON_BUDGET = 100
# COCO's compressed RLE: each character is 48 + 6 bits (5 value bits, continuation 0x20, sign
# 0x10 on a number's last character); 7 characters hold any 32-bit run length.
_RLE_FIRST, _RLE_LAST, _RLE_MAX_CHARS = 48, 111, 7


def to_rle(segm: Any, height: int, width: int) -> dict[str, Any]:
    """One RLE of a valid segmentation: polygons merged, uncompressed RLE compressed.

    Raises:
        ValueError: polygons that :func:`mask_problem` refuses (too far outside the image or too
            long to rasterise); callers check annotations first, this keeps pycocotools safe.
    """
    if isinstance(segm, list):  # polygons
        problem = _polygon_problem(segm, height, width)
        if problem is not None:
            raise ValueError(f"a segmentation that {problem}")
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(segm, height, width)
    return segm


_NEEDED = "with_masks: true, or a 'segm' evaluation"
_RLE_FORM = "an RLE mask is {'size': [height, width], 'counts': <string or run lengths>}"


def mask_problem(ann: Mapping[str, Any], height: int, width: int) -> str | None:
    """What is wrong with ``ann['segmentation']`` for an image of ``height x width``, or ``None``.

    Cheap, and nothing is rasterised: polygons are checked for length, number types and the
    bounds of the module docstring, RLE for ``size`` and its run lengths.
    """
    if "segmentation" not in ann:
        return (f"has no 'segmentation', but its mask is needed ({_NEEDED}); add its polygons "
                f"[[x1, y1, x2, y2, ...]] or RLE mask")
    segm = ann["segmentation"]
    if isinstance(segm, list) and segm:
        return _polygon_problem(segm, height, width)
    if isinstance(segm, dict) and segm:
        return rle_problem(segm, height, width)
    if not segm:
        return (f"has an empty 'segmentation' ({segm!r}), but its mask is needed ({_NEEDED}); "
                f"add its polygons [[x1, y1, x2, y2, ...]] or RLE mask")
    return (f"has a 'segmentation' of type {type(segm).__name__}; expected a list of polygons "
            f"[[x1, y1, x2, y2, ...], ...] or an RLE dict ({_RLE_FORM})")


def _polygon_problem(polygons: list[Any], height: int, width: int) -> str | None:
    if all(type(v) in _NUMBER_TYPES for v in polygons):
        return ("has a 'segmentation' that is a flat list of numbers; polygons are nested, one list per "
                "polygon: [[x1, y1, x2, y2, ...], ...]")
    work = 0.0
    for k, poly in enumerate(polygons):
        where = f"has a 'segmentation' whose polygon {k}"
        if not isinstance(poly, list):
            return f"{where} is a {type(poly).__name__}, not a list of numbers [x1, y1, x2, y2, ...]"
        if len(poly) < 6:
            return (f"{where} has {len(poly)} number(s); a polygon needs at least 3 points "
                    f"(6 numbers x1, y1, x2, y2, x3, y3)")
        if len(poly) % 2:
            return f"{where} has an odd count of numbers ({len(poly)}); it must list x, y pairs"
        bad = _not_finite(poly)
        if bad is not None:
            return f"{where} holds {_short(bad[0])}, which is not a finite number; coordinates are pixels"
        problem = _outside_problem(poly, height, width)
        if problem is not None:
            return f"{where} {problem}"
        work += _outline_work(poly)
    budget = POLYGON_BUDGET * (height + width)
    if work > budget:
        points = sum(len(p) for p in polygons) // 2
        return (f"has polygons of {points} points whose outline is too long to rasterise for its {height}x{width} "
                f"(HxW) image (points + outline length in pixels: {work:.0f}; at most {POLYGON_BUDGET} x "
                f"(height + width) = {budget}); simplify the polygons or check their coordinates")
    return None


def _not_finite(values: list[Any]) -> tuple[Any] | None:
    """``(value,)`` for the first value that is not a finite number, or ``None`` if all are."""
    if set(map(type, values)) <= _NUMBER_TYPES:
        try:
            if math.isfinite(math.fsum(values)):  # fast and exact: NaN, inf and overflow all show
                return None
        except OverflowError:  # a sum (or an integer) beyond the floats: look value by value
            pass
    return next(((v,) for v in values if not is_finite_number(v)), None)


def _outside_problem(poly: list[float], height: int, width: int) -> str | None:
    """Why a polygon's points lie too far outside a ``height x width`` image, or ``None``."""
    xs, ys = poly[0::2], poly[1::2]
    for values, size, axis in ((xs, width, "x"), (ys, height, "y")):
        low, high = -POLYGON_MARGIN * size, (1 + POLYGON_MARGIN) * size
        worst = min(values) if min(values) < low else max(values)
        if not low <= worst <= high:
            return (f"has the {axis} coordinate {worst:g}, far outside its {height}x{width} (HxW) image; points may "
                    f"lie at most one image {'width' if axis == 'x' else 'height'} outside it ({axis} in "
                    f"{low:g}..{high:g}). Coordinates are pixels of the image the annotation belongs to")
    return None


def _outline_work(poly: list[float]) -> float:
    """Points plus outline length (L-infinity, closing edge included) of one polygon, as rasterised."""
    points = len(poly) // 2
    extent = max(max(poly[0::2]) - min(poly[0::2]), max(poly[1::2]) - min(poly[1::2]))
    if points * (1 + extent) <= 1e4:  # a cheap upper bound settles almost every polygon
        return points * (1 + extent)
    xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    steps = np.abs(xy - np.roll(xy, 1, axis=0)).max(axis=1)
    return float(points + steps.sum())


def rle_problem(rle: Mapping[str, Any], height: int, width: int) -> str | None:
    """What is wrong with an RLE mask ``{"size", "counts"}`` for a ``height x width`` image, or ``None``.

    Phrased to follow the record's name (``"has an RLE 'segmentation' whose ..."``).
    """
    missing = [key for key in ("size", "counts") if key not in rle]
    if missing:
        return f"has an RLE 'segmentation' without {' or '.join(repr(k) for k in missing)}; {_RLE_FORM}"
    size, counts = rle["size"], rle["counts"]
    is_pair = isinstance(size, (list, tuple)) and len(size) == 2 and all(type(v) is int for v in size)
    if not is_pair or list(size) != [height, width]:
        hint = " (it looks like [width, height])" if is_pair and list(size) == [width, height] else ""
        return (f"has an RLE 'segmentation' of size {_short(size)}{hint} but its image is {height}x{width} (HxW); "
                f"'size' must be [height, width] of the image: re-encode the mask at the image's size")
    if isinstance(counts, (str, bytes)):
        problem = compressed_counts_problems([counts], [height * width]).get(0)
        return None if problem is None else (f"has an RLE 'segmentation' whose 'counts' {problem} (its image is "
                                             f"{height}x{width}, HxW); re-encode the mask at the image's size")
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


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def compressed_counts_problems(counts: Sequence[str | bytes], pixels: Sequence[int]) -> dict[int, str]:
    """Which compressed RLE strings do not describe a mask of ``pixels[i]`` pixels, and why.

    Decodes COCO's compressed format (as pycocotools' ``rleFrString`` does) for all strings at
    once, vectorised, without building a mask: every character must be in the RLE alphabet
    (``'0'``..``'o'``), the last number complete, each run length non-negative, and the runs must
    sum to the image's pixel count.

    Args:
        counts: the ``counts`` strings.
        pixels: ``height * width`` of each mask.

    Returns:
        ``{index: problem}`` for the bad strings only, each phrased to follow "``'counts'``".
    """
    encoded = [c.encode("utf-8") if isinstance(c, str) else bytes(c) for c in counts]
    problems: dict[int, str] = {i: "is empty" for i, b in enumerate(encoded) if not b}
    data, owner, ends = _concatenate(encoded)
    bad_at = np.flatnonzero((data < _RLE_FIRST) | (data > _RLE_LAST))
    bad_owner, first = np.unique(owner[bad_at], return_index=True)
    for i, at in zip(bad_owner.tolist(), bad_at[first].tolist()):
        problems.setdefault(i, f"holds a byte outside COCO's RLE alphabet ('0'..'o'), {bytes([data[at]])!r}: "
                               f"it is not a compressed RLE")
    values = data.astype(np.int64) - _RLE_FIRST
    more = (values & 0x20) != 0
    for i in owner[ends[more[ends]]].tolist():
        problems.setdefault(i, "ends in the middle of a run length: the string is cut short")
    keep = [i for i in range(len(encoded)) if i not in problems]
    for chunk in _chunks(keep, [len(encoded[i]) for i in keep]):
        problems.update(_run_problems([encoded[i] for i in chunk], [int(pixels[i]) for i in chunk], chunk))
    return problems


def _chunks(items: list[int], sizes: list[int], budget: int = 1 << 22) -> list[list[int]]:
    """``items`` in consecutive groups of about ``budget`` bytes (bounds the arrays of one decoding pass)."""
    chunks: list[list[int]] = [[]]
    total = 0
    for item, size in zip(items, sizes):
        if total + size > budget and chunks[-1]:
            chunks.append([])
            total = 0
        chunks[-1].append(item)
        total += size
    return [c for c in chunks if c]


def _concatenate(encoded: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bytes of all strings as one uint8 array, each byte's string index, and each string's last byte."""
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    owner = np.repeat(np.arange(len(encoded), dtype=np.int32), lengths)
    ends = (np.cumsum(lengths) - 1)[lengths > 0]
    return data, owner, ends


def _segment_starts(owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each run of equal values of a sorted array starts, and each run's length."""
    if len(owner) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    return starts, np.diff(np.r_[starts, len(owner)])


def _run_problems(encoded: Sequence[bytes], pixels: Sequence[int], index: Sequence[int]) -> dict[int, str]:
    """Problems of well-formed strings (alphabet and complete numbers): run lengths and their sum."""
    data, owner, _ = _concatenate(encoded)
    values = data - np.uint8(_RLE_FIRST)
    last = (values & 0x20) == 0  # the last character of each number
    starts = np.flatnonzero(np.r_[True, last[:-1]])
    widths = np.diff(np.r_[starts, len(values)])
    problems: dict[int, str] = {}
    for i in np.unique(owner[starts[widths > _RLE_MAX_CHARS]]).tolist():
        problems[index[i]] = "holds a run length longer than any mask: it is not a compressed RLE"
    digit = np.arange(len(values)) - np.repeat(starts, widths)
    digit = np.minimum(digit, _RLE_MAX_CHARS - 1)  # those strings are refused; keep the shifts defined
    numbers = np.add.reduceat((values & 0x1F).astype(np.int64) << (5 * digit), starts)
    negative = (values[starts + widths - 1] & 0x10) != 0
    numbers -= negative.astype(np.int64) << (5 * np.minimum(widths, _RLE_MAX_CHARS))
    run_owner = owner[starts]
    runs = _undo_deltas(numbers, run_owner)
    for i in np.unique(run_owner[runs < 0]).tolist():
        problems.setdefault(index[i], "decodes to a negative run length: it is not a compressed RLE of this mask")
    sums = np.add.reduceat(runs, _segment_starts(run_owner)[0])  # every string has runs
    for i in np.flatnonzero(sums != np.asarray(pixels, dtype=np.int64)).tolist():
        problems.setdefault(index[i], f"decodes to run lengths summing to {sums[i]}, but the mask has {pixels[i]} "
                                      f"pixels: it is garbage, or the RLE of a mask of another size")
    return problems


def _undo_deltas(numbers: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Run lengths from the decoded numbers: from the fourth on, each is stored relative to the one two before.

    So run ``p >= 3`` is the sum of the numbers ``p, p - 2, ...`` down to run 1 or 2: a cumulative
    sum over each parity, restarted at every string (run 0 stands alone).
    """
    starts, lengths = _segment_starts(owner)
    position = np.arange(len(numbers)) - np.repeat(starts, lengths)  # index of the run within its string
    odd = (position & 1) == 1
    even = ~odd & (position >= 2)
    odd_sum = np.cumsum(np.where(odd, numbers, 0))
    even_sum = np.cumsum(np.where(even, numbers, 0))
    odd_runs = odd_sum - np.repeat(odd_sum[starts], lengths)  # run 0 adds nothing to either sum
    even_runs = even_sum - np.repeat(even_sum[starts], lengths)
    return np.where(odd, odd_runs, np.where(even, even_runs, numbers))
