"""torchvision's DeepLabV3 (``deeplabv3_resnet50``, ``deeplabv3_resnet101``) to segkit checkpoints: the
``TorchvisionDeepLabV3`` converter of ``segkit convert --from torchvision`` and of
``engine.load_from: torchvision://deeplabv3_resnet50``.

torchvision's model is an ``EncoderDecoder`` in segkit's terms: its ResNet (``backbone.*``, the
classifier removed, layer3 and layer4 dilated by ``replace_stride_with_dilation=[False, True, True]``,
output stride 8) keeps its key names; ``classifier`` (``DeepLabHead``) becomes an :class:`ASPPHead` and
``aux_classifier`` (its ``FCNHead`` on layer3) an auxiliary :class:`FCNHead` on ``c4``:

========================================== ==========================================
torchvision                                segkit
========================================== ==========================================
``classifier.0.convs.0.{0,1}``             ``decode_head.aspp.branches.0.{0,1}`` (1x1)
``classifier.0.convs.{1,2,3}.{0,1}``       ``decode_head.aspp.branches.{1,2,3}.{0,1}`` (atrous)
``classifier.0.convs.4.{1,2}``             ``decode_head.aspp.pool.conv.{0,1}`` (image pooling)
``classifier.0.project.{0,1}``             ``decode_head.aspp.project.{0,1}``
``classifier.{1,2}``                       ``decode_head.bottleneck.{0,1}``
``classifier.4``                           ``decode_head.classifier``
``aux_classifier.{0,1}``                   ``auxiliary_heads.0.convs.0.{0,1}``
``aux_classifier.4``                       ``auxiliary_heads.0.classifier``
========================================== ==========================================

The ASPP's rates are not stored in the weights: torchvision's builders always use (12, 24, 36), so a
head with another number of atrous branches is refused. torchvision evaluates its published weights
with the shorter image side resized to 520; the converted config evaluates each image at its own size,
unpadded (``size_divisor: 1``), which gives torchvision's logits for the same input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from segkit.checkpoint import CheckpointError
from segkit.registry import CONVERTERS
from segkit.weights import ConvertedWeights, WeightConverter
from segkit_plugins.backbones.resnet_weights import infer_resnet_arch
from segkit_plugins.heads.detector_weights import layer_indices, refuse_unknown_keys, rename_by_rules, resnet_body_name

__all__ = ["is_torchvision_deeplabv3", "rename_torchvision_deeplabv3_key", "convert_torchvision_deeplabv3",
           "deeplab_class_names", "TorchvisionDeepLabV3"]

#: torchvision's ASPP rates (``DeepLabHead``'s default, used by every builder).
TORCHVISION_RATES = (12, 24, 36)
#: Where the converted config looks for Pascal VOC 2012 (``$SEGKIT_VOC``, default ``data/VOCdevkit``).
VOC_ROOT = "${env:SEGKIT_VOC,data/VOCdevkit}/VOC2012"
_SUPPORTED = "segkit converts torchvision's DeepLabV3 with a ResNet backbone (deeplabv3_resnet50, deeplabv3_resnet101)"
_MARKER = "classifier.0.project.0.weight"
_POOLING = 1 + len(TORCHVISION_RATES)  # index of the image-pooling branch in classifier.0.convs

# (pattern, replacement); the first match wins. torchvision's pooling branch starts with its (parameterless)
# average pool, so its conv and norm are at 1 and 2.
_RULES = tuple((re.compile(pattern), replacement) for pattern, replacement in (
    (r"^backbone\.((?:conv1|bn1|layer[1-4])\..+)$", r"backbone.\1"),
    (rf"^classifier\.0\.convs\.{_POOLING}\.1\.(weight)$", r"decode_head.aspp.pool.conv.0.\1"),
    (rf"^classifier\.0\.convs\.{_POOLING}\.2\.(.+)$", r"decode_head.aspp.pool.conv.1.\1"),
    (rf"^classifier\.0\.convs\.([0-{_POOLING - 1}])\.([01]\..+)$", r"decode_head.aspp.branches.\1.\2"),
    (r"^classifier\.0\.project\.([01]\..+)$", r"decode_head.aspp.project.\1"),
    (r"^classifier\.1\.(weight)$", r"decode_head.bottleneck.0.\1"),
    (r"^classifier\.2\.(.+)$", r"decode_head.bottleneck.1.\1"),
    (r"^classifier\.4\.(weight|bias)$", r"decode_head.classifier.\1"),
    (r"^aux_classifier\.0\.(weight)$", r"auxiliary_heads.0.convs.0.0.\1"),
    (r"^aux_classifier\.1\.(.+)$", r"auxiliary_heads.0.convs.0.1.\1"),
    (r"^aux_classifier\.4\.(weight|bias)$", r"auxiliary_heads.0.classifier.\1"),
))


def is_torchvision_deeplabv3(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether the keys are those of a torchvision DeepLabV3 (its ASPP projection ``classifier.0.project``)."""
    return _MARKER in state_dict


def rename_torchvision_deeplabv3_key(key: str) -> str | None:
    """The segkit name of a torchvision DeepLabV3 key (``classifier.0.project.0.weight`` ->
    ``decode_head.aspp.project.0.weight``), or ``None`` when no rule maps it."""
    return rename_by_rules(key, _RULES)


def convert_torchvision_deeplabv3(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Rename a torchvision DeepLabV3 state dict for segkit's ``EncoderDecoder`` (dilated ``ResNet`` +
    :class:`ASPPHead` + an auxiliary :class:`FCNHead` when the state has ``aux_classifier``) and describe it.

    Returns:
        ``(state_dict, config)``: the renamed tensors, and a complete config (the model, Pascal VOC 2012
        val as ``val`` and ``test``, mIoU).

    Raises:
        CheckpointError: keys that no rule maps (naming them), a backbone that is no ResNet, or an ASPP
            with other than three atrous branches.

    Example:
        >>> tv = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None)
        >>> state, cfg = convert_torchvision_deeplabv3(tv.state_dict())
        >>> segkit.build_model(cfg).load_state_dict(state)
    """
    arch = _arch(state_dict)
    renamed = {key: rename_torchvision_deeplabv3_key(key) for key in state_dict}
    refuse_unknown_keys([key for key, new in renamed.items() if new is None], "torchvision DeepLabV3", _SUPPORTED)
    return {renamed[key]: value for key, value in state_dict.items()}, _config(arch)


def _arch(state: Mapping[str, Tensor]) -> dict[str, Any]:
    body = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    try:
        backbone = infer_resnet_arch(body)
    except CheckpointError as exc:
        raise CheckpointError(f"the DeepLabV3's backbone is not a ResNet ({_SUPPORTED}): {exc}") from None
    branches = layer_indices(state, r"^classifier\.0\.convs\.(\d+)\.")
    if branches != list(range(_POOLING + 1)):
        raise CheckpointError(f"the DeepLabV3's ASPP has {max(len(branches) - 2, 0)} atrous branches; {_SUPPORTED}, "
                              f"whose ASPP has three (rates {TORCHVISION_RATES}, which the weights do not record).")
    for key in ("classifier.4.weight", "classifier.1.weight"):
        if key not in state:
            raise CheckpointError(f"the DeepLabV3 state dict has no '{key}'; {_SUPPORTED}.")
    aux = state.get("aux_classifier.0.weight")
    return {
        "backbone": backbone, "channels": int(state["classifier.0.convs.0.0.weight"].shape[0]),
        "num_classes": int(state["classifier.4.weight"].shape[0]),
        "aux_channels": None if aux is None else int(aux.shape[0]),
    }


def _config(arch: Mapping[str, Any]) -> dict[str, Any]:
    """A complete segkit config of the DeepLabV3 ``arch`` describes."""
    num_classes = int(arch["num_classes"])
    model: dict[str, Any] = {
        "type": "EncoderDecoder", "pixel_mean": [0.485, 0.456, 0.406], "pixel_std": [0.229, 0.224, 0.225],
        "size_divisor": 1, "align_corners": False, "test_cfg": {"mode": "whole"},
        "backbone": {"type": "ResNet", **arch["backbone"], "strides": [1, 2, 1, 1], "dilations": [1, 1, 2, 4],
                     "contract_dilation": True, "norm": "BN", "pretrained": None},
        "decode_head": {"type": "ASPPHead", "in_features": "c5", "channels": arch["channels"],
                        "dilations": list(TORCHVISION_RATES), "aspp_dropout": 0.5, "dropout": 0.0,
                        "num_classes": num_classes},
    }
    if arch["aux_channels"] is not None:
        # torchvision's reference training weighs the auxiliary loss by 0.5.
        model["auxiliary_head"] = {"type": "FCNHead", "in_features": "c4", "channels": arch["aux_channels"],
                                   "num_convs": 1, "dropout": 0.1, "loss_weight": 0.5, "num_classes": num_classes}
    split = {"type": "VOCSegmentation", "root": VOC_ROOT, "split": "val"}
    return {
        "model": model,
        "data": {"batch_size": 2, "val_batch_size": 1, "num_workers": 2, "val": split, "test": dict(split)},
        "evaluation": {"type": "SemSegEvaluator", "main_metric": "mIoU"},
        "work_dir": f"work_dirs/deeplabv3_{resnet_body_name(arch['backbone'])}",
    }


def deeplab_class_names(num_classes: int) -> list[str]:
    """Pascal VOC's 21 class names (background first, as torchvision's labels) when ``num_classes`` is 21,
    else ``class_0`` .. ``class_{K-1}``."""
    from segkit.data.semseg_formats import VOC_CLASSES

    if num_classes == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    return [f"class_{i}" for i in range(num_classes)]


@CONVERTERS.register()
class TorchvisionDeepLabV3(WeightConverter):
    """torchvision DeepLabV3 (ResNet) state dicts to a whole ``EncoderDecoder`` checkpoint with its config
    and class names (:func:`convert_torchvision_deeplabv3`)."""

    source = "torchvision"
    accepts = _SUPPORTED.removeprefix("segkit converts ")

    def matches(self, state_dict: Mapping[str, Tensor]) -> bool:
        return is_torchvision_deeplabv3(state_dict)

    def convert(self, state_dict: Mapping[str, Tensor]) -> ConvertedWeights:
        state, cfg = convert_torchvision_deeplabv3(state_dict)
        model = cfg["model"]
        aux = " + FCNHead on c4" if "auxiliary_head" in model else ""
        num_classes = model["decode_head"]["num_classes"]
        description = (f"{cfg['work_dir'].rsplit('/', 1)[-1]}: dilated ResNet-{model['backbone']['depth']} "
                       f"(output stride 8) + ASPPHead{aux}, {num_classes} classes")
        return ConvertedWeights(state, "model", cfg, description, deeplab_class_names(num_classes),
                                note="VOC 2012 from $SEGKIT_VOC, default data/VOCdevkit")
