"""Weights of other libraries for the ResNet family: key maps from torchvision and timm, the
architecture a state dict was made for, and the ``TorchvisionResNet`` / ``TimmResNet`` converters
that ``segkit convert`` uses (whole torchvision detectors: :mod:`segkit_plugins.heads.rcnn_weights`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from segkit.checkpoint import CheckpointError
from segkit.registry import CONVERTERS
from segkit.weights import ConvertedWeights, WeightConverter

__all__ = ["convert_timm_resnet", "detect_resnet_format", "infer_resnet_arch",
           "TimmResNet", "TorchvisionResNet", "CLASSIFIER_PREFIXES"]

#: Keys of the ImageNet classifier, which a backbone does not have.
CLASSIFIER_PREFIXES = ("fc.", "last_linear.")

# timm's legacy SENet keeps its stem under ``layer0`` and calls the SE unit ``se_module``; timm's
# deep-stem ResNets ("resnet50d") keep the stem in a Sequential ``conv1`` followed by ``bn1``.
_TIMM_SENET_RULES = (
    (r"^layer0\.(conv|bn)(\d)\.", r"\1\2."),
    (r"\.se_module\.", ".se."),
)
_TIMM_DEEP_STEM_RULES = (
    (r"^bn1\.", "bn3."),
    (r"^conv1\.0\.", "conv1."),
    (r"^conv1\.1\.", "bn1."),
    (r"^conv1\.3\.", "conv2."),
    (r"^conv1\.4\.", "bn2."),
    (r"^conv1\.6\.", "conv3."),
)


def detect_resnet_format(state_dict: Mapping[str, Tensor]) -> str:
    """``"timm"`` when the keys show a timm-only layout (``layer0.``, ``se_module``, ``last_linear``,
    a Sequential ``conv1``), else ``"torchvision"`` (timm's plain ResNets share torchvision's names)."""
    for key in state_dict:
        if key.startswith(("layer0.", "last_linear.", "conv1.0.")) or ".se_module." in key:
            return "timm"
    return "torchvision"


def convert_timm_resnet(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a timm ``resnet*``, ``resnext*``, ``seresnet*``, ``seresnext*`` or ``legacy_senet154``
    state dict for segkit's ``ResNet`` backbone; the classifier (``fc.*``, ``last_linear.*``) is dropped.

    Keys that match no rule are returned unchanged, so loading reports them.

    Example:
        >>> net = timm.create_model("legacy_senet154")
        >>> ResNet(**infer_resnet_arch(convert_timm_resnet(net.state_dict()))).load_state_dict(
        ...     convert_timm_resnet(net.state_dict()))
    """
    rules = _TIMM_SENET_RULES + (_TIMM_DEEP_STEM_RULES if "conv1.0.weight" in state_dict else ())
    converted = {}
    for key, value in state_dict.items():
        if key.startswith(CLASSIFIER_PREFIXES):
            continue
        new_key = key
        for pattern, replacement in rules:
            new_key, count = re.subn(pattern, replacement, new_key)
            if count and pattern.startswith("^"):
                break
        converted[new_key] = value
    return converted


_DEPTHS = {
    (False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34,
    (True, (3, 4, 6, 3)): 50, (True, (3, 4, 23, 3)): 101, (True, (3, 8, 36, 3)): 152,
}


def infer_resnet_arch(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """The ``ResNet`` backbone options that a segkit-named state dict was made for.

    Args:
        state_dict: keys as segkit's ``ResNet`` names them (after :func:`convert_timm_resnet` for timm).

    Returns:
        ``{"depth", "groups", "width_per_group", "se_reduction", "variant", "stem", "stem_channels",
        "base_channels"}``.

    Raises:
        CheckpointError: the keys are not those of a ResNet-family network (the message names the
            key that was looked for).
    """
    blocks = [0, 0, 0, 0]
    for key in state_dict:
        match = re.match(r"^layer([1-4])\.(\d+)\.", key)
        if match:
            stage, index = int(match.group(1)) - 1, int(match.group(2))
            blocks[stage] = max(blocks[stage], index + 1)
    bottleneck = "layer1.0.conv3.weight" in state_dict
    depth = _DEPTHS.get((bottleneck, tuple(blocks)))
    required = ("conv1.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight")
    absent = [k for k in required if k not in state_dict]
    if depth is None or absent:
        raise CheckpointError(
            "the state dict is not a ResNet-family backbone: "
            + (f"key '{absent[0]}' is missing" if absent else f"blocks per stage {blocks} match no depth")
            + f" (first keys: {', '.join(list(state_dict)[:3])}). Convert only torchvision resnet*/resnext* or "
            f"timm resnet*/resnext*/seresnet*/seresnext*/legacy_senet154 backbones, or torchvision "
            f"fasterrcnn_resnet50_fpn[_v2] / maskrcnn_resnet50_fpn[_v2] detectors."
        )
    deep = "conv3.weight" in state_dict
    stem_channels = int(state_dict["conv3.weight" if deep else "conv1.weight"].shape[0])
    first, conv2 = state_dict["layer1.0.conv1.weight"], state_dict["layer1.0.conv2.weight"]
    if bottleneck:
        base = int(state_dict["layer1.0.conv3.weight"].shape[0]) // 4
        groups = int(first.shape[0]) // int(conv2.shape[1])
        width_per_group = int(conv2.shape[0]) * 64 // (base * groups)
        variant = "senet" if first.shape[0] != conv2.shape[0] else "resnet"
    else:
        base, groups, width_per_group, variant = int(conv2.shape[0]), 1, 64, "resnet"
    # The widest stage gives the reduction exactly (narrow ones round their hidden width up to 8).
    se = state_dict.get(f"layer{max(i + 1 for i, n in enumerate(blocks) if n)}.0.se.fc1.weight")
    return {
        "depth": depth, "groups": groups, "width_per_group": width_per_group,
        "se_reduction": None if se is None else round(int(se.shape[1]) / int(se.shape[0])),
        "variant": variant, "stem": "deep" if deep else "default", "stem_channels": stem_channels,
        "base_channels": base,
    }


_ACCEPTS = "resnet*/resnext* backbones (classifier dropped)"


class _ResNetConverter(WeightConverter):
    def matches(self, state_dict: Mapping[str, Tensor]) -> bool:
        return "conv1.weight" in state_dict or "layer0.conv1.weight" in state_dict or "conv1.0.weight" in state_dict

    def rename(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return dict(state_dict)

    def convert(self, state_dict: Mapping[str, Tensor]) -> ConvertedWeights:
        state = {k: v for k, v in self.rename(state_dict).items() if not k.startswith(CLASSIFIER_PREFIXES)}
        arch = infer_resnet_arch(state)
        options = ", ".join(f"{k}: {v}" for k, v in arch.items())
        return ConvertedWeights(state, "backbone", {"type": "ResNet", **arch}, f"ResNet backbone ({options})")


@CONVERTERS.register()
class TorchvisionResNet(_ResNetConverter):
    """torchvision ``resnet*`` / ``resnext*`` / ``wide_resnet*`` state dicts to a ``ResNet`` backbone."""

    source = "torchvision"
    accepts = "torchvision " + _ACCEPTS


@CONVERTERS.register()
class TimmResNet(_ResNetConverter):
    """timm ``resnet*``, ``resnext*``, ``seresnet*``, ``seresnext*``, ``legacy_senet154`` and deep-stem
    state dicts to a ``ResNet`` backbone (:func:`convert_timm_resnet`)."""

    source = "timm"
    accepts = "timm " + _ACCEPTS + ", seresnet*/seresnext*/legacy_senet154, deep stems"

    def rename(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return convert_timm_resnet(state_dict)
