"""MobileNetV3, ConvNeXt and RegNet from torchvision as segkit backbones.

Each torchvision model is a chain of layers whose stride grows from 2 to 32. The chain is cut
after the last layer of each stride 4, 8, 16 and 32; the four pieces are the stages, and their
outputs are ``c2``..``c5`` (the names and strides of segkit's feature contract), so any neck and
head that follows the contract works on them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torchvision
from torch import nn

from segkit.errors import ConfigError, did_you_mean
from segkit.ops import ShapeSpec
from segkit.registry import BACKBONES

__all__ = ["TorchvisionBackbone", "MobileNetV3", "ConvNeXt", "RegNet"]

_NAMES = ("c2", "c3", "c4", "c5")
_STRIDES = (4, 8, 16, 32)


def _layer_chain(model: nn.Module) -> list[nn.Module]:
    """The model's feature layers in order: ``features`` (MobileNet, ConvNeXt) or stem + trunk (RegNet)."""
    if hasattr(model, "features"):
        return list(model.features)
    if hasattr(model, "trunk_output"):
        return [model.stem, *model.trunk_output]
    raise ConfigError(f"{type(model).__name__} has neither 'features' nor 'trunk_output'; it is not a supported "
                      f"torchvision classifier", key="arch")


class TorchvisionBackbone(nn.Module):
    """A torchvision classifier's feature layers split into four stages of strides 4, 8, 16, 32.

    Args:
        arch: the torchvision model builder, e.g. ``"mobilenet_v3_large"``, ``"convnext_tiny"``,
            ``"regnet_y_400mf"``.
        pretrained: a local torchvision state-dict file for ``arch`` (classifier keys are ignored).
        out_features: which of ``c2``..``c5`` to return.
        frozen_stages: stages ``0..frozen_stages`` get no gradient (``-1``: none).
    """

    families: tuple[str, ...] = ()

    def __init__(self, *, arch: str, pretrained: str | None = None,
                 out_features: Sequence[str] = _NAMES, frozen_stages: int = -1) -> None:
        super().__init__()
        builders = [name for name in torchvision.models.list_models(module=torchvision.models)
                    if name.startswith(self.families)]
        if arch not in builders:
            raise ConfigError(f"unknown arch '{arch}' for {type(self).__name__}; choose one of "
                              f"{', '.join(builders)}." + did_you_mean(arch, builders), key="arch")
        unknown = [name for name in out_features if name not in _NAMES]
        if unknown or not out_features:
            raise ConfigError(f"out_features must be a non-empty subset of {list(_NAMES)}, got {list(out_features)}",
                              key="out_features")
        model = torchvision.models.get_model(arch, weights=None)
        if pretrained:
            _load_pretrained(model, pretrained)
        self.arch = arch
        self.out_features = tuple(out_features)
        self.stages = nn.ModuleList(nn.Sequential(*layers) for layers in _split_by_stride(_layer_chain(model)))
        self._channels = self._probe_channels()
        for index, stage in enumerate(self.stages):
            if index <= frozen_stages:
                stage.requires_grad_(False)

    def _probe_channels(self) -> list[int]:
        was_training = self.training
        self.eval()
        x = torch.zeros(1, 3, 64, 64)
        channels = []
        with torch.no_grad():
            for stage in self.stages:
                x = stage(x)
                channels.append(int(x.shape[1]))
        self.train(was_training)
        return channels

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {name: ShapeSpec(channels=c, stride=s)
                for name, c, s in zip(_NAMES, self._channels, _STRIDES) if name in self.out_features}

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, stage in zip(_NAMES, self.stages):
            x = stage(x)
            if name in self.out_features:
                out[name] = x
        return out


def _load_pretrained(model: nn.Module, path: str) -> None:
    """Load a torchvision state dict; only the classifier's keys may be absent."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ
        shapes = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise ConfigError(f"'{path}' does not fit {type(model).__name__}: {len(shapes)} tensors have other shapes "
                          f"({shapes[0] if shapes else exc}); give a torchvision state dict of the same arch.",
                          key="pretrained") from None
    missing = [k for k in missing if not k.startswith(("classifier.", "fc."))]
    if missing or unexpected:
        raise ConfigError(f"'{path}' does not fit {type(model).__name__}: {len(missing)} missing keys "
                          f"({', '.join(missing[:3])}) and {len(unexpected)} unexpected keys "
                          f"({', '.join(unexpected[:3])}); give a torchvision state dict of the same arch.",
                          key="pretrained")


def _split_by_stride(layers: list[nn.Module]) -> list[list[nn.Module]]:
    """Cut the chain after the last layer of each stride 4, 8, 16, 32 (measured on a probe image)."""
    x = torch.zeros(1, 3, 64, 64)
    strides = []
    with torch.no_grad():
        for layer in layers:
            was_training = layer.training
            layer.eval()
            x = layer(x)
            layer.train(was_training)
            strides.append(64 // int(x.shape[-1]))
    stages: list[list[nn.Module]] = []
    start = 0
    for stride in _STRIDES:
        ends = [i for i, s in enumerate(strides) if s == stride]
        if not ends:
            raise ConfigError(f"the model never reaches stride {stride} (strides {strides})", key="arch")
        stages.append(layers[start:ends[-1] + 1])
        start = ends[-1] + 1
    return stages


@BACKBONES.register()
class MobileNetV3(TorchvisionBackbone):
    """torchvision's MobileNetV3 (``mobilenet_v3_large`` / ``mobilenet_v3_small``) as c2..c5."""

    families = ("mobilenet_v3",)

    def __init__(self, *, arch: str = "mobilenet_v3_large", pretrained: str | None = None,
                 out_features: Sequence[str] = _NAMES, frozen_stages: int = -1) -> None:
        super().__init__(arch=arch, pretrained=pretrained, out_features=out_features, frozen_stages=frozen_stages)


@BACKBONES.register()
class ConvNeXt(TorchvisionBackbone):
    """torchvision's ConvNeXt (``convnext_tiny`` ... ``convnext_large``) as c2..c5."""

    families = ("convnext",)

    def __init__(self, *, arch: str = "convnext_tiny", pretrained: str | None = None,
                 out_features: Sequence[str] = _NAMES, frozen_stages: int = -1) -> None:
        super().__init__(arch=arch, pretrained=pretrained, out_features=out_features, frozen_stages=frozen_stages)


@BACKBONES.register()
class RegNet(TorchvisionBackbone):
    """torchvision's RegNet (``regnet_x_*`` / ``regnet_y_*``) as c2..c5."""

    families = ("regnet",)

    def __init__(self, *, arch: str = "regnet_y_400mf", pretrained: str | None = None,
                 out_features: Sequence[str] = _NAMES, frozen_stages: int = -1) -> None:
        super().__init__(arch=arch, pretrained=pretrained, out_features=out_features, frozen_stages=frozen_stages)
