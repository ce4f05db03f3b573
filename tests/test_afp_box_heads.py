"""PANet adaptive feature pooling box heads: per-level first layers, max/sum fusion, detector wiring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segkit.ops import ShapeSpec
from segkit.registry import HEADS, MODELS
from segkit_plugins.heads.afp_box_heads import AFPConvFCHead, AFPTwoFCHead, fuse_levels
from segkit_plugins.heads.box_heads import ConvFCHead, TwoFCHead
from test_detector import synthetic_batch, tiny_config

L, R, C, S = 4, 6, 8, 5


def two_fc(**options) -> AFPTwoFCHead:
    return AFPTwoFCHead(in_channels=C, resolution=S, **{"num_levels": L, "fc_dim": 16, **options})


def conv_fc(**options) -> AFPConvFCHead:
    return AFPConvFCHead(in_channels=C, resolution=S, **{
        "num_levels": L, "num_convs": 2, "conv_dim": 16, "num_fcs": 1, "fc_dim": 24, "norm": "GN", **options})


HEAD_FACTORIES = {"AFPTwoFCHead": two_fc, "AFPConvFCHead": conv_fc}


def pooled(seed: int = 0) -> torch.Tensor:
    return torch.rand(L, R, C, S, S, generator=torch.Generator().manual_seed(seed))


def first_layers(head) -> list[torch.nn.Module]:
    return list(head.fc6) if isinstance(head, AFPTwoFCHead) else [block[0] for block in head.convs[0]]


# ---------------------------------------------------------------------------- shapes and levels
@pytest.mark.parametrize("name, width", [("AFPTwoFCHead", 16), ("AFPConvFCHead", 24)])
def test_head_maps_rois_pooled_from_every_level_to_one_vector_per_roi(name, width):
    torch.manual_seed(0)
    head = HEAD_FACTORIES[name]()
    assert head.adaptive_pooling is True and head.out_channels == width
    assert head(pooled()).shape == (R, width)


@pytest.mark.parametrize("name", HEAD_FACTORIES)
@pytest.mark.parametrize("level", range(L))
def test_zeroing_any_single_level_changes_the_output_with_max_fusion(name, level):
    torch.manual_seed(0)
    head = HEAD_FACTORIES[name]().eval()
    x = pooled()
    zeroed = x.clone()
    zeroed[level] = 0
    with torch.no_grad():
        changed = (head(x) - head(zeroed)).abs().amax(dim=1) > 1e-6
    assert changed.any(), f"level {level} does not reach the output"


@pytest.mark.parametrize("name", HEAD_FACTORIES)
def test_per_level_first_layers_have_independent_weights(name):
    torch.manual_seed(0)
    head = HEAD_FACTORIES[name]()
    weights = [layer.weight for layer in first_layers(head)]
    assert len(weights) == L
    assert len({w.data_ptr() for w in weights}) == L
    assert all(not torch.equal(a, b) for i, a in enumerate(weights) for b in weights[i + 1:])
    head(pooled()).sum().backward()  # and each of them is trained
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in weights)


# ---------------------------------------------------------------------------- fusion against references
def _reduce(per_level: list[torch.Tensor], fusion: str) -> torch.Tensor:
    stacked = torch.stack(per_level)
    return stacked.amax(dim=0) if fusion == "max" else stacked.sum(dim=0)


@pytest.mark.parametrize("fusion", ["max", "sum"])
def test_two_fc_fusion_equals_manual_reference(fusion):
    torch.manual_seed(0)
    head = two_fc(fusion=fusion)
    x = pooled()
    per_level = [F.relu(F.linear(x[lv].flatten(1), fc.weight, fc.bias)) for lv, fc in enumerate(head.fc6)]
    expected = F.relu(F.linear(_reduce(per_level, fusion), head.fc7.weight, head.fc7.bias))
    torch.testing.assert_close(head(x), expected)


@pytest.mark.parametrize("fusion", ["max", "sum"])
def test_conv_fc_fusion_equals_manual_reference(fusion):
    torch.manual_seed(0)
    head = conv_fc(fusion=fusion)
    x = pooled()

    def conv_gn_relu(block, inputs):
        conv, gn = block[0], block[1]
        y = F.conv2d(inputs, conv.weight, conv.bias, padding=1)
        return F.relu(F.group_norm(y, gn.num_groups, gn.weight, gn.bias, gn.eps))

    fused = _reduce([conv_gn_relu(block, x[lv]) for lv, block in enumerate(head.convs[0])], fusion)
    y = conv_gn_relu(head.convs[1], fused).flatten(1)
    expected = F.relu(F.linear(y, head.fcs[0].weight, head.fcs[0].bias))
    torch.testing.assert_close(head(x), expected)


@pytest.mark.parametrize("fusion", ["max", "sum"])
@pytest.mark.parametrize("levels", [1, 3])
def test_fuse_levels_equals_relu_of_each_level_then_fusion_in_values_and_gradients(fusion, levels):
    # max applies one ReLU after the fusion; that must not change a value or a gradient, also where
    # two levels tie or every level is negative
    base = torch.randn(levels, 5, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    base[:, 0] = -1.0
    if levels > 1:
        base[1, 1] = base[0, 1].abs() + 5.0
        base[0, 1] = base[1, 1]
    grad = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    reference_in = base.clone().requires_grad_()
    expected = _reduce([F.relu(level) for level in reference_in], fusion)
    expected.backward(grad)
    segkit_in = base.clone().requires_grad_()
    got = fuse_levels((level * 1.0 for level in segkit_in), fusion)  # fresh tensors, like a conv's outputs
    got.backward(grad)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(segkit_in.grad, reference_in.grad, rtol=0, atol=0)


def test_max_and_sum_fusion_differ_with_the_same_weights():
    torch.manual_seed(0)
    head = two_fc()
    x = pooled()
    out_max = head(x)
    head.fusion = "sum"
    assert not torch.allclose(out_max, head(x))


# ---------------------------------------------------------------------------- plain-head compatibility
@pytest.mark.parametrize("afp, plain", [
    (lambda: two_fc(adaptive_pooling=False), lambda: TwoFCHead(in_channels=C, resolution=S, fc_dim=16)),
    (lambda: conv_fc(adaptive_pooling=False), lambda: ConvFCHead(
        in_channels=C, resolution=S, num_convs=2, conv_dim=16, num_fcs=1, fc_dim=24, norm="GN")),
])
def test_adaptive_pooling_off_is_the_plain_head(afp, plain):
    torch.manual_seed(0)
    head, reference = afp(), plain()
    assert head.adaptive_pooling is False
    head.load_state_dict(reference.state_dict())  # strict: identical parameter names and shapes
    x = pooled()[0]
    torch.testing.assert_close(head(x), reference(x))


def test_shared_layers_of_the_conv_head_keep_conv_fc_head_parameter_names():
    afp = conv_fc()
    plain = ConvFCHead(in_channels=C, resolution=S, num_convs=2, conv_dim=16, num_fcs=1, fc_dim=24, norm="GN")

    def shared(module):
        return {k: v.shape for k, v in module.state_dict().items() if not k.startswith("convs.0.")}

    assert shared(afp) == shared(plain) and set(shared(afp)) == {
        "convs.1.0.weight", "convs.1.1.weight", "convs.1.1.bias", "fcs.0.weight", "fcs.0.bias"}
    assert {k for k in afp.state_dict() if k.startswith("convs.0.")} == {
        f"convs.0.{lv}.{part}" for lv in range(L) for part in ("0.weight", "1.weight", "1.bias")}


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", HEAD_FACTORIES)
@pytest.mark.parametrize("options, match", [
    ({"fusion": "mean"}, "fusion must be one of"),
    ({"num_levels": 0}, "num_levels >= 1"),
])
def test_invalid_options_are_clear_errors(name, options, match):
    with pytest.raises(ValueError, match=match):
        HEAD_FACTORIES[name](**options)


def test_conv_head_without_convs_is_a_clear_error():
    with pytest.raises(ValueError, match="num_convs >= 1"):
        conv_fc(num_convs=0)


@pytest.mark.parametrize("name", HEAD_FACTORIES)
@pytest.mark.parametrize("shape", [(R, C, S, S), (L - 1, R, C, S, S)])
def test_input_without_one_pooling_per_level_is_a_clear_error(name, shape):
    with pytest.raises(ValueError, match=r"Tensor\[L=4, R, C, S, S\]"):
        HEAD_FACTORIES[name]()(torch.rand(shape))


# ---------------------------------------------------------------------------- registry and detector
def test_builds_through_the_registry():
    head = HEADS.build({"type": "AFPTwoFCHead"}, path="x", in_channels=8, resolution=7, num_levels=4)
    assert isinstance(head, AFPTwoFCHead) and len(head.fc6) == 4 and head.out_channels == 1024


def test_roi_head_sets_num_levels_from_its_in_features():
    shapes = {f"p{i}": ShapeSpec(channels=8, stride=2**i) for i in range(2, 6)}
    roi_head = HEADS.build({"type": "StandardRoIHead", "num_classes": 3, "in_features": ["p2", "p3", "p4"],
                            "box_head": {"type": "AFPConvFCHead", "num_convs": 1, "conv_dim": 8, "fc_dim": 16}},
                           path="model.roi_head", in_shapes=shapes)
    assert roi_head.box_head.num_levels == 3 and len(roi_head.box_head.convs[0]) == 3


DETECTOR_BOX_HEADS = {
    "AFPTwoFCHead": {"type": "AFPTwoFCHead", "fc_dim": 64},
    "AFPConvFCHead": {"type": "AFPConvFCHead", "num_convs": 2, "conv_dim": 16, "fc_dim": 32, "norm": "GN"},
}


def _detector(box_head: dict):
    config = tiny_config()
    config["roi_head"] = {**config["roi_head"], "box_head": box_head}
    model = MODELS.build(config, path="model")
    inputs: list[tuple[int, ...]] = []
    model.roi_heads.box_head.register_forward_pre_hook(lambda module, args: inputs.append(tuple(args[0].shape)))
    return model, inputs


@pytest.mark.parametrize("name", DETECTOR_BOX_HEADS)
def test_detector_trains_with_afp_and_every_level_gets_gradients(name):
    torch.manual_seed(0)
    model, inputs = _detector(DETECTOR_BOX_HEADS[name])
    images, targets = synthetic_batch()
    losses = model.train()(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    # StandardRoIHead pooled every RoI from every level: Tensor[L, R, C, S, S], 32 FPN channels, 7x7.
    assert len(inputs) == 1 and len(inputs[0]) == 5 and inputs[0][0] == 4 and inputs[0][2:] == (32, 7, 7)
    for level, layer in enumerate(first_layers(model.roi_heads.box_head)):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, f"level {level} got no gradient"


@pytest.mark.parametrize("name", DETECTOR_BOX_HEADS)
def test_detector_with_afp_returns_detections_in_eval_mode(name):
    torch.manual_seed(0)
    model, inputs = _detector(DETECTOR_BOX_HEADS[name])
    images, _ = synthetic_batch()
    with torch.no_grad():
        detections = model.eval()(images)
    assert len(detections) == len(images) and inputs[0][0] == 4
    for det in detections:
        assert det["boxes"].shape[1:] == (4,) and len(det["boxes"]) == len(det["labels"]) == len(det["scores"])


@pytest.mark.parametrize("head_factory", [lambda: two_fc(fc_dim=4), lambda: TwoFCHead(in_channels=C, resolution=S, fc_dim=4)],
                         ids=["AFPTwoFCHead", "TwoFCHead"])
def test_channels_last_pooled_features_give_the_same_values_and_gradients(head_factory):
    # RoIAlign's CPU training path returns its bins channels-last; the fc6 product then orders the
    # weight's columns instead of copying the features, which must not change the result.
    torch.manual_seed(0)
    head = head_factory()
    x = pooled() if isinstance(head, AFPTwoFCHead) else pooled()[0]
    results = []
    for layout in (x, x.movedim(-3, -1).contiguous().movedim(-1, -3)):
        layout = layout.clone().requires_grad_(True)
        head.zero_grad()
        out = head(layout)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), layout.grad, [p.grad.clone() for p in head.parameters()]))
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = results
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(gx_a, gx_b)
    for a, b in zip(gp_a, gp_b):
        torch.testing.assert_close(a, b)
