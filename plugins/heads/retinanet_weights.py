"""torchvision's RetinaNet (``retinanet_resnet50_fpn`` and ``_v2``) to segkit checkpoints: the
``TorchvisionRetinaNet`` converter of ``segkit convert`` and of ``engine.load_from:
torchvision://retinanet_resnet50_fpn``.

The variant is read from the state dict: v1 has a FrozenBN backbone, P6 computed from P5 and an L1 box
loss; v2 (the recipe of "Bridging the Gap Between Anchor-based and Anchor-free Detection") a
BatchNorm backbone, P6 from C5, GroupNorm in the head towers and a GIoU box loss.

torchvision's classifier has a sigmoid for every label including 0, the background, which is never a
target (so trained weights never score it); segkit's has one per foreground class, so that map is
dropped and label ``i`` stays label ``i``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from segkit.checkpoint import CheckpointError
from segkit.ops import octave_anchor_sizes
from segkit.registry import CONVERTERS
from segkit.weights import ConvertedWeights, WeightConverter
from segkit_plugins.heads.detector_weights import (
    DETECTOR_PREFIXES,
    coco_val_sections,
    fix_batch_counters,
    layer_indices,
    norm_of,
    one_stage_model,
    refuse_unmapped_keys,
    rename_backbone_fpn_key,
    resnet_body_name,
    resnet_fpn_arch,
)
from segkit_plugins.heads.rcnn_weights import detector_class_names

__all__ = ["is_torchvision_retinanet", "convert_torchvision_retinanet", "TorchvisionRetinaNet"]

_HEAD = "head.classification_head."
_FCOS_CENTERNESS = "head.regression_head.bbox_ctrness."
_REQUIRED = ("backbone.body.", "backbone.fpn.inner_blocks.", "backbone.fpn.extra_blocks.p6.",
             "head.classification_head.cls_logits.", "head.regression_head.bbox_reg.")
_SUPPORTED = ("segkit converts torchvision's RetinaNet with a ResNet-FPN backbone "
              "(retinanet_resnet50_fpn[_v2])")
# New spelling ``conv.<i>.<0 conv | 1 norm>.*``; torchvision < 0.13 wrote ``conv.<2i>.*`` (conv, ReLU, ...).
_TOWER = re.compile(r"^head\.(classification|regression)_head\.conv\.(\d+)\.(?:([01])\.)?(weight|bias|running_\w+|"
                    r"num_batches_tracked)$")
_PREDICTOR = re.compile(r"^head\.(?:classification_head\.cls_logits|regression_head\.bbox_reg)\.(weight|bias)$")


def is_torchvision_retinanet(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether the keys are those of a torchvision one-stage detector on a ResNet-FPN (``backbone.body.*``
    and ``head.classification_head.*``) other than FCOS (whose centre-ness predictor
    ``fcos_weights`` converts)."""
    return (any(key.startswith(DETECTOR_PREFIXES) for key in state_dict)
            and any(key.startswith(_HEAD) for key in state_dict)
            and not any(key.startswith(_FCOS_CENTERNESS) for key in state_dict))


def convert_torchvision_retinanet(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Rename a torchvision RetinaNet state dict for segkit's ``OneStageDetector`` + ``RetinaNetHead``
    and describe the model.

    Returns:
        ``(state_dict, config)``: the renamed tensors (the classifier's background map dropped), and a
        complete config (torchvision's architecture and test-time settings, COCO 2017 val as ``val``
        and ``test``); ``model.head.num_classes`` is torchvision's class count minus the background.

    Raises:
        CheckpointError: keys of another detector or that no rule maps (naming them).

    Example:
        >>> tv = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None)
        >>> state, cfg = convert_torchvision_retinanet(tv.state_dict())
        >>> segkit.build_model(cfg).load_state_dict(state)
    """
    refuse_unmapped_keys(state_dict, (_TOWER, _PREDICTOR), "torchvision detector", _SUPPORTED)
    arch = _arch(state_dict)
    converted = dict(_rename(key, value, arch) for key, value in state_dict.items())
    fix_batch_counters(converted, frozen_backbone=not arch["v2"])
    return converted, _config(arch)


def _arch(state: Mapping[str, Tensor]) -> dict[str, Any]:
    arch = resnet_fpn_arch(state, _REQUIRED, "torchvision one-stage detector", _SUPPORTED)
    anchors = int(state["head.regression_head.bbox_reg.weight"].shape[0]) // 4
    if anchors != 9:
        raise CheckpointError(f"the RetinaNet predicts {anchors} anchors per location; only torchvision's default "
                              "anchors (3 sizes x 3 aspect ratios per level) are supported.")
    towers = layer_indices(state, r"^head\.classification_head\.conv\.(\d+)\.")
    old_spelling = not any(re.match(r"^head\.classification_head\.conv\.\d+\.0\.weight$", k) for k in state)
    norm = norm_of(state, "head.classification_head.conv.0.1.")
    return {
        **arch, "num_classes": int(state["head.classification_head.cls_logits.weight"].shape[0]) // anchors - 1,
        "num_anchors": anchors, "num_convs": len(towers), "old_spelling": old_spelling, "head_norm": norm,
        "v2": norm is not None,
    }


def _rename(key: str, value: Tensor, arch: Mapping[str, Any]) -> tuple[str, Tensor]:
    """The segkit key and tensor of a torchvision key that a rule maps."""
    renamed = rename_backbone_fpn_key(key)
    if renamed is not None:
        return renamed, value
    tower = _TOWER.match(key)
    if tower:
        branch, index, part, name = tower.groups()
        index = int(index) // 2 if arch["old_spelling"] else int(index)
        return f"head.{'cls' if branch == 'classification' else 'bbox'}_convs.{index}.{part or 0}.{name}", value
    predictor = _PREDICTOR.match(key)
    if "cls_logits" in key:  # [A * (K + 1), ...] -> [A * K, ...]: the background map of each anchor dropped
        per_anchor = value.reshape(arch["num_anchors"], arch["num_classes"] + 1, *value.shape[1:])
        return f"head.cls_logits.{predictor.group(1)}", per_anchor[:, 1:].reshape(-1, *value.shape[1:]).clone()
    return f"head.bbox_pred.{predictor.group(1)}", value


def _config(arch: Mapping[str, Any]) -> dict[str, Any]:
    """A complete segkit config of the RetinaNet ``arch`` describes, with torchvision's settings."""
    num_classes = int(arch["num_classes"])
    head = {
        "type": "RetinaNetHead", "num_classes": num_classes, "in_features": ["p3", "p4", "p5", "p6", "p7"],
        "anchor_sizes": [list(s) for s in octave_anchor_sizes()], "aspect_ratios": [0.5, 1.0, 2.0],
        "num_convs": int(arch["num_convs"]), "norm": arch["head_norm"], "box_loss": "giou" if arch["v2"] else "l1",
    }
    model = one_stage_model(arch, "BN" if arch["v2"] else "FrozenBN", head, score_threshold=0.05,
                            topk_candidates=1000, nms_threshold=0.5, detections_per_image=300)
    name = f"retinanet_{resnet_body_name(arch['backbone'])}_fpn{'_v2' if arch['v2'] else ''}"
    return {"model": model, **coco_val_sections(num_classes), "work_dir": f"work_dirs/{name}"}


@CONVERTERS.register()
class TorchvisionRetinaNet(WeightConverter):
    """torchvision RetinaNet (ResNet-FPN, v1 and v2) state dicts to a whole ``OneStageDetector`` checkpoint
    with its config and COCO's class names (:func:`convert_torchvision_retinanet`)."""

    source = "torchvision"
    accepts = _SUPPORTED.removeprefix("segkit converts ")

    def matches(self, state_dict: Mapping[str, Tensor]) -> bool:
        return is_torchvision_retinanet(state_dict)

    def convert(self, state_dict: Mapping[str, Tensor]) -> ConvertedWeights:
        state, cfg = convert_torchvision_retinanet(state_dict)
        model = cfg["model"]
        description = (f"{cfg['work_dir'].rsplit('/', 1)[-1]}: ResNet-{model['backbone']['depth']} "
                       f"({model['backbone']['norm']}) + FPN P3-P7 (P6 from {'C5' if model['neck']['extra_from'] == 'input' else 'P5'}) "
                       f"+ RetinaNetHead ({model['head'].get('norm') or 'no norm'}, {model['head']['box_loss']} box loss), "
                       f"{model['head']['num_classes']} classes")
        return ConvertedWeights(state, "model", cfg, description, detector_class_names(model["head"]["num_classes"]),
                                note="COCO from $SEGKIT_COCO, default data/coco")
