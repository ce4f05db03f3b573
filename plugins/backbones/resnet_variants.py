"""Named members of the ResNet family: ``ResNeXt``, ``SEResNet``, ``SEResNeXt`` and ``SENet154``.

Each is a subclass of :class:`~segkit_plugins.backbones.resnet.ResNet` declared with
:meth:`segkit.registry.Registry.add_variant`: the variant's settings, and every other ``ResNet`` option
by keyword; its signature (shown by ``segkit list backbones`` and checked by the registry) lists them.

=========================  ==============================================================
config                     network
=========================  ==============================================================
``ResNeXt``                ResNeXt-50 32x4d (``depth: 101, width_per_group: 8`` = 101 32x8d,
                           ``depth: 101, groups: 64`` = 101 64x4d)
``SEResNet``               SE-ResNet-50 (``depth: 101`` / ``152``)
``SEResNeXt``              SE-ResNeXt-50 32x4d (``depth: 101`` = 101 32x4d)
``SENet154``               SENet-154 (64x4d bottlenecks with SE, 3-conv stem, 3x3 shortcuts)
=========================  ==============================================================
"""

from __future__ import annotations

from segkit.registry import BACKBONES
from segkit_plugins.backbones.resnet import ResNet

__all__ = ["ResNeXt", "SEResNet", "SEResNeXt", "SENet154"]


ResNeXt = BACKBONES.add_variant(
    ResNet, "ResNeXt", "ResNeXt: grouped 3x3 convolutions (default 50 32x4d).",
    defaults={"groups": 32, "width_per_group": 4})
SEResNet = BACKBONES.add_variant(
    ResNet, "SEResNet", "SE-ResNet: ResNet with squeeze-and-excitation after each residual branch (default 50).",
    defaults={"se_reduction": 16})
SEResNeXt = BACKBONES.add_variant(
    ResNet, "SEResNeXt", "SE-ResNeXt: ResNeXt with squeeze-and-excitation (default 50 32x4d).",
    defaults={"groups": 32, "width_per_group": 4, "se_reduction": 16})
SENet154 = BACKBONES.add_variant(
    ResNet, "SENet154", "SENet-154 as published: 152 layers, 64x4d bottlenecks with SE, deep stem.",
    fixed={"depth": 152, "groups": 64, "width_per_group": 4, "variant": "senet", "stem": "deep", "stem_channels": 128},
    defaults={"se_reduction": 16})
