"""Datasets, transforms and batching.

``dataset[i]`` returns ``(image, target)``: a float32 ``[3, H, W]`` image in ``[0, 1]`` and a dict
with ``boxes`` (float32 ``[N, 4]`` xyxy pixels), ``labels`` (int64 ``[N]``, ``1..K``), ``image_id``,
``orig_size`` and, where requested, ``masks`` (uint8 ``[N, H, W]``). Batch samples with
:func:`collate`.

The datasets and transforms are imported on first access, so importing ``segkit.data`` does not
load albumentations or pycocotools.
"""

from __future__ import annotations

import importlib
from typing import Any

# Eager: the name equals its submodule's, and must stay bound to the function.
from segkit.data.collate import collate

_EXPORTS = {
    "CocoDataset": "segkit.data.coco",
    "DatasetError": "segkit.data.coco",
    "load_image": "segkit.data.coco",
    "Shapes": "segkit.data.shapes",
    "SHAPE_CATEGORIES": "segkit.data.shapes",
    "generate_shapes": "segkit.data.shapes",
    "prepare_shapes": "segkit.data.shapes",
    "build_transforms": "segkit.data.transforms",
    "apply_transforms": "segkit.data.transforms",
    "SemSegFolder": "segkit.data.semseg",
    "default_palette": "segkit.data.semseg",
    "VOCSegmentation": "segkit.data.semseg_formats",
    "PascalContext": "segkit.data.semseg_formats",
    "ADE20K": "segkit.data.semseg_formats",
    "Cityscapes": "segkit.data.semseg_formats",
    "ShapesSegmentation": "segkit.data.semseg_formats",
    "VOCDetection": "segkit.data.voc",
    "VOC_DETECTION_CLASSES": "segkit.data.voc",
    "voc_to_coco": "segkit.data.voc",
    "coco_to_voc": "segkit.data.voc",
    "build_seg_transforms": "segkit.data.transforms",
    "apply_seg_transforms": "segkit.data.transforms",
}

__all__ = [*_EXPORTS, "collate"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'segkit.data' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
