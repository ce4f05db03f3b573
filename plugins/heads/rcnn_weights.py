"""Whole torchvision detectors (Faster / Mask R-CNN, ResNet-FPN, v1 and v2) to segkit checkpoints:
the ``TorchvisionRCNN`` converter of ``segkit convert``.

torchvision's ``fasterrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn`` ("v1") and their ``_v2``
variants (the recipe of Li et al., "Benchmarking Detection Transfer Learning with Vision
Transformers": BatchNorm in the FPN, two RPN convs, a 4conv1fc box head and BatchNorm in the mask
head) are recognised from the keys and shapes of their state dicts alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from segkit.checkpoint import CheckpointError
from segkit.registry import CONVERTERS
from segkit.weights import ConvertedWeights, WeightConverter
from segkit_plugins.backbones.resnet_weights import infer_resnet_arch
from segkit_plugins.heads.detector_weights import (
    DETECTOR_PREFIXES,
    coco_val_sections,
    fix_batch_counters,
    layer_indices,
    norm_of,
    rename_backbone_fpn_key,
    resnet_body_name,
)

__all__ = ["convert_torchvision_faster_rcnn", "is_torchvision_detector", "convert_torchvision_detector", "detector_class_names",
           "describe_detector_config", "TorchvisionRCNN"]

_DETECTOR_PREFIXES = (*DETECTOR_PREFIXES, "rpn.head.", "roi_heads.")
_REQUIRED = ("backbone.body.", "backbone.fpn.inner_blocks.", "rpn.head.cls_logits.", "roi_heads.box_head.",
             "roi_heads.box_predictor.cls_score.")
_SUPPORTED = ("segkit converts torchvision's Faster / Mask R-CNN with a ResNet-FPN backbone "
              "(fasterrcnn_resnet50_fpn[_v2], maskrcnn_resnet50_fpn[_v2])")


# (pattern, replacement) applied in order; the first match wins. Old torchvision checkpoints lack
# the ``.0`` of the Conv2dNormActivation wrappers, so both spellings are accepted.
_FASTER_RCNN_RULES = (
    (r"^backbone\.body\.", "backbone."),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?(weight|bias)$", r"neck.lateral_convs.\1.0.\2"),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?(weight|bias)$", r"neck.output_convs.\1.0.\2"),
    (r"^rpn\.head\.conv\.(?:0\.0\.)?(weight|bias)$", r"rpn.conv.\1"),
    (r"^rpn\.head\.cls_logits\.", "rpn.objectness_logits."),
    (r"^rpn\.head\.bbox_pred\.", "rpn.anchor_deltas."),
    (r"^roi_heads\.box_head\.", "roi_heads.box_head."),
    (r"^roi_heads\.box_predictor\.", "roi_heads."),
)


def convert_torchvision_faster_rcnn(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision ``fasterrcnn_resnet*_fpn`` state dict for :class:`TwoStageDetector`
    with a ``ResNet`` backbone, ``FPN`` neck, ``RPN`` and ``StandardRoIHead`` with ``TwoFCHead``.

    Keys that match no rule are returned unchanged, so ``load_state_dict`` reports them.

    Example:
        >>> tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
        >>> model.load_state_dict(convert_torchvision_faster_rcnn(tv.state_dict()))
    """
    converted = {}
    for key, value in state_dict.items():
        new_key = key
        for pattern, replacement in _FASTER_RCNN_RULES:
            new_key, count = re.subn(pattern, replacement, key)
            if count:
                break
        converted[new_key] = value
    return converted


def is_torchvision_detector(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether the keys are those of a torchvision two-stage detector (``backbone.body.*``, ``rpn.head.*``,
    ...): a one-stage detector's dense head (``head.*``: RetinaNet, FCOS, SSD) rules it out."""
    return (any(key.startswith(_DETECTOR_PREFIXES) for key in state_dict)
            and not any(key.startswith("head.") for key in state_dict))


def convert_torchvision_detector(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Rename a torchvision Faster / Mask R-CNN state dict for segkit and describe the model.

    The architecture (Faster or Mask R-CNN, v1 or v2, ResNet depth and width, number of classes) is
    read from the keys and shapes. Both torchvision spellings are accepted (old checkpoints lack the
    ``.0`` of the conv wrappers and call the mask convs ``mask_fcn<i>``).

    Returns:
        ``(state_dict, config)``: the renamed tensors, and a complete segkit config (``model`` with
        torchvision's architecture and default test-time settings, ``data`` with COCO 2017 val as
        ``val`` and ``test``, ``evaluation`` and ``work_dir``). ``model.roi_head.num_classes`` is
        torchvision's class count minus the background; labels are unchanged (torchvision's label
        ``i`` is the COCO category id ``i``, hence ``category_ids: [1, ..., K]``).

    Raises:
        CheckpointError: the keys are not those of a supported detector (the message names what
            was found).

    Example:
        >>> tv = torchvision.models.detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)
        >>> state, cfg = convert_torchvision_detector(tv.state_dict())
        >>> segkit.build_model(cfg).load_state_dict(state)
    """
    arch = _detector_arch(state_dict)
    converted: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        renamed = _rename(key, value, arch)
        if renamed is None:
            unknown.append(key)
        else:
            converted[renamed[0]] = renamed[1]
    if unknown:
        raise CheckpointError(
            f"the torchvision detector state dict has {len(unknown)} key(s) that segkit cannot map, e.g. "
            f"{', '.join(unknown[:3])}; {_SUPPORTED}."
        )
    fix_batch_counters(converted, frozen_backbone=arch["backbone_norm"] == "FrozenBN")
    return converted, _config(arch)


def detector_class_names(num_classes: int) -> list[str]:
    """Class names of a converted torchvision detector: COCO's 90 category names (``"N/A"`` for the
    ids COCO leaves unused) when ``num_classes`` is 90, else ``class_1`` .. ``class_K``."""
    if num_classes == 90:
        from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

        names = list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
        if len(names) == 91 and names[0] == "__background__":
            return names[1:]
    return [f"class_{i}" for i in range(1, num_classes + 1)]


def describe_detector_config(config: Mapping[str, Any]) -> str:
    """A one-line description of a detector config written by :func:`convert_torchvision_detector`."""
    model = config["model"]
    roi = model["roi_head"]
    box = roi["box_head"]
    parts = [
        f"ResNet-{model['backbone']['depth']} ({model['backbone']['norm']})",
        f"FPN ({model['neck'].get('norm') or 'no norm'})",
        f"RPN ({model['rpn_head'].get('conv_depth', 1)} conv)",
        box["type"] if box["type"] == "TwoFCHead" else
        f"ConvFCHead {box['num_convs']}conv{box['num_fcs']}fc ({box.get('norm') or 'no norm'})",
    ]
    if roi.get("mask_head"):
        mask = roi["mask_head"]
        parts.append(f"MaskRCNNHead {mask['num_convs']} convs ({mask.get('norm') or 'no norm'})")
    name = str(config.get("work_dir", "detector")).rsplit("/", 1)[-1]
    return f"{name}: {' + '.join(parts)}, {roi['num_classes']} classes"


# ----------------------------------------------------------------------------------- architecture
def _detector_arch(state: Mapping[str, Tensor]) -> dict[str, Any]:

    absent = [p for p in _REQUIRED if not any(k.startswith(p) for k in state)]
    if absent:
        found = sorted({".".join(k.split(".")[:2]) for k in state})
        raise CheckpointError(
            f"the state dict looks like a torchvision detector but has no '{absent[0]}*' keys (found "
            f"{', '.join(found[:8])}{', ...' if len(found) > 8 else ''}); {_SUPPORTED}."
        )
    body = {k[len("backbone.body."):]: v for k, v in state.items() if k.startswith("backbone.body.")}
    try:
        backbone = infer_resnet_arch(body)
    except CheckpointError as exc:
        raise CheckpointError(f"the detector's backbone is not a ResNet: {exc}") from None
    lateral = layer_indices(state, r"^backbone\.fpn\.inner_blocks\.(\d+)\.")
    if lateral != [0, 1, 2, 3]:
        raise CheckpointError(f"the detector's FPN has {len(lateral)} levels; {_SUPPORTED}, whose FPN uses c2..c5.")
    fpn_weight = state.get("backbone.fpn.inner_blocks.0.0.weight", state.get("backbone.fpn.inner_blocks.0.weight"))
    num_anchors = int(state["rpn.head.cls_logits.weight"].shape[0])
    if num_anchors != 3:
        raise CheckpointError(f"the RPN predicts {num_anchors} anchors per location; only torchvision's default "
                              "anchors (3 aspect ratios, one size per level) are supported.")
    arch: dict[str, Any] = {
        "backbone": backbone,
        "fpn_channels": int(fpn_weight.shape[0]),
        "fpn_norm": norm_of(state, "backbone.fpn.inner_blocks.0.1."),
        "rpn_convs": max(1, len(layer_indices(state, r"^rpn\.head\.conv\.(\d+)\.0\.weight$"))),
        "num_classes": int(state["roi_heads.box_predictor.cls_score.weight"].shape[0]) - 1,
        "box_convs": layer_indices(state, r"^roi_heads\.box_head\.(\d+)\.0\.weight$"),
        "box_fcs": layer_indices(state, r"^roi_heads\.box_head\.(\d+)\.weight$"),
        "mask_convs": len(layer_indices(state, r"^roi_heads\.mask_head\.(?:mask_fcn)?(\d+)\.")),
    }
    box = state.get("roi_heads.box_head.fc7.weight")
    if box is not None:
        arch["box_head"] = {"type": "TwoFCHead", "fc_dim": int(box.shape[0])}
    elif arch["box_convs"] and arch["box_fcs"]:
        arch["box_head"] = {
            "type": "ConvFCHead", "num_convs": len(arch["box_convs"]),
            "conv_dim": int(state["roi_heads.box_head.0.0.weight"].shape[0]), "num_fcs": len(arch["box_fcs"]),
            "fc_dim": int(state[f"roi_heads.box_head.{arch['box_fcs'][-1]}.weight"].shape[0]),
            "norm": norm_of(state, "roi_heads.box_head.0.1."),
        }
    else:
        raise CheckpointError(f"the detector's box head (roi_heads.box_head.*) is neither TwoMLPHead nor "
                              f"FastRCNNConvFCHead; {_SUPPORTED}.")
    if arch["mask_convs"]:
        logits = state.get("roi_heads.mask_predictor.mask_fcn_logits.weight")
        if logits is None:
            raise CheckpointError("the detector has a mask head but no roi_heads.mask_predictor.mask_fcn_logits.*")
        first = state.get("roi_heads.mask_head.0.0.weight", state.get("roi_heads.mask_head.mask_fcn1.weight"))
        arch["mask_dim"] = int(first.shape[0])
        arch["mask_norm"] = norm_of(state, "roi_heads.mask_head.0.1.")
        arch["mask_agnostic"] = int(logits.shape[0]) == 1
    arch["v2"] = arch["fpn_norm"] is not None or arch["box_head"]["type"] == "ConvFCHead"
    arch["backbone_norm"] = "BN" if arch["v2"] else "FrozenBN"
    return arch


# ----------------------------------------------------------------------------------- key mapping
_Rule = tuple[str, Callable[[re.Match[str], Tensor, Mapping[str, Any]], tuple[str, Tensor]]]


def _same(template: str) -> Callable[[re.Match[str], Tensor, Mapping[str, Any]], tuple[str, Tensor]]:
    return lambda m, v, arch: (m.expand(template), v)


def _rpn_conv(m: re.Match[str], v: Tensor, arch: Mapping[str, Any]) -> tuple[str, Tensor]:
    index = int(m.group(1) or 0)
    return (f"rpn.conv.{m.group(2)}" if arch["rpn_convs"] == 1 else f"rpn.convs.{index}.{m.group(2)}"), v


def _box_fc(m: re.Match[str], v: Tensor, arch: Mapping[str, Any]) -> tuple[str, Tensor]:
    return f"roi_heads.box_head.fcs.{arch['box_fcs'].index(int(m.group(1)))}.{m.group(2)}", v


def _mask_logits(m: re.Match[str], v: Tensor, arch: Mapping[str, Any]) -> tuple[str, Tensor]:
    # torchvision predicts a map for the background too; segkit's predictor has one per foreground class.
    if not arch["mask_agnostic"] and v.shape[0] == arch["num_classes"] + 1:
        v = v[1:].clone()
    return f"roi_heads.mask_head.predictor.{m.group(1)}", v


# (pattern, mapping) in order; the first match wins.
_RULES: tuple[_Rule, ...] = (
    (r"^rpn\.head\.conv\.(?:(\d+)\.0\.)?(weight|bias)$", _rpn_conv),
    (r"^rpn\.head\.cls_logits\.(weight|bias)$", _same(r"rpn.objectness_logits.\1")),
    (r"^rpn\.head\.bbox_pred\.(weight|bias)$", _same(r"rpn.anchor_deltas.\1")),
    (r"^roi_heads\.box_head\.(fc6|fc7)\.(weight|bias)$", _same(r"roi_heads.box_head.\1.\2")),
    (r"^roi_heads\.box_head\.(\d+)\.([01]\..+)$", _same(r"roi_heads.box_head.convs.\1.\2")),
    (r"^roi_heads\.box_head\.(\d+)\.(weight|bias)$", _box_fc),
    (r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$", _same(r"roi_heads.\1.\2")),
    (r"^roi_heads\.mask_head\.(\d+)\.([01]\..+)$", _same(r"roi_heads.mask_head.convs.\1.\2")),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.(weight|bias)$", _same(r"roi_heads.mask_head.deconv.\1")),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)$", _mask_logits),
)
_COMPILED = tuple((re.compile(pattern), mapping) for pattern, mapping in _RULES)
_OLD_MASK_FCN = re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$")


def _rename(key: str, value: Tensor, arch: Mapping[str, Any]) -> tuple[str, Tensor] | None:
    """The segkit key and tensor of a torchvision key, or ``None`` when no rule applies."""
    renamed = rename_backbone_fpn_key(key)
    if renamed is not None:
        return renamed, value
    old = _OLD_MASK_FCN.match(key)
    if old:
        key = f"roi_heads.mask_head.{int(old.group(1)) - 1}.0.{old.group(2)}"
    for regex, mapping in _COMPILED:
        match = regex.match(key)
        if match:
            return mapping(match, value, arch)
    return None


# ----------------------------------------------------------------------------------- config
def _config(arch: Mapping[str, Any]) -> dict[str, Any]:
    """A complete segkit config for the detector ``arch`` describes (torchvision's settings)."""
    mask = bool(arch["mask_convs"])
    num_classes = int(arch["num_classes"])
    roi_head: dict[str, Any] = {
        "type": "StandardRoIHead", "num_classes": num_classes, "in_features": ["p2", "p3", "p4", "p5"],
        "pooler_resolution": 7, "pooler_sampling_ratio": 2, "box_head": dict(arch["box_head"]),
        "batch_size_per_image": 512, "positive_fraction": 0.25,
        "score_threshold": 0.05, "nms_threshold": 0.5, "detections_per_image": 100,
    }
    if mask:
        roi_head["mask_head"] = {
            "type": "MaskRCNNHead", "num_convs": int(arch["mask_convs"]), "conv_dim": int(arch["mask_dim"]),
            "norm": arch["mask_norm"], "class_agnostic": bool(arch["mask_agnostic"]),
            "pooler_resolution": 14, "pooler_sampling_ratio": 2, "mask_threshold": 0.5,
        }
    model = {
        "type": "TwoStageDetector",
        "pixel_mean": [0.485, 0.456, 0.406], "pixel_std": [0.229, 0.224, 0.225],
        "min_size": 800, "max_size": 1333, "size_divisor": 32,
        "backbone": {"type": "ResNet", **arch["backbone"], "out_indices": [0, 1, 2, 3], "frozen_stages": 1,
                     "norm": arch["backbone_norm"], "pretrained": None},
        "neck": {"type": "FPN", "in_features": ["c2", "c3", "c4", "c5"], "out_channels": arch["fpn_channels"],
                 "extra_block": "maxpool", "norm": arch["fpn_norm"]},
        "rpn_head": {
            "type": "RPN", "in_features": ["p2", "p3", "p4", "p5", "p6"],
            "anchor_sizes": [[32], [64], [128], [256], [512]], "aspect_ratios": [0.5, 1.0, 2.0],
            "conv_depth": int(arch["rpn_convs"]),
            "pre_nms_top_n_train": 2000, "post_nms_top_n_train": 2000,
            "pre_nms_top_n_test": 1000, "post_nms_top_n_test": 1000, "nms_threshold": 0.7,
        },
        "roi_head": roi_head,
    }
    return {"model": model, **coco_val_sections(num_classes, masks=mask), "work_dir": f"work_dirs/{_model_name(arch)}"}


def _model_name(arch: Mapping[str, Any]) -> str:
    """torchvision's builder name for the architecture (``maskrcnn_resnet50_fpn_v2``)."""
    kind = "maskrcnn" if arch["mask_convs"] else "fasterrcnn"
    return f"{kind}_{resnet_body_name(arch['backbone'])}_fpn{'_v2' if arch['v2'] else ''}"


@CONVERTERS.register()
class TorchvisionRCNN(WeightConverter):
    """torchvision Faster / Mask R-CNN (ResNet-FPN, v1 and v2) state dicts to a whole ``TwoStageDetector``
    checkpoint with its config and COCO's class names (:func:`convert_torchvision_detector`)."""

    source = "torchvision"
    accepts = _SUPPORTED.removeprefix("segkit converts ")

    def matches(self, state_dict: Mapping[str, Tensor]) -> bool:
        return is_torchvision_detector(state_dict)

    def convert(self, state_dict: Mapping[str, Tensor]) -> ConvertedWeights:
        state, cfg = convert_torchvision_detector(state_dict)
        classes = detector_class_names(cfg["model"]["roi_head"]["num_classes"])
        return ConvertedWeights(state, "model", cfg, describe_detector_config(cfg), classes,
                                note="COCO from $SEGKIT_COCO, default data/coco")
