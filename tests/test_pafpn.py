"""PAFPN neck: output contract, bottom-up wiring against a manual computation, options, detector use."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segkit.errors import ConfigError
from segkit.ops import ShapeSpec
from segkit.registry import BACKBONES, MODELS, NECKS
from segkit_plugins.necks.fpn import FPN
from segkit_plugins.necks.pafpn import PAFPN

from test_detector import synthetic_batch, tiny_config

SHAPES = {"c2": ShapeSpec(8, 4), "c3": ShapeSpec(16, 8), "c4": ShapeSpec(24, 16), "c5": ShapeSpec(32, 32)}


def _features(batch: int = 2, size: int = 40) -> dict[str, torch.Tensor]:
    """Random backbone maps for SHAPES on a ``size`` x ``size`` image (float64 for exact comparisons)."""
    g = torch.Generator().manual_seed(0)
    return {
        name: torch.randn(batch, s.channels, math.ceil(size / s.stride), math.ceil(size / s.stride),
                          generator=g, dtype=torch.float64)
        for name, s in SHAPES.items()
    }


def _neck(**options) -> PAFPN:
    """A float64 PAFPN without norm whose conv biases are non-zero, so they take part in the checks."""
    torch.manual_seed(0)
    neck = PAFPN(in_shapes=SHAPES, out_channels=8, **options).double().eval()
    with torch.no_grad():
        for module in neck.modules():
            if isinstance(module, torch.nn.Conv2d) and module.bias is not None:
                module.bias.normal_(0, 0.1)
    return neck


def _top_down(neck: PAFPN, features) -> list[torch.Tensor]:
    """P2..P5 from the neck's own FPN part (FPN.forward with the same weights)."""
    return list(FPN.forward(neck, features).values())[:4]


def _conv(block: torch.nn.Sequential, x: torch.Tensor, stride: int) -> torch.Tensor:
    conv = block[0]
    return F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=1)


# ------------------------------------------------------------------------------- output contract
def test_registered_and_discoverable():
    assert NECKS.get("PAFPN") is PAFPN


def test_outputs_match_output_shape_on_resnet18():
    backbone = BACKBONES.build({"type": "ResNet", "depth": 18, "base_channels": 16}, path="model.backbone")
    neck = NECKS.build({"type": "PAFPN", "out_channels": 32}, path="model.neck", in_shapes=backbone.output_shape())
    image = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        outputs = neck(backbone(image))
    shapes = neck.output_shape()
    assert list(outputs) == list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    for name, tensor in outputs.items():
        stride = shapes[name].stride
        assert shapes[name].channels == 32
        assert tensor.shape == (2, 32, math.ceil(96 / stride), math.ceil(128 / stride)), name


def test_output_shape_equals_fpn_output_shape():
    for extra_block in ("maxpool", None):
        fpn = FPN(in_shapes=SHAPES, out_channels=8, extra_block=extra_block)
        assert PAFPN(in_shapes=SHAPES, out_channels=8, extra_block=extra_block).output_shape() == fpn.output_shape()


def test_parameter_names():
    names = {n for n, _ in PAFPN(in_shapes=SHAPES, out_channels=8, norm="GN").named_parameters()}
    for i in range(3):
        assert {f"downsample_convs.{i}.0.weight", f"downsample_convs.{i}.1.weight",
                f"bottom_up_convs.{i}.0.weight", f"bottom_up_convs.{i}.1.weight"} <= names
    assert "downsample_convs.3.0.weight" not in names
    assert not any(n.endswith("0.bias") for n in names)  # no conv bias with a norm
    assert "bottom_up_convs.0.0.bias" in {n for n, _ in PAFPN(in_shapes=SHAPES, out_channels=8).named_parameters()}


# ------------------------------------------------------------------------------------ wiring
def test_n2_equals_p2():
    neck, features = _neck(), _features()
    with torch.no_grad():
        assert torch.equal(neck(features)["p2"], _top_down(neck, features)[0])


def test_output_wiring_matches_manual_formula():
    neck, features = _neck(bottom_up_input="output"), _features()
    with torch.no_grad():
        outputs = list(neck(features).values())
        p = _top_down(neck, features)
        n = [p[0]]
        for i in range(3):  # N(i+1) = relu(conv(relu(down(N_i)) + P(i+1)))
            down = F.relu(_conv(neck.downsample_convs[i], n[i], stride=2))
            n.append(F.relu(_conv(neck.bottom_up_convs[i], down + p[i + 1], stride=1)))
    for k in range(4):
        torch.testing.assert_close(outputs[k], n[k], rtol=0, atol=1e-12)


def test_sum_wiring_matches_its_formula_and_differs_from_output():
    neck, features = _neck(bottom_up_input="sum"), _features()
    with torch.no_grad():
        outputs = list(neck(features).values())
        p = _top_down(neck, features)
        sums, n = [p[0]], [p[0]]
        for i in range(3):  # S(i+1) = relu(down(S_i)) + P(i+1);  N(i+1) = relu(conv(S(i+1)))
            sums.append(F.relu(_conv(neck.downsample_convs[i], sums[i], stride=2)) + p[i + 1])
            n.append(F.relu(_conv(neck.bottom_up_convs[i], sums[-1], stride=1)))
        neck.bottom_up_input = "output"  # same weights, the paper's wiring
        paper = list(neck(features).values())
    for k in range(4):
        torch.testing.assert_close(outputs[k], n[k], rtol=0, atol=1e-12)
    torch.testing.assert_close(outputs[1], paper[1], rtol=0, atol=1e-12)  # N3 only sees N2 = S2 = P2
    assert not torch.allclose(outputs[2], paper[2])
    assert not torch.allclose(outputs[3], paper[3])


def test_p6_is_max_pool_of_n5():
    neck, features = _neck(), _features()
    with torch.no_grad():
        outputs = neck(features)
    assert torch.equal(outputs["p6"], F.max_pool2d(outputs["p5"], kernel_size=1, stride=2))
    assert outputs["p6"].shape[-2:] == (1, 1)  # 40 px: p5 is 2x2


def test_no_extra_block_gives_p2_to_p5():
    neck, features = _neck(extra_block=None), _features()
    with torch.no_grad():
        assert list(neck(features)) == ["p2", "p3", "p4", "p5"]


def test_bottom_up_off_is_fpn_with_the_same_weights():
    torch.manual_seed(1)
    fpn = FPN(in_shapes=SHAPES, out_channels=8).double().eval()
    neck = PAFPN(in_shapes=SHAPES, out_channels=8, bottom_up=False).double().eval()
    neck.load_state_dict(fpn.state_dict(), strict=True)
    features = _features()
    with torch.no_grad():
        expected, actual = fpn(features), neck(features)
    assert list(actual) == list(expected)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_fpn_weights_load_into_the_top_down_path():
    fpn = FPN(in_shapes=SHAPES, out_channels=8)
    missing, unexpected = PAFPN(in_shapes=SHAPES, out_channels=8).load_state_dict(fpn.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(k.startswith(("downsample_convs.", "bottom_up_convs.")) for k in missing)


# ------------------------------------------------------------------------------------ norms
@pytest.mark.parametrize(("norm", "norm_type"), [
    ("BN", torch.nn.BatchNorm2d), ("SyncBN", torch.nn.SyncBatchNorm), ("GN", torch.nn.GroupNorm),
])
def test_norm_variants_train(norm, norm_type):
    torch.manual_seed(0)
    neck = PAFPN(in_shapes=SHAPES, out_channels=8, norm=norm).train()
    layers = [m for m in neck.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm, torch.nn.GroupNorm))]
    assert len(layers) == 4 + 4 + 3 + 3 and all(type(m) is norm_type for m in layers)
    features = {k: v.float() for k, v in _features().items()}
    outputs = neck(features)
    sum(o.square().mean() for o in outputs.values()).backward()
    for name, param in neck.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------ detector
def test_two_stage_detector_with_pafpn_trains_and_infers():
    torch.manual_seed(0)
    model = MODELS.build(tiny_config(neck={"type": "PAFPN", "out_channels": 32}), path="model")
    assert isinstance(model.neck, PAFPN)
    images, targets = synthetic_batch()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.neck.bottom_up_convs[-1][0].weight.grad.abs().sum() > 0
    optimizer.step()
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    assert all(d["boxes"].shape[-1] == 4 and d["boxes"].dtype == torch.float32 for d in detections)


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(("option", "value"), [("norm", "LayerNorm"), ("bottom_up_input", "input")])
def test_bad_option_is_an_error_naming_it(option, value):
    with pytest.raises(ValueError, match=option):
        PAFPN(in_shapes=SHAPES, **{option: value})
    with pytest.raises(ConfigError, match=option) as info:
        MODELS.build(tiny_config(neck={"type": "PAFPN", "out_channels": 32, option: value}), path="model")
    assert "model.neck" in str(info.value)


def test_non_consecutive_levels_need_bottom_up_off():
    with pytest.raises(ValueError, match="bottom_up"):
        PAFPN(in_shapes=SHAPES, in_features=("c3", "c5"))
    assert list(PAFPN(in_shapes=SHAPES, in_features=("c3", "c5"), bottom_up=False).output_shape()) == ["p3", "p5", "p6"]


@pytest.mark.parametrize("extra_from", ["output", "input"])
def test_p6p7_come_from_n5_or_c5_through_two_stride_2_convs(extra_from):
    neck, features = _neck(in_features=("c3", "c4", "c5"), extra_block="p6p7", extra_from=extra_from), _features()
    with torch.no_grad():
        outputs = neck(features)
        source = features["c5"] if extra_from == "input" else outputs["p5"]
        first, second = neck.extra_convs
        p6 = F.conv2d(source, first.weight, first.bias, stride=2, padding=1)
        p7 = F.conv2d(F.relu(p6), second.weight, second.bias, stride=2, padding=1)
    assert list(outputs) == list(neck.output_shape()) == ["p3", "p4", "p5", "p6", "p7"]
    torch.testing.assert_close(outputs["p6"], p6, rtol=0, atol=1e-12)
    torch.testing.assert_close(outputs["p7"], p7, rtol=0, atol=1e-12)
    # The augmented N5 differs from the top-down P5, so P6 is not the FPN's.
    fpn_p6 = FPN.forward(neck, features)["p6"]
    assert (extra_from == "input") == torch.allclose(outputs["p6"], fpn_p6)
