"""torchvision's SSD300 (``ssd300_vgg16``) to segkit checkpoints: the ``TorchvisionSSD`` converter of
``segkit convert`` and of ``engine.load_from: torchvision://ssd300_vgg16``.

torchvision's backbone holds the VGG (``backbone.features`` up to conv4_3, ``backbone.extra.0`` from
pool4 to fc7), the L2 scale (``backbone.scale_weight``) and the extra layers (``backbone.extra.1..4``);
segkit splits them into the ``VGG`` backbone and the ``SSDExtraLayers`` neck. Both classifiers have a
background logit first, so the head's tensors are kept as they are and label ``i`` stays label ``i``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from segkit.checkpoint import CheckpointError
from segkit.registry import CONVERTERS
from segkit.weights import ConvertedWeights, WeightConverter
from segkit_plugins.backbones.vgg import VGG_STAGE_CONVS
from segkit_plugins.heads.detector_weights import coco_val_sections
from segkit_plugins.heads.rcnn_weights import detector_class_names
from segkit_plugins.necks.ssd_neck import SSD300_EXTRA_LAYERS

__all__ = ["is_torchvision_ssd", "convert_torchvision_ssd", "ssd300_config", "TorchvisionSSD"]

_SUPPORTED = "segkit converts torchvision's SSD300 with a VGG-16 backbone (ssd300_vgg16)"
_FEATURES = re.compile(r"^backbone\.features\.(\d+)\.(weight|bias)$")
_CONV5 = re.compile(r"^backbone\.extra\.0\.([135])\.(weight|bias)$")
_FC = re.compile(r"^backbone\.extra\.0\.7\.([13])\.(weight|bias)$")
_EXTRA = re.compile(r"^backbone\.extra\.([1-9])\.([02])\.(weight|bias)$")
_HEAD = re.compile(r"^head\.(classification|regression)_head\.module_list\.(\d+)\.(weight|bias)$")
_SCALES = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]
_RATIOS = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]


def is_torchvision_ssd(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether the keys are those of torchvision's SSD with a VGG backbone."""
    return "backbone.scale_weight" in state_dict and any(k.startswith("head.classification_head.module_list.")
                                                          for k in state_dict)


def convert_torchvision_ssd(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Rename a torchvision ``ssd300_vgg16`` state dict for segkit's ``OneStageDetector`` (``VGG`` +
    ``SSDExtraLayers`` + ``SSDHead``) and describe the model.

    Returns:
        ``(state_dict, config)``: the renamed tensors and a complete config (torchvision's architecture
        and test-time settings, COCO 2017 val as ``val`` and ``test``); ``model.head.num_classes`` is
        torchvision's class count minus the background.

    Raises:
        CheckpointError: keys that no rule maps, or another SSD (SSD512's fifth extra layer).

    Example:
        >>> tv = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None)
        >>> state, cfg = convert_torchvision_ssd(tv.state_dict())
        >>> segkit.build_model(cfg).load_state_dict(state)
    """
    extras = sorted({int(m.group(1)) for m in map(_EXTRA.match, state_dict) if m})
    if extras != [1, 2, 3, 4]:
        raise CheckpointError(f"the SSD has extra layers {extras}, SSD300 has 1..4; {_SUPPORTED}.")
    features = sorted({int(m.group(1)) for m in map(_FEATURES.match, state_dict) if m})
    if len(features) != sum(VGG_STAGE_CONVS[16][:4]):
        raise CheckpointError(f"the SSD's VGG has {len(features)} convolutions up to conv4_3, VGG-16 has 10; "
                              f"{_SUPPORTED}.")
    stage_convs = [(s, j) for s, count in enumerate(VGG_STAGE_CONVS[16]) for j in range(count)]
    feature_names = dict(zip(features, stage_convs))
    converted = {}
    for key, value in state_dict.items():
        name = _rename(key, feature_names)
        if name is None:
            raise CheckpointError(f"the torchvision SSD state dict has a key segkit cannot map, '{key}'; {_SUPPORTED}.")
        converted[name] = value
    num_anchors = 2 + 2 * len(_RATIOS[0])
    num_classes = int(state_dict["head.classification_head.module_list.0.weight"].shape[0]) // num_anchors - 1
    return converted, ssd300_config(num_classes)


def _rename(key: str, feature_names: Mapping[int, tuple[int, int]]) -> str | None:
    """The segkit key of a torchvision SSD key, or ``None``."""
    if key == "backbone.scale_weight":
        return "backbone.l2_norm.weight"
    if m := _FEATURES.match(key):
        stage, position = feature_names[int(m.group(1))]
        return f"backbone.stages.{stage}.{2 * position}.{m.group(2)}"
    if m := _CONV5.match(key):  # extra.0 = pool4, conv5_1, ReLU, conv5_2, ReLU, conv5_3, ReLU, fc
        return f"backbone.stages.4.{int(m.group(1)) - 1}.{m.group(2)}"
    if m := _FC.match(key):  # fc = pool5, fc6, ReLU, fc7, ReLU
        return f"backbone.fc{6 if m.group(1) == '1' else 7}.{m.group(2)}"
    if m := _EXTRA.match(key):
        return f"neck.layers.{int(m.group(1)) - 1}.{m.group(2)}.{m.group(3)}"
    if m := _HEAD.match(key):
        branch = "cls_logits" if m.group(1) == "classification" else "bbox_pred"
        return f"head.{branch}.{m.group(2)}.{m.group(3)}"
    return None


def ssd300_config(num_classes: int) -> dict[str, Any]:
    """A complete segkit config of torchvision's ``ssd300_vgg16`` for ``num_classes`` foreground classes
    (its preprocessing, architecture and test-time settings; COCO 2017 val)."""
    model = {
        "type": "OneStageDetector",
        "pixel_mean": [0.48235, 0.45882, 0.40784], "pixel_std": [1.0 / 255.0] * 3,
        "fixed_size": [300, 300], "size_divisor": 1,
        "selection": "per_class", "score_threshold": 0.01, "topk_candidates": 400, "nms_threshold": 0.45,
        "detections_per_image": 200,
        "backbone": {"type": "VGG", "depth": 16, "ssd": True, "out_features": ["conv4", "fc7"],
                     "l2_norm_scale": 20.0, "frozen_stages": 1, "pretrained": None},
        "neck": {"type": "SSDExtraLayers", "in_features": ["conv4", "fc7"],
                 "extra_layers": [list(layer) for layer in SSD300_EXTRA_LAYERS]},
        "head": {"type": "SSDHead", "num_classes": int(num_classes),
                 "in_features": ["conv4", "fc7", "conv8_2", "conv9_2", "conv10_2", "conv11_2"],
                 "aspect_ratios": _RATIOS, "scales": _SCALES, "steps": [8, 16, 32, 64, 100, 300], "clip": True,
                 "iou_threshold": 0.5, "negative_ratio": 3.0, "box_coder_weights": [10.0, 10.0, 5.0, 5.0]},
    }
    return {"model": model, **coco_val_sections(num_classes), "work_dir": "work_dirs/ssd300_vgg16"}


@CONVERTERS.register()
class TorchvisionSSD(WeightConverter):
    """torchvision SSD300 (VGG-16) state dicts to a whole ``OneStageDetector`` checkpoint with its config
    and COCO's class names (:func:`convert_torchvision_ssd`)."""

    source = "torchvision"
    accepts = _SUPPORTED.removeprefix("segkit converts ")

    def matches(self, state_dict: Mapping[str, Tensor]) -> bool:
        return is_torchvision_ssd(state_dict)

    def convert(self, state_dict: Mapping[str, Tensor]) -> ConvertedWeights:
        state, cfg = convert_torchvision_ssd(state_dict)
        classes = cfg["model"]["head"]["num_classes"]
        description = f"ssd300_vgg16: VGG-16 (SSD) + extra layers conv8_2..conv11_2 + SSDHead, {classes} classes"
        return ConvertedWeights(state, "model", cfg, description, detector_class_names(classes),
                                note="COCO from $SEGKIT_COCO, default data/coco")
