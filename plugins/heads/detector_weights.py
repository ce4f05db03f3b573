"""What the converters of torchvision's ResNet-FPN detectors share (``rcnn_weights``, ``retinanet_weights``,
``fcos_weights``): the backbone and FPN key names, refusing keys no rule maps, reading the ResNet-FPN
architecture, layer indices and norms from the keys, BatchNorm batch counters, the body of torchvision's
builder names, a one-stage detector's model section, and the COCO 2017 val sections of a converted
model's config."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from segkit.checkpoint import CheckpointError
from segkit_plugins.backbones.resnet_weights import infer_resnet_arch

__all__ = ["COCO_ROOT", "DETECTOR_PREFIXES", "rename_backbone_fpn_key", "refuse_unmapped_keys", "resnet_fpn_arch",
           "norm_of", "layer_indices", "fix_batch_counters", "resnet_body_name", "one_stage_model",
           "coco_val_sections"]

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


def rename_by_rules(key: str, rules: Sequence[tuple[re.Pattern[str], str]]) -> str | None:
    """``key`` renamed by the first ``(pattern, replacement)`` rule whose pattern matches it, or ``None``."""
    for regex, replacement in rules:
        match = regex.match(key)
        if match:
            return match.expand(replacement)
    return None


def rename_backbone_fpn_key(key: str) -> str | None:
    """The segkit name (``ResNet`` backbone, ``FPN`` neck) of a torchvision ``backbone.body.*`` /
    ``backbone.fpn.*`` key, or ``None`` for another key."""
    return rename_by_rules(key, _BACKBONE_FPN_RULES)


def refuse_unmapped_keys(state: Mapping[str, Tensor], head_keys: Sequence[re.Pattern[str]], what: str,
                         supported: str) -> None:
    """Raise :class:`CheckpointError` naming the keys that are neither backbone / FPN keys nor matched
    by one of ``head_keys``; ``what`` names the detector (``"torchvision FCOS"``), ``supported`` says
    what converts."""
    refuse_unknown_keys([key for key in state
                         if rename_backbone_fpn_key(key) is None and not any(p.match(key) for p in head_keys)],
                        what, supported)


def refuse_unknown_keys(unknown: Sequence[str], what: str, supported: str) -> None:
    """Raise :class:`CheckpointError` naming the first of the ``unknown`` keys of the ``what`` state dict
    (nothing when there are none)."""
    if unknown:
        raise CheckpointError(f"the {what} state dict has {len(unknown)} key(s) that segkit cannot map, "
                              f"e.g. {', '.join(unknown[:3])}; {supported}.")


def resnet_fpn_arch(state: Mapping[str, Tensor], required: Sequence[str], what: str, supported: str) -> dict[str, Any]:
    """The ResNet body and the three-input FPN (with P6/P7) of a torchvision one-stage detector's state.

    Returns:
        ``{"backbone": ResNet options, "fpn_channels", "fpn_norm", "extra_from"}``.

    Raises:
        CheckpointError: a key prefix of ``required`` is absent, the body is no ResNet, or the FPN does
            not take c3..c5 (``what`` names the detector, ``supported`` says what converts).
    """
    absent = [p for p in required if not any(k.startswith(p) for k in state)]
    if absent:
        found = sorted({".".join(k.split(".")[:2]) for k in state})
        raise CheckpointError(f"the state dict looks like a {what} but has no '{absent[0]}*' keys "
                              f"(found {', '.join(found[:8])}); {supported}.")
    body = {k[len("backbone.body."):]: v for k, v in state.items() if k.startswith("backbone.body.")}
    try:
        backbone = infer_resnet_arch(body)
    except CheckpointError as exc:
        raise CheckpointError(f"the detector's backbone is not a ResNet: {exc}") from None
    if layer_indices(state, r"^backbone\.fpn\.inner_blocks\.(\d+)\.") != [0, 1, 2]:
        raise CheckpointError(f"the {what}'s FPN does not have three inputs; {supported}, whose FPN uses c3..c5.")
    fpn = state.get("backbone.fpn.inner_blocks.0.0.weight", state.get("backbone.fpn.inner_blocks.0.weight"))
    channels = int(fpn.shape[0])
    p6 = state.get("backbone.fpn.extra_blocks.p6.weight")
    return {"backbone": backbone, "fpn_channels": channels, "fpn_norm": norm_of(state, "backbone.fpn.inner_blocks.0.1."),
            "extra_from": "output" if p6 is None or int(p6.shape[1]) == channels else "input"}


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


def one_stage_model(arch: Mapping[str, Any], backbone_norm: str, head: Mapping[str, Any],
                    **test_settings: Any) -> dict[str, Any]:
    """The ``model`` section of a converted torchvision one-stage detector: ImageNet pixel statistics,
    800 / 1333 resizing, the ResNet of ``arch`` (:func:`resnet_fpn_arch`) with ``backbone_norm``, its
    FPN P3-P7, ``head``, and ``test_settings`` (score threshold, NMS, ...)."""
    return {
        "type": "OneStageDetector",
        "pixel_mean": [0.485, 0.456, 0.406], "pixel_std": [0.229, 0.224, 0.225],
        "min_size": 800, "max_size": 1333, "size_divisor": 32, **test_settings,
        "backbone": {"type": "ResNet", **arch["backbone"], "out_indices": [1, 2, 3], "frozen_stages": 1,
                     "norm": backbone_norm, "pretrained": None},
        "neck": {"type": "FPN", "in_features": ["c3", "c4", "c5"], "out_channels": arch["fpn_channels"],
                 "extra_block": "p6p7", "extra_from": arch["extra_from"], "norm": arch["fpn_norm"]},
        "head": dict(head),
    }


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
