"""The ResNet family (ResNet, ResNeXt, SE-ResNet, SE-ResNeXt, SENet-154): reference parity, weights, options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from segkit.checkpoint import CheckpointError
from segkit.cli import main
from segkit.errors import ConfigError
from segkit_plugins.backbones.resnet_weights import convert_timm_resnet, infer_resnet_arch
from segkit.ops import ShapeSpec
from segkit.registry import BACKBONES
from tests.reference import torchvision_stages

timm = pytest.importorskip("timm")
# Looked up through the registry, so that discovery (not this import) registers the plugin modules.
ResNet = BACKBONES.get("ResNet")

VARIANTS = ("ResNet", "ResNeXt", "SEResNet", "SEResNeXt", "SENet154")


def _randomise_statistics(net: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial running statistics, so that eval-mode BatchNorm is really exercised."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _build(cfg: dict) -> torch.nn.Module:
    return BACKBONES.build(cfg, path="model.backbone").eval()


def _assert_same_stages(ours: torch.nn.Module, expected: list[torch.Tensor], x: torch.Tensor) -> None:
    with torch.no_grad():
        got = ours(x)
    assert list(got) == ["c2", "c3", "c4", "c5"]
    for name, ref in zip(got, expected):
        torch.testing.assert_close(got[name], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tv_name,cfg", [
    ("resnet50", {"type": "ResNet", "depth": 50}),
    ("resnext50_32x4d", {"type": "ResNeXt"}),
])
def test_torchvision_weights_give_identical_stage_outputs(tmp_path: Path, tv_name: str, cfg: dict):
    torch.manual_seed(0)
    reference = _randomise_statistics(getattr(torchvision.models, tv_name)(weights=None))
    path = tmp_path / f"{tv_name}.pth"
    torch.save(reference.state_dict(), path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = torchvision_stages(reference, x)
    _assert_same_stages(_build({**cfg, "pretrained": str(path)}), expected, x)


def test_timm_seresnext_weights_give_identical_stage_outputs(tmp_path: Path):
    torch.manual_seed(0)
    reference = _randomise_statistics(timm.create_model("seresnext50_32x4d"))
    path = tmp_path / "seresnext50.pth"
    torch.save(reference.state_dict(), path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, indices=4, intermediates_only=True)
    ours = _build({"type": "SEResNeXt", "pretrained": str(path)})
    _assert_same_stages(ours, expected, x)


def test_timm_legacy_senet154_weights_give_identical_stage_outputs():
    torch.manual_seed(0)
    reference = _randomise_statistics(timm.create_model("legacy_senet154"))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, indices=4, intermediates_only=True)
    ours = _build({"type": "SENet154"})
    ours.load_state_dict(convert_timm_resnet(reference.state_dict()), strict=True)
    _assert_same_stages(ours, expected, x)


def test_timm_deep_stem_weights_give_identical_stage_outputs(tmp_path: Path):
    torch.manual_seed(0)
    reference = _randomise_statistics(timm.create_model("resnet50c"))
    path = tmp_path / "resnet50c.pth"
    torch.save(reference.state_dict(), path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, indices=4, intermediates_only=True)
    ours = _build({"type": "ResNet", "stem": "deep", "pretrained": str(path), "pretrained_format": "timm"})
    _assert_same_stages(ours, expected, x)


def test_dilated_resnet50_at_output_stride_8_loads_torchvision_weights(tmp_path: Path):
    reference = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    net = ResNet(depth=50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), pretrained=str(path)).eval()
    torch.testing.assert_close(net.layer4[2].conv2.weight, reference.layer4[2].conv2.weight)
    with torch.no_grad():
        outputs = net(torch.rand(1, 3, 64, 64))
    assert outputs["c5"].shape == (1, 2048, 8, 8) and outputs["c4"].shape == (1, 1024, 8, 8)
    assert [s.stride for s in net.output_shape().values()] == [4, 8, 8, 8]
    assert net.layer4[0].conv2.dilation == (4, 4) and net.layer3[0].conv2.stride == (1, 1)


def test_output_stride_16_and_multi_grid_rates():
    net = ResNet(depth=50, base_channels=8, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2), multi_grid=(1, 2, 4))
    assert net.output_shape()["c5"] == ShapeSpec(256, 16)
    assert [b.conv2.dilation[0] for b in net.layer4] == [2, 4, 8]
    with torch.no_grad():
        assert net.eval()(torch.rand(1, 3, 64, 64))["c5"].shape == (1, 256, 4, 4)

def test_contract_dilation_gives_torchvision_replace_stride_with_dilation_rates():
    """torchvision's dilated stages keep the previous rate in their first block (DeepLabV3, FCN)."""
    with torch.device("meta"):
        reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
        net = ResNet(depth=50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True)
        every = ResNet(depth=50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        expected = [(b.conv2.dilation, b.conv2.stride, b.conv2.padding) for b in getattr(reference, stage)]
        assert [(b.conv2.dilation, b.conv2.stride, b.conv2.padding) for b in getattr(net, stage)] == expected
    assert [b.conv2.dilation[0] for b in net.layer4] == [2, 4, 4]
    assert [b.conv2.dilation[0] for b in every.layer4] == [4, 4, 4]
    with torch.device("meta"):
        grid = ResNet(depth=50, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2), multi_grid=(1, 2, 4), contract_dilation=True)
    assert [b.conv2.dilation[0] for b in grid.layer4] == [2, 4, 8]  # multi-grid rates win in the last stage



# Parameter counts without the classifier, from torchvision 0.29 / timm 1.0.
_PARAMETERS = [
    ({"type": "ResNet", "depth": 18}, 11176512),
    ({"type": "ResNet", "depth": 34}, 21284672),
    ({"type": "ResNet", "depth": 50}, 23508032),
    ({"type": "ResNet", "depth": 101}, 42500160),
    ({"type": "ResNet", "depth": 152}, 58143808),
    ({"type": "ResNeXt"}, 22979904),
    ({"type": "ResNeXt", "depth": 101, "width_per_group": 8}, 86742336),
    ({"type": "ResNeXt", "depth": 101, "groups": 64}, 81406272),
    ({"type": "SEResNet"}, 26039024),
    ({"type": "SEResNet", "depth": 101}, 47277872),
    ({"type": "SEResNet", "depth": 152}, 64772848),
    ({"type": "SEResNeXt"}, 25510896),
    ({"type": "SEResNeXt", "depth": 101}, 46906416),
    ({"type": "SENet154"}, 113039984),
]


@pytest.mark.parametrize("cfg,expected", _PARAMETERS, ids=lambda v: str(v) if isinstance(v, int) else None)
def test_parameter_count_equals_the_reference(cfg: dict, expected: int):
    with torch.device("meta"):
        net = _build(cfg)
    assert sum(p.numel() for p in net.parameters()) == expected


@pytest.mark.parametrize("cfg,reference", [
    ({"type": "ResNet", "depth": 34}, lambda: torchvision.models.resnet34(weights=None)),
    ({"type": "SEResNet", "depth": 50}, lambda: timm.create_model("seresnet50")),
])
def test_parameter_count_equals_a_live_reference(cfg: dict, reference):
    with torch.device("meta"):
        ours, ref = _build(cfg), reference()
    head = ("fc.", "last_linear.")
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for k, p in ref.named_parameters() if not k.startswith(head))


def test_unknown_depth_names_the_valid_depths():
    with pytest.raises((ConfigError, ValueError), match=r"\[18, 34, 50, 101, 152\]"):
        _build({"type": "SEResNeXt", "depth": 42})


def test_unknown_variant_names_the_valid_choices():
    with pytest.raises((ConfigError, ValueError), match="resnet, senet"):
        _build({"type": "ResNet", "variant": "densenet"})


def test_fixed_options_of_senet154_are_refused_by_the_registry():
    with pytest.raises(ConfigError, match="model.backbone.depth"):
        _build({"type": "SENet154", "depth": 101})


def test_basic_blocks_refuse_groups():
    with pytest.raises(ValueError, match="basic blocks"):
        ResNet(depth=18, groups=32, width_per_group=4)


def test_checkpoint_of_another_architecture_names_the_key(tmp_path: Path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(CheckpointError, match="'layer1.0.conv1.weight'.*check depth"):
        ResNet(depth=50, pretrained=str(path))


def test_checkpoint_sharing_no_key_is_refused(tmp_path: Path):
    state = {f"backbone.body.{k}": v for k, v in ResNet(depth=18, base_channels=8).state_dict().items()}
    path = tmp_path / "detector.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="share no key.*backbone.body.conv1.weight"):
        ResNet(depth=18, base_channels=8, pretrained=str(path))


def test_truncated_checkpoint_is_refused(tmp_path: Path):
    path = tmp_path / "r18.pth"
    torch.save(ResNet(depth=18, base_channels=8).state_dict(), path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated"):
        ResNet(depth=18, base_channels=8, pretrained=str(path))


def test_unknown_pretrained_format_names_the_choices(tmp_path: Path):
    with pytest.raises(ValueError, match="auto, torchvision, timm, segkit"):
        ResNet(depth=18, base_channels=8, pretrained=str(tmp_path / "x.pth"), pretrained_format="caffe")


def test_convert_timm_writes_a_segkit_checkpoint_that_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    torch.manual_seed(0)
    reference = timm.create_model("seresnet18")
    src, dst = tmp_path / "timm.pth", tmp_path / "out" / "segkit.pth"
    torch.save(reference.state_dict(), src)
    assert main(["convert", "--from", "timm", str(src), str(dst)]) == 0
    assert "se_reduction: 16" in capsys.readouterr().out
    ckpt = torch.load(dst, weights_only=True)
    assert ckpt["segkit_backbone"]["depth"] == 18 and ckpt["segkit_backbone"]["source"] == "timm"
    net = ResNet(depth=18, se_reduction=16, pretrained=str(dst))
    torch.testing.assert_close(net.layer2[0].se.fc1.weight, reference.layer2[0].se.fc1.weight)
    with pytest.raises(CheckpointError, match="se_reduction=16 in the file but None"):
        ResNet(depth=18, pretrained=str(dst))


def test_convert_torchvision_infers_the_architecture(tmp_path: Path):
    with torch.device("meta"):
        state = torchvision.models.resnext101_64x4d(weights=None).state_dict()
    assert infer_resnet_arch(convert_timm_resnet(state)) == {
        "depth": 101, "groups": 64, "width_per_group": 4, "se_reduction": None, "variant": "resnet",
        "stem": "default", "stem_channels": 64, "base_channels": 64,
    }


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code), capsys.readouterr().err


def test_convert_with_a_missing_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code, err = _run_cli(["convert", "--from", "timm", str(tmp_path / "nope.pth"), str(tmp_path / "o.pth")], capsys)
    assert code == 2 and "nope.pth" in err and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "o.pth").exists()


def test_convert_of_a_non_resnet_state_dict_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    src = tmp_path / "vit.pth"
    torch.save({"conv_proj.weight": torch.zeros(8, 3, 16, 16)}, src)
    code, err = _run_cli(["convert", "--from", "torchvision", str(src), str(tmp_path / "o.pth")], capsys)
    message = " ".join(err.split())
    assert code == 2 and "no torchvision converter recognises this state dict (first keys: conv_proj.weight)" in message
    assert "TorchvisionResNet: torchvision resnet*/resnext* backbones" in message


def test_list_backbones_shows_every_variant_with_its_signature(capsys: pytest.CaptureFixture[str]):
    assert main(["list", "backbones"]) == 0
    out = capsys.readouterr().out
    for name in VARIANTS:
        assert f"  {name} " in out
    assert "se_reduction=16" in out and "groups=32" in out


def test_drop_path_is_off_in_eval_and_grows_over_the_blocks():
    torch.manual_seed(0)
    plain = ResNet(depth=18, base_channels=8).eval()
    dropping = ResNet(depth=18, base_channels=8, drop_path_rate=0.3).eval()
    dropping.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dropping(x)["c5"], plain(x)["c5"])
    assert plain.layer1[0].drop_path is None and dropping.layer1[0].drop_path is None
    assert dropping.layer4[1].drop_path.p == pytest.approx(0.3)


@pytest.mark.parametrize("norm", ["SyncBN", "GN", "FrozenBN"])
def test_every_norm_trains_on_cpu(norm: str):
    net = _build({"type": "SEResNeXt", "base_channels": 16, "groups": 4, "norm": norm}).train()
    net(torch.rand(2, 3, 64, 64))["c5"].sum().backward()


def test_deep_stem_is_frozen_with_frozen_stages_0():
    net = ResNet(depth=50, base_channels=8, stem="deep", frozen_stages=0).train()
    assert not any(p.requires_grad for m in (net.conv1, net.bn2, net.conv3) for p in m.parameters())
    assert not net.bn3.training and net.layer1[0].bn1.training
