"""COCO instances datasets (``instances_*.json`` + an image folder)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segkit.data.transforms import apply_transforms, build_transforms, follow_torch_seed
from segkit.errors import ConfigError, UserError
from segkit.registry import DATASETS, check_arguments

__all__ = ["CocoDataset", "DatasetError", "load_image"]

_REQUIRED_KEYS = ("images", "annotations", "categories")
_SHOW_IDS = 5


class DatasetError(UserError):
    """A dataset's files are missing or malformed."""


def load_image(path: str, *, image_id: int | None = None) -> np.ndarray:
    """Read an image file as a uint8 ``[H, W, 3]`` RGB array.

    Raises:
        DatasetError: the file does not exist or cannot be decoded; the message names the path and
            the image id.
    """
    which = f"image file '{path}'" + (f" (image id {image_id})" if image_id is not None else "")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError as exc:
        raise DatasetError(f"{which} does not exist. Check the dataset's img_dir and the file_name in the "
                           f"annotation file.") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"cannot decode {which}: {exc}. The file is corrupt or not an image; "
                           f"replace it or remove the image from the annotation file.") from exc


@DATASETS.register()
class CocoDataset(torch.utils.data.Dataset):
    """Detection and instance segmentation samples from a COCO instances JSON file.

    Category ids (any integers) map to contiguous labels ``1..K`` in the order of the sorted ids.
    Crowd annotations (``iscrowd: 1``) stay in :attr:`coco` for evaluation but are not given to the
    model. Boxes are clipped to the image; a box narrower or shorter than ``min_box_size`` after
    clipping (including one entirely outside the image) is dropped, with one warning per dataset.

    Args:
        ann_file: path to the COCO instances JSON.
        img_dir: folder that the images' ``file_name`` entries are relative to.
        transforms: albumentations pipeline as a list of ``{type, **kwargs}`` (or a built
            ``A.Compose`` from :func:`~segkit.data.transforms.build_transforms`).
        skip_empty: drop images without a usable annotation (for training); keep them for evaluation.
        with_masks: add instance masks to the targets (polygons and RLE are decoded).
        min_box_size: minimum width and height, in pixels, of a box given to the model.

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
            ``categories``, or an annotation refers to an unknown category or image.

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
    ) -> None:
        super().__init__()
        self.ann_file = os.fspath(ann_file)
        self.img_dir = os.fspath(img_dir)
        self.skip_empty = bool(skip_empty)
        self.with_masks = bool(with_masks)
        self.min_box_size = float(min_box_size)
        if isinstance(transforms, A.Compose):
            self.transforms = transforms
        else:
            self.transforms = build_transforms(transforms, path="transforms")
        self.coco = _read_coco(self.ann_file)
        cat_ids = sorted(self.coco.cats)
        self.classes = [str(self.coco.cats[c].get("name", c)) for c in cat_ids]
        self.label_to_cat_id = {label: cat_id for label, cat_id in enumerate(cat_ids, start=1)}
        self.cat_id_to_label = {cat_id: label for label, cat_id in self.label_to_cat_id.items()}
        self._records = self._index_annotations()
        all_ids = list(self.coco.imgs)
        if self.skip_empty:
            all_ids = [i for i in all_ids if len(self._records[i][0]) > 0]
        self.image_ids: list[int] = all_ids
        self._warned_no_segmentation = False
        self._transform_seed: int | None = None

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
        sizes = np.array([_image_hw(self.coco.imgs[i], self.img_dir) for i in self.coco.imgs],
                         dtype=np.float32).reshape(-1, 2)
        rows, xywh, labels, ann_ids = [], [], [], []
        for ann in self.coco.dataset["annotations"]:
            ann_id = ann.get("id")
            self._check_annotation(ann, image_order)
            if ann.get("iscrowd", 0):
                continue
            rows.append(image_order[ann["image_id"]])
            xywh.append(ann["bbox"])
            labels.append(self.cat_id_to_label[ann["category_id"]])
            ann_ids.append(ann_id)
        if 0 in self.coco.anns:
            warnings.warn(
                f"{self.ann_file}: an annotation has id 0. pycocotools never matches a ground truth "
                f"whose id is 0, so COCO evaluation counts it as missed; renumber annotation ids from 1.",
                UserWarning, stacklevel=3,
            )
        rows_a = np.asarray(rows, dtype=np.int64)
        boxes = np.asarray(xywh, dtype=np.float32).reshape(-1, 4).copy()
        boxes[:, 2:] += boxes[:, :2]
        hw = sizes[rows_a] if len(rows_a) else np.zeros((0, 2), np.float32)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0.0, hw[:, 1:2])
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0.0, hw[:, 0:1])
        size_ok = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= self.min_box_size
        ids_a = np.asarray(ann_ids, dtype=np.int64)
        if not size_ok.all():
            dropped = ids_a[~size_ok]
            shown = ", ".join(str(int(i)) for i in dropped[:_SHOW_IDS])
            warnings.warn(
                f"{self.ann_file}: dropped {len(dropped)} annotation(s) whose box is narrower or shorter "
                f"than min_box_size={self.min_box_size:g} px after clipping to the image, or lies outside "
                f"it (annotation ids {shown}{', ...' if len(dropped) > _SHOW_IDS else ''}).",
                UserWarning, stacklevel=3,
            )
        labels_a = np.asarray(labels, dtype=np.int64)
        rows_a, boxes, labels_a, ids_a = rows_a[size_ok], boxes[size_ok], labels_a[size_ok], ids_a[size_ok]
        order = np.argsort(rows_a, kind="stable")
        splits = np.searchsorted(rows_a[order], np.arange(1, len(image_order)))
        groups = zip(np.split(boxes[order], splits), np.split(labels_a[order], splits),
                     np.split(ids_a[order], splits))
        return {img_id: group for img_id, group in zip(self.coco.imgs, groups)}

    def _check_annotation(self, ann: Mapping[str, Any], image_order: Mapping[int, int]) -> None:
        ann_id = ann.get("id")
        if ann.get("image_id") not in image_order:
            raise DatasetError(f"{self.ann_file}: annotation id {ann_id} refers to image_id "
                               f"{ann.get('image_id')!r}, which is not in 'images'.")
        if ann.get("category_id") not in self.cat_id_to_label:
            raise DatasetError(
                f"{self.ann_file}: annotation id {ann_id} has category_id {ann.get('category_id')!r}, "
                f"which is not in 'categories' (ids {sorted(self.cat_id_to_label)}). Add the category or "
                f"fix the annotation."
            )
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise DatasetError(f"{self.ann_file}: annotation id {ann_id} needs a 'bbox' of four numbers "
                               f"[x, y, width, height], got {bbox!r}.")

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
                f"file says {expected[0]}x{expected[1]}; fix 'height'/'width' in {self.ann_file}."
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
        """uint8 [N, H, W] masks of the given annotations (polygons, RLE, compressed or not)."""
        if len(ann_ids) == 0:
            return np.zeros((0, height, width), dtype=np.uint8)
        rles = []
        for ann_id in ann_ids.tolist():
            ann = self.coco.anns[ann_id]
            segm = ann.get("segmentation")
            if segm:
                rle = _to_rle(segm, height, width)
            else:
                if not self._warned_no_segmentation:
                    self._warned_no_segmentation = True
                    warnings.warn(f"{self.ann_file}: annotation id {ann_id} has no segmentation; "
                                  f"using its box as the mask (further such annotations are not reported).",
                                  UserWarning, stacklevel=3)
                x, y, w, h = (float(v) for v in ann["bbox"])
                rle = mask_utils.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]], height, width)[0]
            rles.append(rle)
        masks = mask_utils.decode(rles)  # [H, W, N]
        return np.ascontiguousarray(masks.transpose(2, 0, 1), dtype=np.uint8)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(ann_file='{self.ann_file}', images={len(self)}, "
                f"classes={self.classes}, with_masks={self.with_masks})")


def _to_rle(segm: Any, height: int, width: int) -> dict[str, Any]:
    if isinstance(segm, list):  # polygons
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(segm, height, width)
    return segm


def _image_hw(info: Mapping[str, Any], img_dir: str) -> tuple[int, int]:
    if "height" in info and "width" in info:
        return int(info["height"]), int(info["width"])
    path = os.path.join(img_dir, str(info.get("file_name", "")))
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"image id {info.get('id')} has no height/width in the annotation file and its "
                           f"file '{path}' cannot be read: {exc}") from exc


def _read_coco(ann_file: str) -> COCO:
    if not os.path.isfile(ann_file):
        raise DatasetError(f"annotation file '{ann_file}' does not exist. Check the dataset's ann_file path "
                           f"(relative paths are resolved from {os.getcwd()}).")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"annotation file '{ann_file}' is not valid JSON: {exc}") from exc
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
        if len(set(ids)) != len(ids):
            seen: set[Any] = set()
            twice = next(i for i in ids if i in seen or seen.add(i))
            raise DatasetError(f"'{key}' in '{ann_file}' uses the id {twice!r} more than once; ids must be unique.")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco
