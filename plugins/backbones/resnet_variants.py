"""Named members of the ResNet family: ``ResNeXt``, ``SEResNet``, ``SEResNeXt`` and ``SENet154``.

Each is a builder returning a :class:`~segkit_plugins.backbones.resnet.ResNet` with the variant's
defaults; it accepts every other ``ResNet`` option by keyword, and its signature (shown by
``segkit list backbones`` and checked by the registry) lists them.

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

import inspect
from collections.abc import Callable
from typing import Any

from segkit.registry import BACKBONES
from segkit_plugins.backbones.resnet import ResNet

__all__ = ["ResNeXt", "SEResNet", "SEResNeXt", "SENet154"]


def _variant(name: str, summary: str, *, fixed: dict[str, Any], defaults: dict[str, Any]) -> Callable[..., ResNet]:
    """A keyword-only builder of ``ResNet`` with ``fixed`` options (not accepted) and other ``defaults``."""
    base = inspect.signature(ResNet)
    params = [p.replace(default=defaults.get(p.name, p.default))
              for p in base.parameters.values() if p.name not in fixed]

    def build(**options: Any) -> ResNet:
        bad = sorted(set(options) - {p.name for p in params})
        if bad:
            raise TypeError(f"{name}() got unexpected keyword argument(s) {bad}")
        return ResNet(**fixed, **{**defaults, **options})

    build.__name__ = build.__qualname__ = name
    build.__module__ = __name__
    build.__signature__ = inspect.Signature(params, return_annotation=ResNet)  # type: ignore[attr-defined]
    settings = ", ".join(f"{k}={v!r}" for k, v in {**fixed, **defaults}.items())
    build.__doc__ = (f"{summary}\n\n``ResNet({settings}, ...)``; every other argument is a ``ResNet`` option.\n\n"
                     f"Example:\n    >>> net = {name}(out_indices=(1, 2, 3))\n")
    BACKBONES.add(build, name=name)
    return build


ResNeXt = _variant("ResNeXt", "ResNeXt: grouped 3x3 convolutions (default 50 32x4d).",
                   fixed={}, defaults={"groups": 32, "width_per_group": 4})
SEResNet = _variant("SEResNet", "SE-ResNet: ResNet with squeeze-and-excitation after each residual branch (default 50).",
                    fixed={}, defaults={"se_reduction": 16})
SEResNeXt = _variant("SEResNeXt", "SE-ResNeXt: ResNeXt with squeeze-and-excitation (default 50 32x4d).",
                     fixed={}, defaults={"groups": 32, "width_per_group": 4, "se_reduction": 16})
SENet154 = _variant("SENet154", "SENet-154 as published: 152 layers, 64x4d bottlenecks with SE, deep stem.",
                    fixed={"depth": 152, "groups": 64, "width_per_group": 4, "variant": "senet", "stem": "deep",
                           "stem_channels": 128},
                    defaults={"se_reduction": 16})
