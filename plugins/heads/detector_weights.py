"""What the converters of torchvision's ResNet-FPN detectors share (``rcnn_weights``, ``retinanet_weights``):
the backbone and FPN key names, reading layer indices and norms from the keys, BatchNorm batch counters,
the body of torchvision's builder names, and the COCO 2017 val sections of a converted model's config."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["COCO_ROOT", "DETECTOR_PREFIXES", "rename_backbone_fpn_key", "norm_of", "layer_indices",
           "fix_batch_counters", "resnet_body_name", "coco_val_sections"]

#: Where the configs of converted detectors look for COCO (``$SEGKIT_COCO``, default ``data/coco``).
COCO_ROOT = "${env:SEGKIT_COCO,data/coco}"
#: Key prefixes of every torchvision detector with a ResNet-FPN backbone.
DETECTOR_PREFIXES = ("backbone.body.", "backbone.fpn.")

# (pattern, replacement); the first match wins. Old torchvision checkpoints lack the ``.0`` of the
# Conv2dNormActivation wrappers, so both spellings are accepted.
_BACKBONE_FPN_RULES = tuple((re.compile(pattern), replacement) for pattern, replacement in (
    (r"^backbone\.body\.(.+)$", r"backbone.\1"),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(weight|bias)$", r"neck.lateral_convs.\1.0.\2"),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.([01]\..+)$", r"neck.lateral_convs.\1.\2"),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(weight|bias)$", r"neck.output_convs.\1.0.\2"),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.([01]\..+)$", r"neck.output_convs.\1.\2"),
    (r"^backbone\.fpn\.extra_blocks\.p6\.(weight|bias)$", r"neck.extra_convs.0.\1"),
    (r"^backbone\.fpn\.extra_blocks\.p7\.(weight|bias)$", r"neck.extra_convs.1.\1"),
))


def rename_backbone_fpn_key(key: str) -> str | None:
    """The segkit name (``ResNet`` backbone, ``FPN`` neck) of a torchvision ``backbone.body.*`` /
    ``backbone.fpn.*`` key, or ``None`` for another key."""
    for regex, replacement in _BACKBONE_FPN_RULES:
        match = regex.match(key)
        if match:
            return match.expand(replacement)
    return None


def norm_of(state: Mapping[str, Tensor], prefix: str) -> str | None:
    """``"BN"`` / ``"GN"`` / ``None`` for the norm stored under ``prefix`` (``....1.``)."""
    if prefix + "running_mean" in state:
        return "BN"
    return "GN" if prefix + "weight" in state else None


def layer_indices(state: Mapping[str, Tensor], pattern: str) -> list[int]:
    """The sorted distinct integers of group 1 of ``pattern`` over the keys of ``state``."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for m in map(regex.match, state) if m})


def fix_batch_counters(state: dict[str, Tensor], *, frozen_backbone: bool) -> None:
    """Match ``num_batches_tracked`` to the segkit modules: FrozenBN (backbone of v1) has none; a
    BatchNorm from a checkpoint saved without it (torchvision's FrozenBN-era files) gets a zero."""
    for key in [k for k in state if k.endswith(".num_batches_tracked")]:
        if frozen_backbone and key.startswith("backbone."):
            del state[key]
    for key in [k for k in state if k.endswith(".running_mean")]:
        if frozen_backbone and key.startswith("backbone."):
            continue
        counter = key[: -len("running_mean")] + "num_batches_tracked"
        state.setdefault(counter, torch.tensor(0, dtype=torch.long))


def resnet_body_name(backbone: Mapping[str, Any]) -> str:
    """``resnet50`` / ``resnext101_32x8d``: the backbone part of torchvision's builder names."""
    if backbone["groups"] == 1 and backbone["width_per_group"] == 64:
        return f"resnet{backbone['depth']}"
    return f"resnext{backbone['depth']}_{backbone['groups']}x{backbone['width_per_group']}d"


def coco_val_sections(num_classes: int, *, masks: bool = False) -> dict[str, Any]:
    """The ``data`` and ``evaluation`` sections of a converted COCO detector: COCO 2017 val as ``val``
    and ``test``, torchvision's labels (label ``i`` is COCO category id ``i``, hence ``category_ids:
    [1, ..., K]``), box (and mask) AP."""
    split: dict[str, Any] = {
        "type": "CocoDataset", "ann_file": f"{COCO_ROOT}/annotations/instances_val2017.json",
        "img_dir": f"{COCO_ROOT}/val2017", "skip_empty": False, "category_ids": list(range(1, num_classes + 1)),
    }
    if masks:
        split["with_masks"] = True
    return {
        "data": {"batch_size": 2, "num_workers": 2, "val": split, "test": copy.deepcopy(split)},
        "evaluation": {"type": "CocoEvaluator", "iou_types": ["bbox", "segm"] if masks else ["bbox"],
                       "main_metric": "segm/AP" if masks else "bbox/AP"},
    }
