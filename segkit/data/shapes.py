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
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import albumentations as A
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from segkit.data.coco import CocoDataset, DatasetError
from segkit.data.shapes_render import GENERATOR_VERSION, SHAPE_CATEGORIES, render_image
from segkit.errors import ConfigError, did_you_mean
from segkit.fileio import FileWriteError, why_not_writable
from segkit.registry import DATASETS

__all__ = ["Shapes", "generate_shapes", "prepare_shapes", "render_image", "SHAPE_CATEGORIES"]

_DEFAULT_NUM_IMAGES = {"train": 2000, "val": 300}


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
    source = "the dataset's root" if root else ("$SEGKIT_DATA" if os.environ.get("SEGKIT_DATA") else "the default")
    root = os.path.expanduser(root or os.environ.get("SEGKIT_DATA") or "~/.cache/segkit")
    params["categories"] = _check_categories(params.get("categories"))
    key = json.dumps({"version": GENERATOR_VERSION, **params}, sort_keys=True)
    final = os.path.join(root, "shapes", hashlib.sha256(key.encode("utf-8")).hexdigest()[:12])
    ann_file = os.path.join(final, "annotations", f"instances_{params['split']}.json")
    if os.path.isfile(ann_file):
        return final
    try:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=os.path.dirname(final))
    except OSError as exc:
        raise _cache_error(root, source, exc) from exc
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
    except OSError as exc:  # a disk that fills up while the images are written
        raise _cache_error(root, source, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left when another process finished first
    return final


def _cache_error(root: str, source: str, exc: OSError) -> FileWriteError:
    """Why the Shapes data cannot be generated under ``root`` (taken from ``source``), with the fix."""
    reason, _ = why_not_writable(exc, os.path.join(root, "shapes"))
    return FileWriteError(
        f"cannot generate the Shapes data under '{root}' ({source} cache folder): {reason}. The data is generated "
        f"once, then only read: set SEGKIT_DATA (or `root:` of the dataset in the config) to a folder you can "
        f"write to, with a few MB free.", path=root, errno=exc.errno)


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
