"""``Shapes``: a synthetic instance segmentation dataset generated from a seed, cached on disk.

Each image shows 2-7 (by default) filled circles, squares and triangles of random colours (the
colour says nothing about the class) on a textured background (gradients, stripes, checkerboards,
blotchy noise) with clutter that is not annotated (thin lines, specks, partial arcs). Later shapes
occlude earlier ones; masks, boxes and areas describe the visible pixels only, and a shape is only
placed if every shape keeps at least half of its area visible, so no drawn shape goes unannotated.
Shapes are 16-60 px across on a 128 px image (scaled with the image size); one in ten is drawn in
a colour close to what lies underneath.

On-disk layout, one folder per parameter set (``<root>/shapes/<hash of the parameters>/``)::

    images/<split>/000001.png              RGB images, ids from 1
    labels/<split>/000001.png              uint8 label map: 0 background, 1..K the front-most shape
    annotations/instances_<split>.json     COCO instances: RLE masks, bbox = tight visible box
    params.json                            the generation parameters
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from segkit.data.coco import CocoDataset, DatasetError
from segkit.errors import ConfigError, did_you_mean
from segkit.registry import DATASETS

__all__ = ["Shapes", "generate_shapes", "prepare_shapes", "render_image", "SHAPE_CATEGORIES"]

SHAPE_CATEGORIES = ("circle", "square", "triangle")
# Bump when the drawing changes, so that caches of the previous version are not reused.
GENERATOR_VERSION = 2
_DEFAULT_NUM_IMAGES = {"train": 2000, "val": 300}
_MIN_VISIBLE = 0.5  # fraction of a shape's area that must stay visible
_MAX_TRIES = 25  # placement attempts per shape


# ---------------------------------------------------------------------- drawing primitives
def _window(cx: float, cy: float, radius: float, size: int) -> tuple[slice, slice]:
    x0, x1 = max(int(cx - radius) - 1, 0), min(int(cx + radius) + 2, size)
    y0, y1 = max(int(cy - radius) - 1, 0), min(int(cy + radius) + 2, size)
    return slice(y0, max(y1, y0)), slice(x0, max(x1, x0))


def _grid(win: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (float32) of a window, as broadcastable column and row."""
    ys = np.arange(win[0].start, win[0].stop, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(win[1].start, win[1].stop, dtype=np.float32)[None, :] + 0.5
    return xs, ys


def _polygon_sd(vertices: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Signed distance (positive inside) to a convex polygon, exact along the edges."""
    v = vertices if _signed_area(vertices) > 0 else vertices[::-1]
    sd = None
    for (x0, y0), (x1, y1) in zip(v.tolist(), v[[*range(1, len(v)), 0]].tolist()):
        length = math.hypot(x1 - x0, y1 - y0)
        d = ((x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0)) / length
        sd = d if sd is None else np.minimum(sd, d)
    return sd


def _signed_area(v: np.ndarray) -> float:
    x, y = v[:, 0], v[:, 1]
    return 0.5 * float(np.dot(x, y[[*range(1, len(y)), 0]]) - np.dot(y, x[[*range(1, len(x)), 0]]))


def _sample_shape(rng: np.random.Generator, category: str, size: int) -> tuple[tuple[slice, slice], np.ndarray, float]:
    """A random shape: its window, signed distance inside it and its full (unclipped) area."""
    scale = size / 128.0
    d = rng.uniform(16.0, 60.0) * scale
    margin = 0.06 * size
    cx, cy = rng.uniform(margin, size - margin, 2)
    if category == "circle":
        r = d / 2
        win = _window(cx, cy, r, size)
        xs, ys = _grid(win)
        return win, r - np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2), math.pi * r * r
    if category == "square":
        half = d * 0.42
        angle = rng.uniform(0, math.pi / 2) + np.arange(4) * math.pi / 2
        radius = half * math.sqrt(2)
        corners = np.stack([cx + radius * np.cos(angle + math.pi / 4), cy + radius * np.sin(angle + math.pi / 4)], 1)
    else:  # triangle: arcs of at least 50 degrees between vertices keep every angle >= 25 degrees
        radius = d * 0.56
        arcs = np.deg2rad(50 + 210 * rng.dirichlet((2.0, 2.0, 2.0)))
        angle = rng.uniform(0, 2 * math.pi) + np.concatenate([[0.0], np.cumsum(arcs[:2])])
        r = radius * rng.uniform(0.85, 1.0, 3)
        corners = np.stack([cx + r * np.cos(angle), cy + r * np.sin(angle)], 1)
    win = _window(cx, cy, radius, size)
    xs, ys = _grid(win)
    return win, _polygon_sd(corners, xs, ys), abs(_signed_area(corners))


def _paint(canvas: np.ndarray, win: tuple[slice, slice], sd: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-blend ``colour`` (float32 [3] or [h, w, 3]) where ``sd > -0.5`` (anti-aliased edge)."""
    alpha = np.clip(sd + 0.5, 0.0, 1.0)[..., None]
    canvas[win] = canvas[win] * (1.0 - alpha) + colour * alpha


# ---------------------------------------------------------------------- backgrounds and clutter
def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    c1 = rng.uniform(0, 255, 3)
    direction = rng.normal(size=3)
    c2 = c1 + direction / np.linalg.norm(direction) * rng.uniform(15, 110)
    return c1.astype(np.float32), np.clip(c2, 0, 255).astype(np.float32)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """One background layer, float32 [S, S, 3] in [0, 255]."""
    xs, ys = _grid((slice(0, size), slice(0, size)))
    theta = rng.uniform(0, math.pi)
    proj = xs * math.cos(theta) + ys * math.sin(theta)
    kind = rng.integers(4)
    if kind == 0:  # smooth gradient
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    elif kind == 1:  # stripes, soft or hard
        period = rng.uniform(5, 24) * size / 128
        t = 0.5 + 0.5 * np.sin(2 * math.pi * proj / period)
        if rng.random() < 0.5:
            t = (t > 0.5).astype(np.float32)
    elif kind == 2:  # checkerboard, possibly rotated
        cell = rng.uniform(5, 22) * size / 128
        other = -xs * math.sin(theta) + ys * math.cos(theta)
        t = ((np.floor(proj / cell) + np.floor(other / cell)) % 2).astype(np.float32)
    else:  # low-frequency blotches
        cells = int(rng.integers(3, 10))
        coarse = (rng.random((cells, cells)) * 255).astype(np.uint8)
        t = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32) / 255
    c1, c2 = _two_colours(rng)
    return c1 + np.asarray(t, np.float32)[..., None] * (c2 - c1)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    canvas = _texture(rng, size)
    if rng.random() < 0.5:
        alpha = rng.uniform(0.2, 0.6)
        canvas = (1 - alpha) * canvas + alpha * _texture(rng, size)
    return canvas


def _draw_clutter(rng: np.random.Generator, canvas: np.ndarray) -> None:
    """Unannotated distractors: thin lines, small specks, partial arcs (open rings)."""
    size = canvas.shape[0]
    scale = size / 128
    for _ in range(int(rng.integers(1, 9))):
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        kind = rng.integers(3)
        cx, cy = rng.uniform(0, size, 2)
        if kind == 0:  # thin line through (cx, cy)
            half = rng.uniform(0.1, 0.5) * size
            theta = rng.uniform(0, math.pi)
            dx, dy = math.cos(theta) * half, math.sin(theta) * half
            win = _window(cx, cy, half + 2, size)
            xs, ys = _grid(win)
            t = np.clip(((xs - cx + dx) * dx + (ys - cy + dy) * dy) / (2 * half * half), 0, 1)
            dist = np.hypot(xs - (cx - dx + 2 * t * dx), ys - (cy - dy + 2 * t * dy))
            sd = rng.uniform(0.4, 1.0) * scale - dist
        elif kind == 1:  # speck
            r = rng.uniform(1.0, 3.0) * scale
            win = _window(cx, cy, r, size)
            xs, ys = _grid(win)
            sd = r - np.hypot(xs - cx, ys - cy)
        else:  # arc of a ring, 60-240 degrees
            r = rng.uniform(6, 26) * scale
            win = _window(cx, cy, r + 3, size)
            xs, ys = _grid(win)
            start, span = rng.uniform(0, 2 * math.pi), np.deg2rad(rng.uniform(60, 240))
            on_arc = (np.arctan2(ys - cy, xs - cx) - start) % (2 * math.pi) < span
            sd = np.where(on_arc, rng.uniform(0.5, 1.3) * scale - np.abs(np.hypot(xs - cx, ys - cy) - r), -1.0)
        _paint(canvas, win, sd, colour)


# ---------------------------------------------------------------------- one image
def render_image(rng: np.random.Generator, *, image_size: int, categories: Sequence[str], min_objects: int = 2,
                 max_objects: int = 7) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Draw one image.

    Returns:
        ``(image, owner, labels)``: uint8 ``[S, S, 3]`` RGB; int16 ``[S, S]`` index of the front-most
        shape at each pixel (``-1`` background); the label ``1..K`` of each shape, in drawing order.
    """
    size = image_size
    canvas = _background(rng, size)
    _draw_clutter(rng, canvas)
    owner = np.full((size, size), -1, dtype=np.int16)
    visible: list[int] = []  # per placed shape: visible pixels, full area, window, label
    areas: list[float] = []
    windows: list[tuple[slice, slice]] = []
    labels: list[int] = []
    min_side = max(4.0, 0.05 * size)
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        label = int(rng.integers(len(categories))) + 1
        for _try in range(_MAX_TRIES):
            win, sd, area = _sample_shape(rng, categories[label - 1], size)
            inside = sd > 0
            if inside.sum() < _MIN_VISIBLE * area or min(_extent(inside)) < min_side:
                continue
            if _occludes_too_much(owner, win, inside, visible, areas, windows, min_side):
                continue
            hidden = owner[win][inside]
            for j, lost in enumerate(np.bincount(hidden[hidden >= 0], minlength=len(visible))):
                visible[j] -= int(lost)
            owner[win][inside] = len(visible)
            visible.append(int(inside.sum()))
            areas.append(area)
            windows.append(win)
            labels.append(label)
            _paint(canvas, win, sd, _object_colour(rng, canvas, win, sd))
            break
    canvas += rng.normal(0, rng.uniform(2, 8), canvas.shape).astype(np.float32)
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), owner, labels


def _extent(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return 0, 0
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def _occludes_too_much(owner: np.ndarray, win: tuple[slice, slice], inside: np.ndarray, visible: list[int],
                       areas: list[float], windows: list[tuple[slice, slice]], min_side: float) -> bool:
    """Whether drawing ``inside`` on top would leave an earlier shape too hidden or too small."""
    hidden = owner[win][inside]
    hidden = hidden[hidden >= 0]
    if hidden.size == 0:
        return False
    covered = np.zeros(owner.shape, dtype=bool)
    covered[win] = inside
    for j in np.unique(hidden).tolist():
        lost = int((hidden == j).sum())
        if visible[j] - lost < _MIN_VISIBLE * areas[j]:
            return True
        if min(_extent((owner[windows[j]] == j) & ~covered[windows[j]])) < min_side:
            return True
    return False


def _object_colour(rng: np.random.Generator, canvas: np.ndarray, win: tuple[slice, slice], sd: np.ndarray) -> np.ndarray:
    """A random colour with a soft shading gradient; sometimes close to what lies underneath."""
    if rng.random() < 0.1:  # low contrast with the local background
        under = canvas[win][sd > 0].mean(0)
        direction = rng.normal(size=3)
        base = under + direction / np.linalg.norm(direction) * rng.uniform(40, 70)
    else:
        base = rng.uniform(0, 255, 3)
    xs, ys = _grid(win)
    theta = rng.uniform(0, 2 * math.pi)
    ramp = (xs * math.cos(theta) + ys * math.sin(theta)) / canvas.shape[0]
    shade = (ramp - ramp.mean()) * rng.uniform(0, 120)
    return np.clip(base.astype(np.float32) + shade[..., None], 0, 255).astype(np.float32)


# ---------------------------------------------------------------------- a split on disk
def generate_shapes(
    out_dir: str,
    *,
    split: str,
    num_images: int,
    image_size: int = 128,
    seed: int = 0,
    categories: Sequence[str] = SHAPE_CATEGORIES,
    min_objects: int = 2,
    max_objects: int = 7,
    progress: bool = True,
) -> str:
    """Write one split of the dataset into ``out_dir`` (see the module docstring for the layout).

    Every image is drawn from its own random stream, derived from ``seed``, the split's name and the
    image's index, so the same arguments give byte-identical files and two splits never share an
    image. Category ids follow the order of ``categories`` (``1..K``).

    Args:
        out_dir: folder to write ``images/``, ``labels/`` and ``annotations/`` into.
        split: split name (``"train"``, ``"val"``, ...), also part of the random stream.
        num_images: number of images; ids are ``1..num_images``.
        image_size: side of the square images in pixels; shape sizes scale with it.
        seed: non-negative integer.
        categories: subset of :data:`SHAPE_CATEGORIES`, in category-id order.
        min_objects / max_objects: range of the number of shapes drawn per image (inclusive).
        progress: show a tqdm progress bar.

    Returns:
        The path of the COCO annotation file written.
    """
    categories = _check_categories(categories)
    img_dir, lbl_dir, ann_dir = (os.path.join(out_dir, d) for d in (f"images/{split}", f"labels/{split}", "annotations"))
    for d in (img_dir, lbl_dir, ann_dir):
        os.makedirs(d, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    stream = zlib.crc32(split.encode("utf-8"))

    def draw(index: int) -> tuple[np.ndarray, list[int]]:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, index)))
        image, owner, labels = render_image(rng, image_size=image_size, categories=categories,
                                            min_objects=min_objects, max_objects=max_objects)
        name = f"{index + 1:06d}.png"
        Image.fromarray(image).save(os.path.join(img_dir, name), compress_level=1)
        label_map = np.asarray([0, *labels], dtype=np.uint8)[owner.astype(np.int64) + 1]
        Image.fromarray(label_map).save(os.path.join(lbl_dir, name), compress_level=1)
        return owner, labels

    # Threads overlap PNG encoding and file writes (which release the GIL) with drawing.
    pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    try:
        drawn = pool.map(draw, range(num_images))
        for image_id, (owner, labels) in enumerate(tqdm(drawn, total=num_images, unit="img", disable=not progress,
                                                        desc=f"Generating Shapes '{split}'"), start=1):
            images.append({"id": image_id, "file_name": f"{image_id:06d}.png", "height": image_size,
                           "width": image_size})
            for k, label in enumerate(labels):
                annotations.append(_annotation(owner == k, ann_id=len(annotations) + 1, image_id=image_id,
                                               label=label))
    finally:  # on an error or Ctrl-C, do not draw the images still queued
        pool.shutdown(wait=True, cancel_futures=True)
    data = {
        "info": {"description": "segkit synthetic Shapes", "version": str(GENERATOR_VERSION),
                 "split": split, "seed": seed, "image_size": image_size},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(categories)],
    }
    ann_file = os.path.join(ann_dir, f"instances_{split}.json")
    with open(ann_file, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
    return ann_file


def _annotation(mask: np.ndarray, *, ann_id: int, image_id: int, label: int) -> dict[str, Any]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    x, y = int(cols[0]), int(rows[0])
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": label,
        "segmentation": {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")},
        "area": int(mask.sum()),
        "bbox": [x, y, int(cols[-1]) + 1 - x, int(rows[-1]) + 1 - y],
        "iscrowd": 0,
    }


def _check_categories(categories: Sequence[str] | None) -> list[str]:
    if categories is None:
        return list(SHAPE_CATEGORIES)
    if isinstance(categories, str) or not isinstance(categories, Sequence) or not categories:
        raise ConfigError(f"categories must be a non-empty list drawn from {list(SHAPE_CATEGORIES)}, got {categories!r}",
                          key="categories")
    for name in categories:
        if name not in SHAPE_CATEGORIES:
            raise ConfigError(f"unknown shape category {name!r}; choose from {list(SHAPE_CATEGORIES)}."
                              + did_you_mean(str(name), SHAPE_CATEGORIES), key="categories")
    if len(set(categories)) != len(categories):
        raise ConfigError(f"categories lists a shape twice: {list(categories)}", key="categories")
    return [str(c) for c in categories]


def prepare_shapes(*, root: str | None = None, progress: bool = True, **params: Any) -> str:
    """Return the cache folder for ``params`` (the arguments of :func:`generate_shapes`), generating it if needed.

    The folder is ``<root>/shapes/<hash of params>``; ``root`` defaults to ``$SEGKIT_DATA`` or
    ``~/.cache/segkit``. Generation happens in a temporary sibling folder that is renamed into place
    when complete, so an interrupted run never leaves a folder that looks complete, and concurrent
    processes (DDP ranks) may all call this: the first rename wins and the others discard their copy.
    """
    root = os.path.expanduser(root or os.environ.get("SEGKIT_DATA") or "~/.cache/segkit")
    params["categories"] = _check_categories(params.get("categories"))
    key = json.dumps({"version": GENERATOR_VERSION, **params}, sort_keys=True)
    final = os.path.join(root, "shapes", hashlib.sha256(key.encode("utf-8")).hexdigest()[:12])
    ann_file = os.path.join(final, "annotations", f"instances_{params['split']}.json")
    if os.path.isfile(ann_file):
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=os.path.dirname(final))
    try:
        generate_shapes(tmp, progress=progress, **params)
        with open(os.path.join(tmp, "params.json"), "w", encoding="utf-8") as f:
            json.dump({"version": GENERATOR_VERSION, **params}, f, indent=2, sort_keys=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isfile(ann_file):
                raise DatasetError(f"cannot move the generated Shapes data into '{final}', which exists but "
                                   f"is incomplete; delete that folder and retry.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left when another process finished first
    return final


@DATASETS.register()
class Shapes(CocoDataset):
    """Synthetic circles, squares and triangles; generated on first use, then read like COCO.

    Args:
        split: split name; each split has its own random stream, so splits never share images.
        num_images: number of images (default 2000 for ``train``, 300 otherwise).
        image_size: side of the square images in pixels (shape sizes scale with it).
        seed: non-negative integer; the same arguments give identical files.
        root: cache root (default ``$SEGKIT_DATA`` or ``~/.cache/segkit``); data goes to
            ``<root>/shapes/<hash of the generation arguments>/``.
        categories: subset of ``["circle", "square", "triangle"]``; its order gives the ids ``1..K``.
        min_objects / max_objects: range of shapes per image (fewer when no placement is found).
        transforms, with_masks, min_box_size: as in :class:`~segkit.data.coco.CocoDataset`.
        skip_empty: drop images without shapes; default ``True`` for ``train``, ``False`` otherwise.
        progress: show a progress bar while generating.

    Attributes:
        root: the cache folder holding this split; ``label_dir``: its semantic label maps.

    Example:
        >>> ds = Shapes(split="val", num_images=50, with_masks=True)
        >>> image, target = ds[0]  # float32 [3, 128, 128]; target["masks"] uint8 [N, 128, 128]
    """

    def __init__(
        self,
        *,
        split: str = "train",
        num_images: int | None = None,
        image_size: int = 128,
        seed: int = 0,
        root: str | None = None,
        categories: Sequence[str] | None = None,
        min_objects: int = 2,
        max_objects: int = 7,
        transforms: Sequence[Mapping[str, Any]] | A.Compose | None = None,
        skip_empty: bool | None = None,
        with_masks: bool = False,
        min_box_size: float = 1.0,
        progress: bool = True,
    ) -> None:
        if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", split):
            raise ConfigError(f"split must be a name of letters, digits, '_' or '-', got {split!r}", key="split")
        if num_images is None:
            num_images = _DEFAULT_NUM_IMAGES.get(split, 300)
        _check_int(num_images, "num_images", 1)
        _check_int(image_size, "image_size", 32)
        _check_int(seed, "seed", 0)
        _check_int(min_objects, "min_objects", 0)
        _check_int(max_objects, "max_objects", max(min_objects, 1))
        self.split = split
        self.root = prepare_shapes(root=root, progress=progress, split=split, num_images=int(num_images),
                                   image_size=int(image_size), seed=int(seed), categories=categories,
                                   min_objects=int(min_objects), max_objects=int(max_objects))
        self.label_dir = os.path.join(self.root, "labels", split)
        super().__init__(
            ann_file=os.path.join(self.root, "annotations", f"instances_{split}.json"),
            img_dir=os.path.join(self.root, "images", split),
            transforms=transforms,
            skip_empty=(split == "train") if skip_empty is None else skip_empty,
            with_masks=with_masks,
            min_box_size=min_box_size,
        )

    def label_path(self, index: int) -> str:
        """Path of the semantic label map (uint8 PNG, 0 = background) of sample ``index``."""
        return os.path.join(self.label_dir, self.coco.imgs[self.image_ids[index]]["file_name"])


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}", key=name)
