"""Modulated deformable convolution: finite-difference gradients, its initial state, the sampling
geometry, the norm fold, and the ResNet option that puts it in chosen stages (weights, training, errors)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.func import functional_call

import segkit
from segkit.errors import ConfigError
from segkit.ops import ModulatedDeformConv2d, fold_conv_norm
from segkit.registry import MODELS
from segkit_plugins.backbones.resnet import ResNet
from segkit_plugins.backbones.resnet_loading import new_parameter_keys
from tests.reference import torchvision_stages
from test_detector import synthetic_batch
from test_mask_rcnn import mask_config, masks_of

DCN_C3_C5 = (False, True, True, True)


def _with_random_offsets(conv: ModulatedDeformConv2d, seed: int = 0) -> ModulatedDeformConv2d:
    """Offsets of about +-1.5 px that are not integers (where bilinear sampling has kinks) and masks
    away from their initial value, so every path of the layer is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.conv_offset.weight.copy_(torch.randn(conv.conv_offset.weight.shape, generator=gen) * 0.3)
        conv.conv_offset.bias.copy_(torch.rand(conv.conv_offset.bias.shape, generator=gen) * 2 - 1 + 0.37)
    return conv


# --------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("options", [
    {"padding": 1},
    {"stride": 2, "padding": 2, "dilation": 2, "groups": 2, "deform_groups": 2, "bias": False},
], ids=["plain", "strided-dilated-grouped"])
def test_gradients_equal_finite_differences(options):
    torch.manual_seed(0)
    conv = _with_random_offsets(ModulatedDeformConv2d(in_channels=4, out_channels=4, kernel_size=3, **options)).double()
    names = [name for name, _ in conv.named_parameters()]
    assert set(names) >= {"weight", "conv_offset.weight", "conv_offset.bias"}
    x = torch.rand(2, 4, 6, 7, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for _, p in conv.named_parameters()]

    def run(x, *values):
        return functional_call(conv, dict(zip(names, values)), (x,))

    # the input, the main weight (and bias), and the offset-and-mask convolution's weight and bias
    assert torch.autograd.gradcheck(run, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_at_initialisation_the_layer_is_the_plain_convolution():
    torch.manual_seed(0)
    conv = ModulatedDeformConv2d(in_channels=6, out_channels=8, kernel_size=3, padding=2, dilation=2, groups=2)
    x = torch.rand(2, 6, 9, 11)
    offset, mask = conv.offsets_and_masks(x)
    assert torch.equal(offset, torch.zeros_like(offset)) and torch.equal(mask, torch.ones_like(mask))
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=2, dilation=2, groups=2))


def test_dcnv2_mask_scale_starts_at_half_the_plain_convolution():
    torch.manual_seed(0)
    conv = ModulatedDeformConv2d(in_channels=4, out_channels=5, kernel_size=3, padding=1, mask_scale=1.0)
    x = torch.rand(1, 4, 8, 8)
    torch.testing.assert_close(conv(x), 0.5 * F.conv2d(x, conv.weight, padding=1) + conv.bias.reshape(-1, 1, 1))


def test_an_offset_of_one_row_convolves_the_input_shifted_up_by_one_row():
    torch.manual_seed(0)
    conv = ModulatedDeformConv2d(in_channels=3, out_channels=4, kernel_size=3, padding=1)
    with torch.no_grad():
        conv.conv_offset.bias[0:18:2] = 1.0  # dy = +1 at every kernel position, dx = 0
    x = torch.rand(2, 3, 10, 12, dtype=torch.float64)
    conv = conv.double()
    shifted = F.pad(x[:, :, 1:], (0, 0, 0, 1))  # shifted[y] = x[y + 1], zeros below
    expected = F.conv2d(shifted, conv.weight, conv.bias, padding=1)
    got = conv(x)
    # Row 0's top taps read x[0] where the shifted input's padding reads zero; every other row agrees.
    torch.testing.assert_close(got[:, :, 1:], expected[:, :, 1:])
    assert not torch.allclose(got[:, :, 0], expected[:, :, 0])


@pytest.mark.parametrize("kwargs,match", [
    ({"in_channels": 6, "out_channels": 4, "groups": 4}, "groups=4 must divide"),
    ({"in_channels": 6, "out_channels": 4, "deform_groups": 4}, "deform_groups=4 must divide"),
    ({"in_channels": 4, "out_channels": 4, "mask_scale": 0.0}, "mask_scale must be positive"),
])
def test_bad_layer_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModulatedDeformConv2d(kernel_size=3, **kwargs)


def test_fold_conv_norm_folds_a_deformable_convolution_with_the_same_values_and_gradients():
    torch.manual_seed(0)
    conv = _with_random_offsets(ModulatedDeformConv2d(in_channels=4, out_channels=6, kernel_size=3, padding=1))
    norm = torch.nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 1.5)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.rand(2, 4, 7, 9)
    results = []
    for fold in (False, True):
        conv.zero_grad()
        norm.zero_grad()
        out = fold_conv_norm(conv, norm, x, fold)
        out.square().sum().backward()
        results.append((out.detach(), conv.weight.grad.clone(), conv.conv_offset.weight.grad.clone(),
                        norm.weight.grad.clone()))
    for unfolded, folded in zip(*results):
        torch.testing.assert_close(folded, unfolded, rtol=1e-4, atol=1e-4)


def test_under_autocast_the_layer_runs_in_float32_and_returns_the_input_dtype():
    torch.manual_seed(0)
    conv = _with_random_offsets(ModulatedDeformConv2d(in_channels=4, out_channels=6, kernel_size=3, padding=1))
    x = torch.rand(1, 4, 8, 8)
    expected = conv(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = conv(x.bfloat16())
        full = conv(x)
    assert low.dtype == torch.bfloat16 and full.dtype == torch.float32
    torch.testing.assert_close(full, expected)  # float32 inputs: exactly the float32 layer
    torch.testing.assert_close(low.float(), expected, rtol=0.05, atol=0.05)


# --------------------------------------------------------------------------- the ResNet option
def _deformable(net: torch.nn.Module) -> list[str]:
    return [name for name, m in net.named_modules() if isinstance(m, ModulatedDeformConv2d)]


def test_dcn_stages_make_every_3x3_convolution_of_those_stages_deformable():
    r50 = _deformable(ResNet(depth=50, base_channels=16, dcn_stages=DCN_C3_C5))
    assert r50 == [f"layer{s}.{b}.conv2" for s, blocks in ((2, 4), (3, 6), (4, 3)) for b in range(blocks)]
    r18 = _deformable(ResNet(depth=18, base_channels=16, dcn_stages=(False, False, True, True)))
    assert r18 == [f"layer{s}.{b}.conv{c}" for s in (3, 4) for b in range(2) for c in (1, 2)]
    assert _deformable(ResNet(depth=50, base_channels=16)) == []


def test_resnext_and_se_blocks_keep_their_groups_and_se_with_dcn():
    net = ResNet(depth=50, groups=8, width_per_group=4, base_channels=16, se_reduction=16, dcn_stages=DCN_C3_C5)
    conv = net.layer3[0].conv2
    assert isinstance(conv, ModulatedDeformConv2d) and conv.groups == 8 and conv.stride == (2, 2)
    assert conv.weight.shape == (32, 4, 3, 3) and net.layer3[0].se is not None
    assert conv.conv_offset.out_channels == 27 and conv.conv_offset.stride == (2, 2)


def test_dcn_leaves_output_shapes_and_output_shape_unchanged():
    x = torch.rand(1, 3, 64, 96)
    plain = ResNet(depth=50, base_channels=16, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2))
    dcn = ResNet(depth=50, base_channels=16, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2), dcn_stages=DCN_C3_C5)
    assert dcn.output_shape() == plain.output_shape()
    with torch.no_grad():
        assert {k: v.shape for k, v in dcn(x).items()} == {k: v.shape for k, v in plain(x).items()}


def test_torchvision_weights_load_with_only_the_offset_convolutions_new_and_give_the_plain_outputs(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no missing-key warning: the offset convolutions are expected new
        net = ResNet(depth=50, dcn_stages=DCN_C3_C5, pretrained=str(path)).eval()
    missing = set(net.state_dict()) - set(reference.state_dict())
    assert missing == new_parameter_keys(net) and len(missing) == 2 * 13
    assert all(".conv2.conv_offset." in k for k in missing)
    assert torch.equal(net.layer2[0].conv2.weight, reference.layer2[0].conv2.weight)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        expected, got = torchvision_stages(reference, x), net(x)
    for name, ref in zip(got, expected):
        torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_a_missing_main_weight_of_a_deformable_stage_is_still_reported(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer3.0.conv2.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.warns(UserWarning, match=r"missing keys \['layer3.0.conv2.weight'\]$"):
        ResNet(depth=18, dcn_stages=DCN_C3_C5, pretrained=str(path))


def test_fold_norm_with_dcn_equals_the_unfolded_network():
    # In float64: in float32 the rounding differences of the fold move the next layers' offsets, and
    # bilinear sampling amplifies them over the stages (about 1e-3 at c5), which would hide a real error.
    torch.manual_seed(0)
    net = ResNet(depth=18, base_channels=16, norm="FrozenBN", dcn_stages=DCN_C3_C5, fold_norm=True).eval().double()
    for name in _deformable(net):
        _with_random_offsets(net.get_submodule(name))
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        folded = net(x)
        for m in net.modules():
            if hasattr(m, "fold_norm"):
                m.fold_norm = False
        unfolded = net(x)
    for name in folded:
        torch.testing.assert_close(folded[name], unfolded[name], rtol=1e-10, atol=1e-10)


def test_mask_rcnn_with_a_dcn_backbone_trains_its_offset_convolutions():
    torch.manual_seed(0)
    cfg = mask_config()
    cfg["backbone"]["dcn_stages"] = [False, True, True, True]
    model = MODELS.build(cfg, path="model").train()
    images, targets = synthetic_batch()
    losses = model(images, masks_of(images, targets))
    sum(losses.values()).backward()
    offsets = [model.backbone.get_submodule(name).conv_offset for name in _deformable(model.backbone)]
    assert len(offsets) == 12 and "loss_mask" in losses  # two 3x3 convolutions per basic block, c3..c5
    assert all(conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0 for conv in offsets)
    assert all(conv.bias.grad.abs().sum() > 0 for conv in offsets)


@pytest.mark.parametrize("value,key,match", [
    ([True, True, True], "model.backbone", "dcn_stages must be four booleans, one per stage c2..c5"),
    ([0, 1, 1, 1], "model.backbone.dcn_stages", "'dcn_stages' must be a list of true or false"),
    ("c3", "model.backbone.dcn_stages", "'dcn_stages' must be a list of true or false"),
])
def test_bad_dcn_stages_are_config_errors_naming_the_key(value, key, match):
    cfg = segkit.load_config("quickstart_mask")
    cfg["model"]["backbone"]["dcn_stages"] = value
    with pytest.raises(ConfigError, match=match) as err:
        segkit.build_model(cfg)
    assert err.value.key == key


def test_a_frozen_deformable_stage_is_a_config_error():
    with pytest.raises(ValueError, match=r"dcn_stages makes c2 deformable but frozen_stages=1"):
        ResNet(depth=18, dcn_stages=(True, True, True, True), frozen_stages=1)


@pytest.mark.parametrize("kwargs,match", [({"dcn_deform_groups": 0}, "dcn_deform_groups must be a positive"),
                                          ({"dcn_mask_scale": -1}, "dcn_mask_scale must be a positive")])
def test_bad_dcn_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResNet(depth=18, dcn_stages=DCN_C3_C5, **kwargs)
