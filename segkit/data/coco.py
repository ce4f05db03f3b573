"""COCO instances datasets (``instances_*.json`` + an image folder)."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import albumentations as A
import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segkit.config_types import is_finite_number, is_integer
from segkit.data.coco_masks import mask_problem, to_rle
from segkit.data.images import (
    MAX_IMAGE_PIXELS_ENV,
    check_pixel_count,
    load_image,
    max_image_pixels,
    open_image,
)
from segkit.data.transforms import apply_transforms, build_transforms, follow_torch_seed
from segkit.errors import ConfigError, DatasetError
from segkit.ops.labels import MAX_BOXES_PER_IMAGE, check_box_count
from segkit.registry import DATASETS, check_arguments
from segkit.textio import load_json

__all__ = ["CocoDataset", "DatasetError", "MAX_IMAGE_PIXELS_ENV", "check_ground_truth_masks", "load_image",
           "max_image_pixels", "open_image"]

_REQUIRED_KEYS = ("images", "annotations", "categories")
_SHOW_IDS = 5
_INVALID_MASKS = ("error", "skip")
# Ids are stored as int64 (numpy arrays, tensors, pycocotools' matching); larger ones cannot be.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@DATASETS.register()
class CocoDataset(torch.utils.data.Dataset):
    """Detection and instance segmentation samples from a COCO instances JSON file.

    Category ids (any integers) map to contiguous labels ``1..K`` in the order of the sorted ids,
    unless ``category_ids`` fixes the mapping. Crowd annotations (``iscrowd: 1``) stay in
    :attr:`coco` for evaluation but are not given to the model. Boxes are clipped to the image; a
    box narrower or shorter than ``min_box_size`` after clipping (including one entirely outside
    the image) is dropped, with one warning per dataset.

    Args:
        ann_file: path to the COCO instances JSON.
        img_dir: folder that the images' ``file_name`` entries are relative to.
        transforms: albumentations pipeline as a list of ``{type, **kwargs}`` (or a built
            ``A.Compose`` from :func:`~segkit.data.transforms.build_transforms`).
        skip_empty: drop images without a usable annotation (for training); keep them for evaluation.
        with_masks: add instance masks to the targets (polygons and RLE are decoded). Every
            annotation's ``segmentation`` is then checked when the dataset is built: polygons need
            at least 3 points of finite numbers (an even count, at least 6), an RLE needs ``size``
            equal to ``[height, width]`` of its image and ``counts`` (a compressed string, or run
            lengths summing to ``height * width``). A polygon enclosing no pixel is valid (an empty
            mask).
        min_box_size: minimum width and height, in pixels, of a box given to the model.
        invalid_masks: what to do, with ``with_masks``, about an annotation whose
            ``segmentation`` is missing, empty or malformed: ``"error"`` raises a
            :class:`DatasetError` naming it; ``"skip"`` leaves such annotations out of the training
            targets, with one warning giving their count and first ids. Skipped annotations stay in
            :attr:`coco`, so box evaluation still counts them as objects to detect; a ``"segm"``
            evaluation needs their masks fixed. A file in which no annotation has a segmentation
            is an error either way.
        category_ids: the category id of each label: label ``i`` (``1..K``) is
            ``category_ids[i - 1]``. Ids the file does not define are allowed (their class name is
            ``"N/A"``; a model trained with torchvision's 91-way COCO labels is evaluated with
            ``category_ids: [1, 2, ..., 90]``). An annotation whose category is not listed is an
            error. ``None`` (default): the file's category ids, sorted.

    Attributes:
        coco: the ``pycocotools.coco.COCO`` ground truth, crowd annotations included.
        classes: category names; ``classes[label - 1]`` names ``label``.
        label_to_cat_id / cat_id_to_label: ``{label: category_id}`` and its inverse.
        image_ids: COCO image ids in dataset order.

    ``dataset[i]`` returns ``(image, target)``: ``image`` float32 ``[3, H, W]`` in ``[0, 1]`` after
    the transforms; ``target`` has ``boxes`` (float32 ``[N, 4]``, xyxy pixels of the transformed
    image), ``labels`` (int64 ``[N]``, ``1..K``), ``image_id`` (int), ``orig_size`` (int64 ``[2]``,
    height and width of the image file) and, with ``with_masks``, ``masks`` (uint8 ``[N, H, W]``).

    Raises:
        DatasetError: the annotation file is missing, not JSON, lacks ``images``, ``annotations`` or
            ``categories``, an annotation refers to an unknown category (or one not in
            ``category_ids``) or image, or, with ``with_masks`` and ``invalid_masks="error"``, an
            annotation's mask is missing or malformed.
        ConfigError: ``invalid_masks`` is not ``"error"`` or ``"skip"``, or ``category_ids`` is not
            a list of distinct integers.

    Example:
        >>> ds = CocoDataset(ann_file="data/coco/annotations/instances_val2017.json",
        ...                  img_dir="data/coco/val2017")
        >>> image, target = ds[0]
    """

    def __init__(
        self,
        *,
        ann_file: str,
        img_dir: str,
        transforms: Sequence[Mapping[str, Any]] | A.Compose | None = None,
        skip_empty: bool = False,
        with_masks: bool = False,
        min_box_size: float = 1.0,
        invalid_masks: str = "error",
        category_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if invalid_masks not in _INVALID_MASKS:
            raise ConfigError(f"invalid_masks must be 'error' (stop at the first annotation with a bad mask) or "
                              f"'skip' (train without such annotations), got {invalid_masks!r}.",
                              key="invalid_masks")
        label_cat_ids = None if category_ids is None else _check_category_ids(category_ids)
        self.ann_file = os.fspath(ann_file)
        self.img_dir = os.fspath(img_dir)
        self.skip_empty = bool(skip_empty)
        self.with_masks = bool(with_masks)
        self.min_box_size = float(min_box_size)
        self.invalid_masks = invalid_masks
        if isinstance(transforms, A.Compose):
            self.transforms = transforms
        else:
            self.transforms = build_transforms(transforms, path="transforms")
        self.coco = self._load_coco()
        cat_ids = label_cat_ids if label_cat_ids is not None else sorted(self.coco.cats)
        self.classes = [str(self.coco.cats[c].get("name", c)) if c in self.coco.cats else "N/A" for c in cat_ids]
        self.label_to_cat_id = {label: cat_id for label, cat_id in enumerate(cat_ids, start=1)}
        self.cat_id_to_label = {cat_id: label for label, cat_id in self.label_to_cat_id.items()}
        self._records = self._index_annotations()
        all_ids = list(self.coco.imgs)
        if self.skip_empty:
            all_ids = [i for i in all_ids if len(self._records[i][0]) > 0]
        self.image_ids: list[int] = all_ids
        self._transform_seed: int | None = None

    def _load_coco(self) -> COCO:
        """The ground truth (subclasses that read other formats build it here)."""
        return read_coco(self.ann_file)

    def annotation_source(self, image_id: int) -> str:
        """The file holding the annotations of ``image_id`` (named in error messages)."""
        return self.ann_file

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, path: str = "", **defaults: Any) -> CocoDataset:
        """Build from a config mapping, reporting errors in ``transforms`` under ``path``."""
        kwargs = {**defaults, **cfg}
        check_arguments(cls, kwargs, path=path, type_name=cls.__name__, kind="dataset")
        if not isinstance(kwargs.get("transforms"), A.Compose):
            key = f"{path}.transforms" if path else "transforms"
            kwargs["transforms"] = build_transforms(kwargs.get("transforms"), path=key)
        try:
            return cls(**kwargs)
        except ConfigError as exc:  # the constructor names its own argument; add where it sits
            if path and exc.key and not exc.key.startswith(f"{path}."):
                exc.key = f"{path}.{exc.key}"
            raise

    # ------------------------------------------------------------------ indexing
    def _index_annotations(self) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image id: clipped xyxy boxes float32 [N, 4], labels int64 [N], annotation ids int64 [N]."""
        image_order = {img_id: k for k, img_id in enumerate(self.coco.imgs)}
        image_hw = [_image_hw(self.coco.imgs[i], self.img_dir) for i in self.coco.imgs]
        sizes = np.array(image_hw, dtype=np.float64).reshape(-1, 2)
        annotations = self.coco.dataset["annotations"]
        if self.with_masks:
            self._check_some_segmentation(annotations)
        rows, xywh, labels, ann_ids, bad_masks = [], [], [], [], []
        for ann in annotations:
            self._check_annotation(ann, image_order)
            row = image_order[ann["image_id"]]
            problem = mask_problem(ann, *image_hw[row]) if self.with_masks else None
            if problem is not None:
                bad_masks.append((ann.get("id"), ann["image_id"], problem))
                continue
            if ann.get("iscrowd", 0):
                continue
            rows.append(row)
            xywh.append(ann["bbox"])
            labels.append(self.cat_id_to_label[ann["category_id"]])
            ann_ids.append(ann.get("id"))
        self._report_invalid_masks(bad_masks)
        if 0 in self.coco.anns:
            warnings.warn(
                f"{self.ann_file}: an annotation has id 0. pycocotools never matches a ground truth "
                f"whose id is 0, so COCO evaluation counts it as missed; renumber annotation ids from 1.",
                UserWarning, stacklevel=3,
            )
        rows_a = np.asarray(rows, dtype=np.int64)
        boxes = np.asarray(xywh, dtype=np.float64).reshape(-1, 4).copy()  # float32 would overflow on 1e300
        boxes[:, 2:] += boxes[:, :2]
        hw = sizes[rows_a] if len(rows_a) else np.zeros((0, 2), np.float32)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0.0, hw[:, 1:2])
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0.0, hw[:, 0:1])
        boxes = boxes.astype(np.float32)
        ids_a = np.asarray(ann_ids, dtype=np.int64)
        size_ok = self._big_enough(boxes, ids_a)
        labels_a = np.asarray(labels, dtype=np.int64)
        rows_a, boxes, labels_a, ids_a = rows_a[size_ok], boxes[size_ok], labels_a[size_ok], ids_a[size_ok]
        counts = np.bincount(rows_a, minlength=len(image_order))
        if len(counts) and counts.max() > MAX_BOXES_PER_IMAGE:  # the image with the most, by name
            row = int(counts.argmax())
            try:
                check_box_count(int(counts[row]), f"{self.ann_file}: image_id {list(self.coco.imgs)[row]}")
            except ValueError as exc:
                raise DatasetError(str(exc)) from None
        order = np.argsort(rows_a, kind="stable")
        splits = np.searchsorted(rows_a[order], np.arange(1, len(image_order)))
        groups = zip(np.split(boxes[order], splits), np.split(labels_a[order], splits),
                     np.split(ids_a[order], splits))
        return {img_id: group for img_id, group in zip(self.coco.imgs, groups)}

    def _big_enough(self, boxes: np.ndarray, ann_ids: np.ndarray) -> np.ndarray:
        """bool [N]: xyxy boxes at least ``min_box_size`` wide and high; warns once about the others."""
        size_ok = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= self.min_box_size
        if not size_ok.all():
            dropped = ann_ids[~size_ok]
            warnings.warn(
                f"{self.ann_file}: dropped {len(dropped)} annotation(s) whose box is narrower or shorter "
                f"than min_box_size={self.min_box_size:g} px after clipping to the image, or lies outside "
                f"it (annotation ids {_show_ids(dropped.tolist())}).",
                UserWarning, stacklevel=4,
            )
        return size_ok

    def _check_annotation(self, ann: Mapping[str, Any], image_order: Mapping[int, int]) -> None:
        ann_id = ann.get("id")
        if ann.get("image_id") not in image_order:
            raise DatasetError(f"{self.ann_file}: annotation id {ann_id} refers to image_id "
                               f"{ann.get('image_id')!r}, which is not in 'images'.")
        cat_id = ann.get("category_id")
        if cat_id not in self.coco.cats:
            raise DatasetError(
                f"{self.ann_file}: annotation id {ann_id} has category_id {cat_id!r}, "
                f"which is not in 'categories' (ids {sorted(self.coco.cats)}). Add the category or "
                f"fix the annotation."
            )
        if cat_id not in self.cat_id_to_label:
            raise DatasetError(
                f"{self.ann_file}: annotation id {ann_id} (image id {ann.get('image_id')}) has category_id "
                f"{cat_id!r}, which the dataset's category_ids option does not list "
                f"({_show_ids(list(self.cat_id_to_label), limit=20)}). Add {cat_id!r} to category_ids, or "
                f"leave category_ids out to label the file's categories in sorted order."
            )
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise DatasetError(f"{self.ann_file}: annotation id {ann_id} needs a 'bbox' of four numbers "
                               f"[x, y, width, height], got {bbox!r}.")

    def _check_some_segmentation(self, annotations: Sequence[Mapping[str, Any]]) -> None:
        """One clear error for a box-only file used with masks, instead of one per annotation."""
        if annotations and not any(ann.get("segmentation") for ann in annotations):
            raise DatasetError(
                f"the config asks for masks (with_masks: true) but {self.ann_file} has no 'segmentation' "
                f"in any annotation; use a detection config (with_masks: false) or an instances file "
                f"with masks."
            )

    def _report_invalid_masks(self, bad: Sequence[tuple[Any, Any, str]]) -> None:
        """Raise (``invalid_masks="error"``) or warn once (``"skip"``) about ``(ann id, image id, problem)``."""
        if not bad:
            return
        ann_id, image_id, problem = bad[0]
        first = f"annotation id {ann_id} (image id {image_id}) {problem}"
        if self.invalid_masks == "error":
            others = f" ({len(bad) - 1} more annotation(s) have an invalid mask.)" if len(bad) > 1 else ""
            raise DatasetError(
                f"{self.ann_file}: {first}.{others} Fix the annotation's 'segmentation', or set "
                f"invalid_masks: skip to train without the annotations whose mask is invalid."
            )
        warnings.warn(
            f"{self.ann_file}: {len(bad)} annotation(s) have a missing or invalid mask and are left out of "
            f"the training targets (invalid_masks: skip; annotation ids {_show_ids([b[0] for b in bad])}). "
            f"They stay in the ground truth used for evaluation; fix them before a 'segm' evaluation. "
            f"First problem: {first}.",
            UserWarning, stacklevel=4,
        )

    # ------------------------------------------------------------------ samples
    @property
    def num_classes(self) -> int:
        """Number of foreground classes K."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> str:
        """Path of the image file of sample ``index``."""
        return os.path.join(self.img_dir, self.coco.imgs[self.image_ids[index]]["file_name"])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_path(index)
        image = load_image(path, image_id=image_id)
        height, width = image.shape[:2]
        expected = (info.get("height", height), info.get("width", width))
        if (height, width) != tuple(expected):
            raise DatasetError(
                f"image file '{path}' (image id {image_id}) is {height}x{width} (HxW) but the annotation "
                f"file says {expected[0]}x{expected[1]}; fix 'height'/'width' in {self.annotation_source(image_id)}."
            )
        boxes, labels, ann_ids = self._records[image_id]
        masks = self._decode_masks(ann_ids, height, width) if self.with_masks else None
        self._transform_seed = follow_torch_seed(self.transforms, self._transform_seed)
        image_t, boxes_t, labels_t, masks_t = apply_transforms(
            self.transforms, image=image, boxes=boxes, labels=labels, masks=masks
        )
        target: dict[str, Any] = {
            "boxes": boxes_t,
            "labels": labels_t,
            "image_id": int(image_id),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }
        if masks_t is not None:
            target["masks"] = masks_t
        return image_t, target

    def _decode_masks(self, ann_ids: np.ndarray, height: int, width: int) -> np.ndarray:
        """uint8 [N, H, W] masks of the given annotations (polygons, RLE, compressed or not).

        The annotations were checked by :func:`_mask_problem` when the dataset was built; a
        polygon enclosing no pixel gives an all-zero mask.
        """
        if len(ann_ids) == 0:
            return np.zeros((0, height, width), dtype=np.uint8)
        rles = [to_rle(self.coco.anns[ann_id]["segmentation"], height, width) for ann_id in ann_ids.tolist()]
        try:
            masks = mask_utils.decode(rles)  # [H, W, N]
        except ValueError:  # compressed counts are only checked here: find the culprit, name it
            for ann_id, rle in zip(ann_ids.tolist(), rles):
                try:
                    mask_utils.decode([rle])
                except ValueError as exc:
                    raise DatasetError(
                        f"{self.ann_file}: annotation id {ann_id} (image id {self.coco.anns[ann_id]['image_id']}) "
                        f"has an RLE 'counts' that does not describe a {height}x{width} mask ({exc}); "
                        f"re-encode the mask at the image's size."
                    ) from exc
            raise
        return np.ascontiguousarray(masks.transpose(2, 0, 1), dtype=np.uint8)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(ann_file='{self.ann_file}', images={len(self)}, "
                f"classes={self.classes}, with_masks={self.with_masks})")


def check_ground_truth_masks(coco: COCO, source: str) -> None:
    """Refuse a ground truth whose masks a ``segm`` evaluation cannot rasterise safely.

    pycocotools rasterises every ground-truth mask (crowd regions, and annotations left out of
    training by ``invalid_masks: skip``, included) without checking it; a polygon point at 1e9 ends
    the interpreter. Each mask is checked here as :func:`~segkit.data.coco_masks.mask_problem`
    checks training data.

    Raises:
        DatasetError: an image without ``height``/``width``, or the first annotation with a missing
            or malformed mask, named with ``source`` (the annotation file).
    """
    for info in coco.dataset["images"]:
        if not (is_integer(info.get("height")) and is_integer(info.get("width"))):
            raise DatasetError(f"{source}: image id {info['id']} has no 'height' and 'width'; a 'segm' evaluation "
                               f"needs the size of every image, so add them.")
    for ann in coco.dataset["annotations"]:
        info = coco.imgs.get(ann.get("image_id"))
        if info is None:
            continue  # no image to rasterise it on; pycocotools never reads it
        problem = mask_problem(ann, info["height"], info["width"])
        if problem is not None:
            raise DatasetError(
                f"{source}: annotation id {ann.get('id')} (image id {ann['image_id']}) {problem}. A 'segm' evaluation "
                f"rasterises every ground-truth mask, crowd regions included; fix the mask, or score boxes only."
            )


def _check_category_ids(category_ids: Any) -> list[int]:
    """The ``category_ids`` option as a list of distinct ints; :class:`ConfigError` otherwise."""
    if isinstance(category_ids, (str, bytes, Mapping)) or not isinstance(category_ids, Iterable):
        raise ConfigError(f"category_ids must be a list of integer category ids (label i is category_ids[i-1]), "
                          f"got {category_ids!r}.", key="category_ids")
    values = list(category_ids)
    if not values:
        raise ConfigError("category_ids is empty; list at least one category id, or leave it out to use the "
                          "file's categories.", key="category_ids")
    for k, value in enumerate(values):
        if not is_integer(value):
            raise ConfigError(f"category_ids must hold integers, but entry {k} is {value!r}.", key="category_ids")
    ids = [int(v) for v in values]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise ConfigError(f"category_ids lists {_show_ids(twice)} more than once; each label needs its own "
                          f"category id, so list every id once.", key="category_ids")
    return ids


def _show_ids(ids: Sequence[Any], limit: int = _SHOW_IDS) -> str:
    """``"1, 2, 3"``, or the first ``limit`` ids and how many there are."""
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def _image_hw(info: Mapping[str, Any], img_dir: str) -> tuple[int, int]:
    if "height" in info and "width" in info:
        return int(info["height"]), int(info["width"])
    path = os.path.join(img_dir, str(info.get("file_name", "")))
    which = f"image file '{path}' (image id {info.get('id')}, which has no height/width in the annotation file)"
    with open_image(path, which) as im:
        return im.height, im.width


def read_coco(ann_file: str) -> COCO:
    if not os.path.isfile(ann_file):
        raise DatasetError(f"annotation file '{ann_file}' does not exist. Check the dataset's ann_file path "
                           f"(relative paths are resolved from {os.getcwd()}).")
    data = load_json(ann_file, error=DatasetError, what="annotation file")
    return read_coco_dict(data, ann_file)


def _check_fields(data: Mapping[str, Any], ann_file: str) -> None:
    """Types of the fields segkit and pycocotools read; a :class:`DatasetError` names the first bad one."""
    for image in data["images"]:
        where = f"image id {image['id']} in '{ann_file}'"
        if not isinstance(image.get("file_name"), str) or not image["file_name"]:
            raise DatasetError(f"{where} has file_name {image.get('file_name')!r}; it needs the image's path "
                               f"relative to img_dir.")
        if "\0" in image["file_name"]:
            raise DatasetError(f"{where} has file_name {image['file_name']!r}, which holds a NUL character; no file "
                               f"name can hold one, so fix the name.")
        for side in ("height", "width"):
            if side in image and not (is_integer(image[side]) and image[side] > 0):
                raise DatasetError(f"{where} has {side} {image[side]!r}; it must be a positive integer "
                                   f"(or left out, to be read from the image file).")
        if "height" in image and "width" in image:  # bounds every mask allocated at this size
            check_pixel_count(where, image["height"], image["width"])
    for ann in data["annotations"]:
        where = f"annotation id {ann['id']} in '{ann_file}'"
        for key in ("image_id", "category_id"):
            if not is_integer(ann.get(key)):
                raise DatasetError(f"{where} has {key} {ann.get(key)!r}; it must be an integer id.")
        if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
            raise DatasetError(f"{where} has iscrowd {ann['iscrowd']!r}; it must be 0 or 1.")
        bbox = ann.get("bbox")
        if bbox is not None and not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
                                     and all(is_finite_number(v) for v in bbox)):
            raise DatasetError(f"{where} has bbox {bbox!r}; it must be four finite numbers [x, y, width, height].")
        if "area" in ann and not (is_finite_number(ann["area"]) and ann["area"] >= 0):
            raise DatasetError(f"{where} has area {ann['area']!r}; it must be a non-negative number.")


def read_coco_dict(data: Any, ann_file: str) -> COCO:
    """A pycocotools ``COCO`` of an instances dict, checked; ``ann_file`` names it in errors."""
    if not isinstance(data, dict):
        raise DatasetError(f"annotation file '{ann_file}' must hold a JSON object with 'images', "
                           f"'annotations' and 'categories', got a {type(data).__name__}.")
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise DatasetError(f"annotation file '{ann_file}' is not a COCO instances file: it has no "
                           f"{', '.join(repr(k) for k in missing)} key(s).")
    for key in _REQUIRED_KEYS:
        if not isinstance(data[key], list):
            raise DatasetError(f"'{key}' in '{ann_file}' must be a list, got {type(data[key]).__name__}.")
    for key in _REQUIRED_KEYS:
        ids = [item.get("id") if isinstance(item, dict) else None for item in data[key]]
        if None in ids:
            raise DatasetError(f"entry {ids.index(None)} of '{key}' in '{ann_file}' is not an object with an 'id'.")
        bad = next((k for k, i in enumerate(ids) if not is_integer(i)), None)
        if bad is not None:
            raise DatasetError(f"entry {bad} of '{key}' in '{ann_file}' has the id {ids[bad]!r}; ids are integers.")
        bad = next((k for k, i in enumerate(ids) if not _INT64_MIN <= i <= _INT64_MAX), None)
        if bad is not None:
            raise DatasetError(f"entry {bad} of '{key}' in '{ann_file}' has the id {ids[bad]}, beyond the 64-bit "
                               f"integers that ids are stored in (at most {_INT64_MAX}); renumber the ids.")
        if len(set(ids)) != len(ids):
            seen: set[Any] = set()
            twice = next(i for i in ids if i in seen or seen.add(i))
            raise DatasetError(f"'{key}' in '{ann_file}' uses the id {twice!r} more than once; ids must be unique.")
    _check_fields(data, ann_file)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco
