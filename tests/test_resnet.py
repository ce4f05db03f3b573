"""ResNet backbone: torchvision weight compatibility, freezing, shapes."""

from __future__ import annotations

import pytest
import torch
import torchvision

from segkit.ops import ShapeSpec
from segkit.registry import BACKBONES
from segkit_plugins.backbones.resnet import ResNet
from tests.reference import torchvision_stages


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_state_dict_loads_and_gives_identical_stage_outputs(tmp_path, depth):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    # non-trivial running statistics, so that eval-mode BN is really exercised
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet.pth"
    torch.save(reference.state_dict(), path)

    ours = BACKBONES.build({"type": "ResNet", "depth": depth, "pretrained": str(path)}, path="model.backbone").eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        expected = torchvision_stages(reference, x)
        got = ours(x)
    assert list(got) == ["c2", "c3", "c4", "c5"]
    for name, ref in zip(got, expected):
        torch.testing.assert_close(got[name], ref, atol=1e-5, rtol=1e-5)


def test_state_dict_under_model_key_loads_and_fc_is_ignored(tmp_path, recwarn):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": reference.state_dict()}, path)
    ours = ResNet(depth=18, pretrained=str(path))
    torch.testing.assert_close(ours.conv1.weight, reference.conv1.weight)
    assert not [w for w in recwarn if "keys" in str(w.message)]


def test_missing_and_unexpected_keys_are_reported_with_a_warning(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer4.1.bn2.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.warns(UserWarning, match=r"missing keys \['layer4.1.bn2.weight'\].*unexpected keys \['extra.weight'\]"):
        ResNet(depth=18, pretrained=str(path))


def test_shape_mismatch_error_names_key_shapes_and_file(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError) as err:
        ResNet(depth=18, base_channels=32, pretrained=str(path))
    message = str(err.value)
    assert "'conv1.weight'" in message and "(64, 3, 7, 7)" in message and "(32, 3, 7, 7)" in message
    assert str(path) in message


def test_frozen_stages_disable_gradients_of_stem_and_early_stages():
    net = ResNet(depth=18, base_channels=16, frozen_stages=2)
    frozen = [net.conv1, net.bn1, net.layer1, net.layer2]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in (net.layer3, net.layer4) for p in m.parameters())
    net.train()
    assert not net.layer2[0].bn1.training and net.layer3[0].bn1.training


def test_frozen_stage_batchnorm_statistics_stay_fixed_in_training():
    net = ResNet(depth=18, base_channels=16, frozen_stages=1).train()
    before_frozen = net.layer1[0].bn1.running_mean.clone()
    before_free = net.layer2[0].bn1.running_mean.clone()
    net(torch.rand(2, 3, 64, 64))
    torch.testing.assert_close(net.layer1[0].bn1.running_mean, before_frozen)
    assert not torch.equal(net.layer2[0].bn1.running_mean, before_free)


def test_frozen_bn_keeps_statistics_and_affine_through_an_optimizer_step():
    net = ResNet(depth=18, base_channels=16, norm="FrozenBN").train()
    bn = net.layer2[0].bn1
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net(torch.rand(2, 3, 64, 64))["c5"].sum().backward()
    opt.step()
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(value, state[key])
    assert all(not p.requires_grad for p in bn.parameters())


def test_norm_eval_keeps_every_batchnorm_in_eval_mode():
    net = ResNet(depth=18, base_channels=16, norm_eval=True).train()
    assert all(not m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert net.training


# ------------------------------------------------------------------------------ fold_norm
def _randomise_norms(net: torch.nn.Module, seed: int = 0) -> None:
    """Statistics and affine away from the identity, so a fold that drops or misplaces a term shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "running_var") and m.running_var is not None:
                n = m.running_var.numel()
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def _with_fold(net: ResNet, fold: bool) -> ResNet:
    for m in net.modules():
        if hasattr(m, "fold_norm"):
            m.fold_norm = fold
    return net


@pytest.mark.parametrize("norm,mode", [("FrozenBN", "train"), ("BN", "eval")])
def test_fold_norm_is_as_accurate_as_the_unfolded_network(norm, mode):
    torch.manual_seed(0)
    net = ResNet(depth=50, base_channels=16, norm=norm, frozen_stages=1, fold_norm=True)
    _randomise_norms(net)
    net.train(mode == "train")
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        folded = net(x)
        plain = _with_fold(net, False)(x)
        exact = net.double()(x.double())
    for name, value in folded.items():
        # Both float32 orders of operations err from the float64 result by the same amount.
        err_fold = (value.double() - exact[name]).abs().max().item()
        err_plain = (plain[name].double() - exact[name]).abs().max().item()
        assert err_fold <= 2 * err_plain + 1e-6, (name, err_fold, err_plain)
        scale = exact[name].abs().max().item()
        assert (value - plain[name]).abs().max().item() <= 5e-6 * scale, name
        assert not torch.equal(value, plain[name])  # the fold took effect: another rounding


def test_fold_norm_trains_a_batchnorm_kept_in_eval_mode_with_the_same_gradients():
    torch.manual_seed(0)
    grads = {}
    for fold in (True, False):
        torch.manual_seed(0)
        net = ResNet(depth=18, base_channels=16, norm_eval=True, fold_norm=fold).train()
        _randomise_norms(net)
        net(torch.rand(2, 3, 64, 64))["c5"].square().mean().backward()
        grads[fold] = {k: p.grad for k, p in net.named_parameters()}
    assert grads[True]["layer2.0.bn1.weight"].abs().sum() > 0  # the norm's affine learns through the fold
    for key, grad in grads[False].items():
        torch.testing.assert_close(grads[True][key], grad, rtol=1e-3, atol=1e-6, msg=key)


@pytest.mark.parametrize("autocast", [False, True], ids=["float64", "bf16_autocast"])
def test_fold_conv_norm_gives_the_gradients_of_conv_then_norm(autocast):
    from segkit.ops import fold_conv_norm

    dtype = torch.float32 if autocast else torch.float64
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=True).to(dtype)
    norm = torch.nn.BatchNorm2d(6).to(dtype).eval()
    _randomise_norms(norm)
    x = torch.rand(2, 4, 9, 11, dtype=dtype, requires_grad=True)
    grads = []
    for fold in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fold_conv_norm(conv, norm, x, fold)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        params = (x, conv.weight, conv.bias, norm.weight, norm.bias)
        grads.append([p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    tolerance = {"rtol": 3e-2, "atol": 3e-2} if autocast else {"rtol": 1e-10, "atol": 1e-12}
    for folded, plain in zip(*grads):
        assert folded.dtype == plain.dtype
        torch.testing.assert_close(folded, plain, **tolerance)


def test_fold_norm_leaves_batchnorm_in_training_mode_alone():
    outputs, stats = [], []
    for fold in (True, False):
        torch.manual_seed(0)
        net = ResNet(depth=18, base_channels=16, fold_norm=fold).train()
        outputs.append(net(torch.rand(2, 3, 64, 64))["c5"])
        stats.append(net.layer3[0].bn2.running_var.clone())
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(stats[0], stats[1])


def test_fold_norm_keeps_the_hooks_of_a_hooked_norm():
    net = ResNet(depth=18, base_channels=16, norm="FrozenBN", fold_norm=True).eval()
    seen = []
    net.layer2[0].bn1.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    net(torch.rand(1, 3, 64, 64))
    assert seen == [(1, 32, 8, 8)]


@pytest.mark.parametrize("depth,out_indices", [(18, (0, 1, 2, 3)), (50, (1, 3))])
def test_output_shape_matches_the_returned_maps(depth, out_indices):
    net = ResNet(depth=depth, base_channels=16, out_indices=out_indices).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        outputs = net(x)
    shapes = net.output_shape()
    assert list(outputs) == list(shapes) == [f"c{i + 2}" for i in out_indices]
    for name, feature in outputs.items():
        assert feature.shape[1] == shapes[name].channels
        assert x.shape[-1] // feature.shape[-1] == shapes[name].stride


def test_base_channels_scales_every_stage():
    assert ResNet(depth=50).output_shape()["c2"] == ShapeSpec(256, 4)
    assert ResNet(depth=50, base_channels=16).output_shape() == {
        "c2": ShapeSpec(64, 4), "c3": ShapeSpec(128, 8), "c4": ShapeSpec(256, 16), "c5": ShapeSpec(512, 32),
    }
    assert ResNet(depth=18, base_channels=8).output_shape()["c5"] == ShapeSpec(64, 32)


def test_zero_init_residual_zeroes_the_last_norm_of_each_block():
    net = ResNet(depth=50, base_channels=8, zero_init_residual=True)
    assert torch.count_nonzero(net.layer3[2].bn3.weight) == 0
    assert torch.count_nonzero(net.layer3[2].bn2.weight) > 0


def test_group_norm_variant_runs():
    net = ResNet(depth=18, base_channels=16, norm="GN")
    assert isinstance(net.bn1, torch.nn.GroupNorm)
    assert net(torch.rand(1, 3, 64, 64))["c5"].shape == (1, 128, 2, 2)


def test_bad_depth_is_a_clear_error():
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNet(depth=42)
