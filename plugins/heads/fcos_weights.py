"""torchvision's FCOS (``fcos_resnet50_fpn``) to segkit checkpoints: the ``TorchvisionFCOS`` converter of
``segkit convert`` and of ``engine.load_from: torchvision://fcos_resnet50_fpn``.

torchvision's towers are ``Sequential(conv, GroupNorm, ReLU, conv, ...)`` (conv ``3i``, norm ``3i + 1``);
segkit's are one ``Sequential(conv, norm, ReLU)`` per layer. The backbone's norm is read from the state
dict: the COCO weights were trained with FrozenBN (no batch counters), a model built without weights has
BatchNorm. As for RetinaNet, torchvision's classifier has a sigmoid for label 0, the background, which
is never a target; segkit's has one per foreground class, so that map is dropped and label ``i`` stays
label ``i``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from segkit.checkpoint import CheckpointError
from segkit.registry import CONVERTERS
from segkit.weights import ConvertedWeights, WeightConverter
from segkit_plugins.heads.detector_weights import (
    DETECTOR_PREFIXES,
    coco_val_sections,
    fix_batch_counters,
    layer_indices,
    one_stage_model,
    refuse_unmapped_keys,
    rename_backbone_fpn_key,
    resnet_body_name,
    resnet_fpn_arch,
)
from segkit_plugins.heads.rcnn_weights import detector_class_names

__all__ = ["is_torchvision_fcos", "convert_torchvision_fcos", "TorchvisionFCOS"]

_CENTERNESS = "head.regression_head.bbox_ctrness."
_REQUIRED = ("backbone.body.", "backbone.fpn.inner_blocks.", "backbone.fpn.extra_blocks.p6.",
             "backbone.fpn.extra_blocks.p7.", "head.classification_head.cls_logits.", "head.regression_head.bbox_reg.",
             _CENTERNESS)
_SUPPORTED = "segkit converts torchvision's FCOS with a ResNet-FPN backbone (fcos_resnet50_fpn)"
_TOWER = re.compile(r"^head\.(classification|regression)_head\.conv\.(\d+)\.(weight|bias)$")
_PREDICTOR = re.compile(r"^head\.(?:classification_head\.(cls_logits)|regression_head\.(bbox_reg|bbox_ctrness))\."
                        r"(weight|bias)$")
_PREDICTOR_NAMES = {"cls_logits": "cls_logits", "bbox_reg": "bbox_pred", "bbox_ctrness": "centerness"}


def is_torchvision_fcos(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether the keys are those of a torchvision FCOS on a ResNet-FPN (``backbone.body.*`` and the
    centre-ness predictor ``head.regression_head.bbox_ctrness.*``)."""
    return (any(key.startswith(DETECTOR_PREFIXES) for key in state_dict)
            and any(key.startswith(_CENTERNESS) for key in state_dict))


def convert_torchvision_fcos(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Rename a torchvision FCOS state dict for segkit's ``OneStageDetector`` + ``FCOSHead`` and describe
    the model.

    Returns:
        ``(state_dict, config)``: the renamed tensors (the classifier's background map dropped), and a
        complete config (torchvision's architecture and test-time settings, COCO 2017 val as ``val``
        and ``test``); ``model.head.num_classes`` is torchvision's class count minus the background.

    Raises:
        CheckpointError: keys of another detector or that no rule maps (naming them).

    Example:
        >>> tv = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None)
        >>> state, cfg = convert_torchvision_fcos(tv.state_dict())
        >>> segkit.build_model(cfg).load_state_dict(state)
    """
    refuse_unmapped_keys(state_dict, (_TOWER, _PREDICTOR), "torchvision FCOS", _SUPPORTED)
    arch = _arch(state_dict)
    converted = dict(_rename(key, value, arch) for key, value in state_dict.items())
    fix_batch_counters(converted, frozen_backbone=arch["backbone_norm"] == "FrozenBN")
    return converted, _config(arch)


def _arch(state: Mapping[str, Tensor]) -> dict[str, Any]:
    arch = resnet_fpn_arch(state, _REQUIRED, "torchvision FCOS", _SUPPORTED)
    if int(state["head.regression_head.bbox_reg.weight"].shape[0]) != 4:
        raise CheckpointError("the FCOS predicts more than one box per location; segkit's FCOSHead has one point "
                              "per location, as torchvision's default.")
    towers = layer_indices(state, r"^head\.classification_head\.conv\.(\d+)\.weight$")
    convs = [i for i in towers if i % 3 == 0]
    norms = [i for i in towers if i % 3 == 1]
    if convs != list(range(0, 3 * len(convs), 3)) or norms not in ([], [i + 1 for i in convs]) \
            or len(convs) + len(norms) != len(towers):
        raise CheckpointError(f"the FCOS head's towers have layers {towers}; {_SUPPORTED}, whose towers repeat "
                              "(conv, GroupNorm, ReLU).")
    backbone_counters = any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in state)
    return {
        **arch, "num_classes": int(state["head.classification_head.cls_logits.weight"].shape[0]) - 1,
        "num_convs": len(convs), "head_norm": "GN" if norms else None,
        "backbone_norm": "BN" if backbone_counters else "FrozenBN",
    }


def _rename(key: str, value: Tensor, arch: Mapping[str, Any]) -> tuple[str, Tensor]:
    """The segkit key and tensor of a torchvision key that a rule maps."""
    renamed = rename_backbone_fpn_key(key)
    if renamed is not None:
        return renamed, value
    tower = _TOWER.match(key)
    if tower:
        branch, index, name = tower.groups()
        layer, part = divmod(int(index), 3)
        return f"head.{'cls' if branch == 'classification' else 'bbox'}_convs.{layer}.{part}.{name}", value
    predictor = _PREDICTOR.match(key)
    cls_logits, regression, name = predictor.groups()
    if cls_logits:  # [K + 1, ...] -> [K, ...]: the background map dropped
        return f"head.cls_logits.{name}", value[1:].clone()
    return f"head.{_PREDICTOR_NAMES[regression]}.{name}", value


def _config(arch: Mapping[str, Any]) -> dict[str, Any]:
    """A complete segkit config of the FCOS ``arch`` describes, with torchvision's settings."""
    num_classes = int(arch["num_classes"])
    head = {
        "type": "FCOSHead", "num_classes": num_classes, "in_features": ["p3", "p4", "p5", "p6", "p7"],
        "level_sizes": [8, 16, 32, 64, 128], "center_sampling_radius": 1.5,
        "num_convs": int(arch["num_convs"]), "norm": arch["head_norm"],
    }
    model = one_stage_model(arch, arch["backbone_norm"], head, score_threshold=0.2, topk_candidates=1000,
                            nms_threshold=0.6, detections_per_image=100)
    name = f"fcos_{resnet_body_name(arch['backbone'])}_fpn"
    return {"model": model, **coco_val_sections(num_classes), "work_dir": f"work_dirs/{name}"}


@CONVERTERS.register()
class TorchvisionFCOS(WeightConverter):
    """torchvision FCOS (ResNet-FPN) state dicts to a whole ``OneStageDetector`` checkpoint with its config
    and COCO's class names (:func:`convert_torchvision_fcos`)."""

    source = "torchvision"
    accepts = _SUPPORTED.removeprefix("segkit converts ")

    def matches(self, state_dict: Mapping[str, Tensor]) -> bool:
        return is_torchvision_fcos(state_dict)

    def convert(self, state_dict: Mapping[str, Tensor]) -> ConvertedWeights:
        state, cfg = convert_torchvision_fcos(state_dict)
        model = cfg["model"]
        description = (f"{cfg['work_dir'].rsplit('/', 1)[-1]}: ResNet-{model['backbone']['depth']} "
                       f"({model['backbone']['norm']}) + FPN P3-P7 + FCOSHead "
                       f"({model['head'].get('norm') or 'no norm'}), {model['head']['num_classes']} classes")
        return ConvertedWeights(state, "model", cfg, description, detector_class_names(model["head"]["num_classes"]),
                                note="COCO from $SEGKIT_COCO, default data/coco")
