"""The shared building blocks: one conv + norm (+ ReLU) block and norm table, one way to declare variants."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from segkit.ops import NORMS, ShapeSpec, conv_norm_act
from segkit.registry import BACKBONES, HEADS, NECKS

SHAPES = {f"c{i}": ShapeSpec(channels=8 * 2 ** (i - 2), stride=2 ** i) for i in range(2, 6)}


def test_the_block_keeps_the_size_and_the_checkpoint_layout():
    block = conv_norm_act(4, 8, 3, norm="GN", activation=True)
    assert [type(m) for m in block] == [nn.Conv2d, nn.GroupNorm, nn.ReLU] and block[0].bias is None
    assert block(torch.rand(2, 4, 9, 11)).shape == (2, 8, 9, 11)
    plain = conv_norm_act(4, 8, 1, stride=2)
    assert len(plain) == 1 and plain[0].bias is not None and not plain[0].bias.any()
    assert plain(torch.rand(1, 4, 9, 11)).shape == (1, 8, 5, 6)


@pytest.mark.parametrize("init, std", [("kaiming_normal", (2 / (8 * 9)) ** 0.5), ("kaiming_uniform", (1 / (64 * 9)) ** 0.5)])
def test_the_block_initialises_as_the_necks_and_heads_need(init: str, std: float):
    torch.manual_seed(0)
    conv = conv_norm_act(64, 8, 3, init=init)[0]
    assert float(conv.weight.detach().std()) == pytest.approx(std, rel=0.1)


def test_one_norm_table_for_every_neck_and_head():
    assert NORMS == ("BN", "SyncBN", "GN", "FrozenBN", "LN")
    fpn = NECKS.build({"type": "FPN", "out_channels": 8, "norm": "FrozenBN"}, in_shapes=SHAPES)
    assert isinstance(fpn.lateral_convs[0][1], FrozenBatchNorm2d)
    NECKS.build({"type": "PAFPN", "out_channels": 8, "norm": "FrozenBN"}, in_shapes=SHAPES)
    for kind, cfg in ((NECKS, {"type": "PAFPN", "out_channels": 8}), (HEADS, {"type": "FCNHead", "num_classes": 2})):
        with pytest.raises(ValueError, match=r"norm must be null or one of BN, SyncBN, GN, FrozenBN, LN, got 'IN'"):
            kind.build({**cfg, "norm": "IN"}, in_shapes=SHAPES)
    with pytest.raises(ValueError, match=r"ResNet norm must be one of BN, SyncBN, GN, FrozenBN, LN, got 'IN'"):
        BACKBONES.build({"type": "ResNet", "depth": 18, "norm": "IN"})


def test_a_variant_is_its_base_with_other_defaults_and_the_same_options():
    from segkit_plugins.backbones.resnet import ResNet

    variant = BACKBONES.get("SEResNeXt")
    assert issubclass(variant, ResNet) and variant.__module__ == "segkit_plugins.backbones.resnet_variants"
    params = inspect.signature(variant).parameters
    assert (params["groups"].default, params["se_reduction"].default) == (32, 16)
    assert set(params) == set(inspect.signature(ResNet).parameters)  # every ResNet option, by keyword
    net = BACKBONES.build({"type": "SEResNeXt", "depth": 50, "width_per_group": 2})
    assert net.layer1[0].conv2.groups == 32 and net.layer1[0].conv2.out_channels == 64
    assert "depth" not in inspect.signature(BACKBONES.get("SENet154")).parameters  # fixed by the variant
    with pytest.raises(TypeError, match=r"SENet154\(\) got unexpected keyword argument\(s\) \['depth'\]"):
        BACKBONES.get("SENet154")(depth=50)
    with pytest.raises(ValueError, match=r"variant Wide: ResNet has no argument\(s\) \['widht'\]"):
        BACKBONES.add_variant(ResNet, "Wide", "ResNet, wider.", defaults={"widht": 2})
