"""VGG (Simonyan and Zisserman, "Very Deep Convolutional Networks") as a detection backbone, with SSD's
variant of it (Liu et al., "SSD: Single Shot MultiBox Detector").

The maps are named after the paper's layers: ``conv1``..``conv5`` are the outputs (after ReLU, before
pooling) of the five stages, so ``conv4`` is VGG-16's ``conv4_3``, and ``fc7`` is SSD's convolutional
fc7. SSD's extra layers (``conv8_2``..``conv11_2``) are not part of the backbone but of the
:class:`~segkit_plugins.necks.ssd_neck.SSDExtraLayers` neck: they are the detector's, not ImageNet's
(they start from random weights), and the same neck can follow another backbone, as the necks of
MMDetection's SSD and SSDLite do.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.checkpoint import BACKBONE_INFO_KEY, CheckpointError, extract_state_dict, load_state_dict_checked, read_checkpoint
from segkit.ops import ShapeSpec
from segkit.registry import BACKBONES, CONVERTERS
from segkit.weight_names import is_weight_name
from segkit.weights import ConvertedWeights, WeightConverter, named_backbone_weights

__all__ = ["VGG", "L2Norm", "VGG_STAGE_CONVS", "convert_torchvision_vgg", "TorchvisionVGG"]

#: Convolutions per stage of each depth (configurations A, B, D, E of the paper).
VGG_STAGE_CONVS: dict[int, tuple[int, ...]] = {
    11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4),
}
_WIDTHS = (64, 128, 256, 512, 512)
_STAGE_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")
# What an ImageNet VGG lacks and SSD adds: never a reason to warn when ImageNet weights are loaded.
_SSD_ONLY = ("fc6.", "fc7.", "l2_norm.")


class L2Norm(nn.Module):
    """Each position's channel vector divided by its L2 norm, times a learned per-channel scale
    (ParseNet's normalisation, SSD's on ``conv4_3``, whose activations are larger than the later maps').

    Args:
        channels: channels of the input.
        scale: initial value of every channel's scale (20 in SSD).
    """

    def __init__(self, channels: int, scale: float = 20.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight.view(1, -1, 1, 1) * F.normalize(x, dim=1)


@BACKBONES.register()
class VGG(nn.Module):
    """VGG feature extractor returning stage outputs ``conv1``..``conv5`` and, with ``ssd``, ``fc7``.

    With ``ssd=True`` (SSD's variant, torchvision's ``ssd300_vgg16`` backbone): pool3 rounds up
    (``ceil_mode``, so a 300-pixel input gives 38x38 ``conv4``), pool5 is a 3x3 max pool of stride 1,
    and fc6 / fc7 are convolutions (fc6 3x3 with dilation 6 and 1024 channels, fc7 1x1), each followed
    by ReLU; ``fc7`` has stride 16. ``l2_norm_scale`` applies :class:`L2Norm` to the returned ``conv4``
    (the next stage still sees the map before it).

    Args:
        depth: 11, 13, 16 or 19.
        out_features: maps to return, among ``conv1``..``conv5`` (strides 1..16) and ``fc7`` (``ssd``).
        ssd: SSD's pooling and fc6 / fc7 (see above); ``False`` gives the plain convolutional part.
        l2_norm_scale: initial scale of the L2 normalisation of ``conv4``; ``None`` for none.
        frozen_stages: ``-1`` trains everything; ``i`` freezes stages 1..i (torchvision's SSD with
            ImageNet weights freezes stage 1).
        pretrained: a local state dict (torchvision's ``vgg*`` key names, or a file written by
            ``segkit convert``) or a weight name (``torchvision://vgg16.IMAGENET1K_FEATURES``, the
            backbone of ``torchvision://ssd300_vgg16``); classifier keys are ignored, and fc6 / fc7 /
            the L2 scale keep their initial values when the weights are an ImageNet VGG's.

    Example:
        >>> net = VGG(depth=16)
        >>> {k: tuple(v.shape) for k, v in net(torch.rand(1, 3, 300, 300)).items()}
        {'conv4': (1, 512, 38, 38), 'fc7': (1, 1024, 19, 19)}
    """

    def __init__(
        self,
        *,
        depth: int = 16,
        out_features: Sequence[str] = ("conv4", "fc7"),
        ssd: bool = True,
        l2_norm_scale: float | None = 20.0,
        frozen_stages: int = -1,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        if depth not in VGG_STAGE_CONVS:
            raise ValueError(f"VGG depth must be one of {', '.join(map(str, VGG_STAGE_CONVS))}, got {depth}")
        names = _STAGE_NAMES + (("fc7",) if ssd else ())
        unknown = [f for f in out_features if f not in names]
        if unknown or not out_features:
            raise ValueError(f"VGG out_features {list(unknown) or '[]'} are not among its maps {list(names)}"
                             + ("" if ssd else " (fc7 needs ssd: true)"))
        if not -1 <= frozen_stages <= 5:
            raise ValueError(f"frozen_stages must be in -1..5, got {frozen_stages}")
        if l2_norm_scale is not None and "conv4" not in out_features:
            raise ValueError("l2_norm_scale normalises the returned conv4; add conv4 to out_features or set it to null")
        self.arch = {"depth": int(depth)}
        self.out_features = tuple(out_features)
        self.ssd = bool(ssd)
        self.frozen_stages = int(frozen_stages)
        self.stages = nn.ModuleList()
        in_channels = 3
        for count, width in zip(VGG_STAGE_CONVS[depth], _WIDTHS):
            layers: list[nn.Module] = []
            for _ in range(count):
                layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True)]
                in_channels = width
            self.stages.append(nn.Sequential(*layers))
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):  # torchvision's VGG initialisation
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
        if self.ssd:
            self.fc6 = nn.Conv2d(512, 1024, 3, padding=6, dilation=6)
            self.fc7 = nn.Conv2d(1024, 1024, 1)
            for conv in (self.fc6, self.fc7):  # SSD's initialisation of the layers it adds
                nn.init.xavier_uniform_(conv.weight)
                nn.init.zeros_(conv.bias)
        self.l2_norm = L2Norm(512, l2_norm_scale) if l2_norm_scale is not None else None
        if pretrained is not None:
            self.load_pretrained(pretrained)
        self._freeze()

    def output_shape(self) -> dict[str, ShapeSpec]:
        """``{name: ShapeSpec(channels, stride)}`` of the returned maps."""
        shapes = {name: ShapeSpec(width, 2 ** i) for i, (name, width) in enumerate(zip(_STAGE_NAMES, _WIDTHS))}
        shapes["fc7"] = ShapeSpec(1024, 16)
        return {name: shapes[name] for name in self.out_features}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Maps of ``out_features`` of a batch Tensor[N, 3, H, W] (normalised), in the order given."""
        maps: dict[str, Tensor] = {}
        last = max(_STAGE_NAMES.index(f) if f in _STAGE_NAMES else 5 for f in self.out_features)
        for i, stage in enumerate(self.stages[: min(last, 4) + 1]):
            if i > 0:  # pool1..pool4: 2x2, stride 2; SSD's pool3 rounds up
                x = F.max_pool2d(x, 2, 2, ceil_mode=self.ssd and i == 3)
            x = stage(x)
            maps[_STAGE_NAMES[i]] = x
        if last == 5:
            x = F.max_pool2d(x, 3, 1, padding=1)  # SSD's pool5 keeps the resolution
            x = F.relu(self.fc6(x), inplace=True)
            maps["fc7"] = F.relu(self.fc7(x), inplace=True)
        if self.l2_norm is not None:
            maps["conv4"] = self.l2_norm(maps["conv4"])
        return OrderedDict((name, maps[name]) for name in self.out_features)

    def load_pretrained(self, path: str) -> None:
        """Load a local file or the weights a name stands for (see the class docstring).

        Raises:
            CheckpointError: the file or name cannot be read, holds another depth, or a shape differs.
        """
        if is_weight_name(path):
            converted = named_backbone_weights(path)
            info, state = converted.config, converted.state_dict
        else:
            ckpt = read_checkpoint(path)
            state = extract_state_dict(ckpt)
            info = ckpt.get(BACKBONE_INFO_KEY)
            if info is None and "features.0.weight" in state:
                state, info = convert_torchvision_vgg(state)
        if isinstance(info, Mapping) and info.get("depth", self.arch["depth"]) != self.arch["depth"]:
            raise CheckpointError(f"pretrained weights '{path}' are a VGG-{info['depth']}'s but the backbone is a "
                                  f"VGG-{self.arch['depth']}; set depth: {info['depth']} or choose other weights.")
        report = load_state_dict_checked(self, state, source=f"pretrained weights '{path}'", strict=False,
                                         hint="check depth")
        missing = [k for k in report["missing"] if not k.startswith(_SSD_ONLY)]
        problems = [f"{kind} keys {keys}" for kind, keys in (("missing", missing), ("unexpected", report["unexpected"]))
                    if keys]
        if problems:
            warnings.warn(f"loading '{path}' into VGG: " + "; ".join(problems), stacklevel=3)

    def _frozen_modules(self) -> list[nn.Module]:
        return list(self.stages[: max(self.frozen_stages, 0)])

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)


def convert_torchvision_vgg(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """torchvision's ``vgg11``..``vgg19`` state dict (``features.<i>.*``) renamed for :class:`VGG`, and
    the backbone config it fits (the plain convolutional part: ``ssd: false``); the classifier is dropped.

    Raises:
        CheckpointError: a batch-normalised VGG (``vgg16_bn``), or a convolution count of no VGG depth.
    """
    if any(k.startswith("features.") and k.endswith("running_mean") for k in state_dict):
        raise CheckpointError("segkit's VGG has no batch normalisation; convert vgg11/13/16/19, not a *_bn model.")
    convs = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("features.") and k.endswith(".weight")})
    depth = next((d for d, counts in VGG_STAGE_CONVS.items() if sum(counts) == len(convs)), None)
    if depth is None:
        raise CheckpointError(f"the VGG state dict has {len(convs)} convolutions; VGG-11/13/16/19 have 8/10/13/16.")
    renamed = {}
    for index, (stage, position) in zip(convs, _conv_positions(depth)):
        for name in ("weight", "bias"):
            renamed[f"stages.{stage}.{2 * position}.{name}"] = state_dict[f"features.{index}.{name}"]
    config = {"type": "VGG", "depth": depth, "ssd": False, "l2_norm_scale": None, "out_features": list(_STAGE_NAMES)}
    return renamed, config


def _conv_positions(depth: int) -> list[tuple[int, int]]:
    """``(stage, index in stage)`` of each convolution of a VGG of ``depth``, in order."""
    return [(stage, j) for stage, count in enumerate(VGG_STAGE_CONVS[depth]) for j in range(count)]


@CONVERTERS.register()
class TorchvisionVGG(WeightConverter):
    """torchvision ``vgg11`` / ``vgg13`` / ``vgg16`` / ``vgg19`` state dicts (ImageNet, or the
    ``IMAGENET1K_FEATURES`` weights SSD starts from) to a ``VGG`` backbone (:func:`convert_torchvision_vgg`)."""

    source = "torchvision"
    accepts = "torchvision vgg11/13/16/19 backbones (classifier dropped)"

    def matches(self, state_dict: Mapping[str, Tensor]) -> bool:
        return "features.0.weight" in state_dict and not any(k.startswith("backbone.") for k in state_dict)

    def convert(self, state_dict: Mapping[str, Tensor]) -> ConvertedWeights:
        state, config = convert_torchvision_vgg(state_dict)
        return ConvertedWeights(state, "backbone", config, f"VGG-{config['depth']} backbone (convolutional part)")
