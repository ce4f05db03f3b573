"""Reference computations shared by tests."""

from __future__ import annotations

import torch


def torchvision_stages(net: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of layer1..layer4 of a torchvision ResNet/ResNeXt (the c2..c5 maps)."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    outs = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(net, name)(x)
        outs.append(x)
    return outs
