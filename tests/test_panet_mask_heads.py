"""PANet mask heads: adaptive feature pooling, the fused FC branch, the switches, the detector, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segkit.errors import ConfigError
from segkit.ops import ShapeSpec
from segkit.registry import HEADS, MODELS

from test_detector import synthetic_batch, tiny_config
from test_mask_rcnn import masks_of

FEATURES = ("p2", "p3", "p4", "p5")
SHAPES = {f: ShapeSpec(8, 2 ** (i + 2)) for i, f in enumerate(FEATURES)}
NAMES = ("PANetMaskHead", "AFPMaskHead", "FusedMaskHead")


def make_head(type_name: str = "PANetMaskHead", **options):
    torch.manual_seed(0)
    cfg = {"type": type_name, "num_convs": 4, "conv_dim": 16, "in_features": list(FEATURES), **options}
    return HEADS.build(cfg, path="model.roi_head.mask_head", in_shapes=SHAPES, num_classes=3)


def features(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f: torch.rand(2, 8, 64 // 2**i, 64 // 2**i, generator=g) for i, f in enumerate(FEATURES)}


BOXES = [torch.tensor([[4.0, 4.0, 60.0, 50.0], [10.0, 20.0, 30.0, 34.0]]), torch.tensor([[0.0, 0.0, 63.0, 63.0]])]
LABELS = [torch.tensor([1, 3]), torch.tensor([2])]


def train_instances():
    return [{"proposal_boxes": b, "labels": l, "matched_idxs": torch.arange(len(b))} for b, l in zip(BOXES, LABELS)]


def train_targets():
    targets = []
    for boxes in BOXES:
        masks = torch.zeros(len(boxes), 64, 64, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "masks": masks})
    return targets


def eval_logits(head, feats=None):
    feats = features() if feats is None else feats
    with torch.no_grad():
        return head.eval().layers(head.pool([feats[f] for f in FEATURES], BOXES))


# ---------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name", NAMES)
def test_training_gives_a_finite_mask_loss(name):
    losses = make_head(name).train()(features(), train_instances(), train_targets())
    assert set(losses) == {"loss_mask"} and losses["loss_mask"].dim() == 0 and torch.isfinite(losses["loss_mask"])


@pytest.mark.parametrize("name", NAMES)
def test_inference_adds_roi_masks_of_28x28_probabilities(name):
    with torch.no_grad():
        out = make_head(name).eval()(features(), [{"boxes": b, "labels": l} for b, l in zip(BOXES, LABELS)])
    assert [o["roi_masks"].shape for o in out] == [(2, 1, 28, 28), (1, 1, 28, 28)]
    assert all(((o["roi_masks"] >= 0) & (o["roi_masks"] <= 1)).all() for o in out)


def test_class_agnostic_panet_head_predicts_one_map():
    head = make_head(class_agnostic=True)
    assert eval_logits(head).shape == (3, 1, 28, 28)


# ---------------------------------------------------------------------------- adaptive feature pooling
def test_adaptive_pooling_pools_every_roi_from_every_level():
    head = make_head(fused=False)
    pooled = head.pool([features()[f] for f in FEATURES], BOXES)
    assert pooled.shape == (4, 3, 8, 14, 14)
    reference = eval_logits(head)
    for level in FEATURES:
        feats = features()
        feats[level] = torch.zeros_like(feats[level])
        assert not torch.allclose(eval_logits(head, feats), reference), f"{level} does not reach the output"


def test_single_level_pooling_ignores_the_levels_a_box_is_not_assigned_to():
    head = make_head(adaptive_pooling=False, fused=False)
    feats = features()
    feats["p5"] = torch.zeros_like(feats["p5"])  # none of the boxes (<= 64 px) maps to P5
    assert torch.equal(eval_logits(head, feats), eval_logits(head))


def test_each_level_has_its_own_first_conv():
    head = make_head()
    assert len(head.level_convs) == len(FEATURES) and isinstance(head.convs[0], torch.nn.Identity)
    weights = [block[0].weight for block in head.level_convs]
    assert len({w.data_ptr() for w in weights}) == len(FEATURES)
    assert all(not torch.equal(a, b) for i, a in enumerate(weights) for b in weights[i + 1 :])
    feats = features()
    losses = head.train()(feats, train_instances(), train_targets())
    losses["loss_mask"].backward()
    grads = [w.grad for w in weights]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(not torch.equal(a, b) for i, a in enumerate(grads) for b in grads[i + 1 :])


@pytest.mark.parametrize("fusion", ["max", "sum"])
def test_levels_are_fused_after_per_level_conv_and_relu(fusion):
    head = make_head(fused=False, fusion=fusion).eval()
    pooled = head.pool([features()[f] for f in FEATURES], BOXES)
    with torch.no_grad():
        per_level = torch.stack([F.relu(conv(x)) for conv, x in zip(head.level_convs, pooled)])
        x = per_level.amax(0) if fusion == "max" else per_level.sum(0)
        for conv in head.convs[1:]:
            x = F.relu(conv(x))
        expected = head.predictor(F.relu(head.deconv(x)))
        torch.testing.assert_close(head.fuse_levels(pooled), per_level.amax(0) if fusion == "max" else per_level.sum(0))
        torch.testing.assert_close(head.layers(pooled), expected)


def test_max_and_sum_fusion_differ():
    assert not torch.allclose(eval_logits(make_head(fusion="max")), eval_logits(make_head(fusion="sum")))


# ---------------------------------------------------------------------------- fused branch
def fc_path_by_hand(head, pooled):
    """The FC path of a single-level head, from the pooled features to Tensor[R, 1, 28, 28]."""
    x = pooled
    for conv in head.convs[:3]:
        x = F.relu(conv(x))
    for conv in head.fc_convs:
        x = F.relu(conv(x))
    return F.relu(head.fc(x.flatten(1))).reshape(-1, 1, 28, 28)


def test_fused_branch_adds_the_same_fc_map_to_every_class():
    fused = make_head("FusedMaskHead").eval()
    with torch.no_grad():
        fused.fc.bias.uniform_(0.1, 1.0)  # a map that is clearly non-zero after the ReLU
    fcn_only = make_head("FusedMaskHead", fused=False).eval()
    missing, unexpected = fcn_only.load_state_dict(fused.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith(("fc.", "fc_convs.")) for k in unexpected)
    pooled = fused.pool([features()[f] for f in FEATURES], BOXES)
    with torch.no_grad():
        difference = fused.layers(pooled) - fcn_only.layers(pooled)
        by_hand = fc_path_by_hand(fused, pooled)
    assert difference.shape == (3, 3, 28, 28) and by_hand.abs().sum() > 0
    torch.testing.assert_close(difference, by_hand.expand_as(difference), rtol=1e-5, atol=1e-5)


def test_fc_path_shapes_follow_fc_conv_dim():
    head = make_head(fc_conv_dim=10)
    assert [block[0].out_channels for block in head.fc_convs] == [10, 5]
    assert (head.fc.in_features, head.fc.out_features) == (5 * 14 * 14, 28 * 28)
    assert make_head().fc_convs[0][0].out_channels == 16  # default: conv_dim


def test_fused_branch_starts_from_the_third_conv_with_more_convs():
    head = make_head("FusedMaskHead", num_convs=5).eval()
    fcn_only = make_head("FusedMaskHead", num_convs=5, fused=False).eval()
    fcn_only.load_state_dict(head.state_dict(), strict=False)
    pooled = head.pool([features()[f] for f in FEATURES], BOXES)
    with torch.no_grad():
        torch.testing.assert_close(head.layers(pooled) - fcn_only.layers(pooled),
                                   fc_path_by_hand(head, pooled).expand(3, 3, 28, 28), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- switches off
@pytest.mark.parametrize("norm", [None, "GN"])
def test_both_switches_off_equals_mask_rcnn_head_with_the_same_weights(norm):
    head = make_head(adaptive_pooling=False, fused=False, norm=norm)
    reference = make_head("MaskRCNNHead", norm=norm)
    reference.load_state_dict(head.state_dict(), strict=True)
    feats = features()
    torch.testing.assert_close(eval_logits(head), eval_logits(reference))
    head.train(), reference.train()
    torch.manual_seed(0)
    ours = head(feats, train_instances(), train_targets())["loss_mask"]
    torch.manual_seed(0)
    theirs = reference(feats, train_instances(), train_targets())["loss_mask"]
    torch.testing.assert_close(ours, theirs)


def test_adaptive_pooling_over_one_level_equals_mask_rcnn_head():
    options = {"in_features": ["p3"], "fused": False}
    head = make_head("AFPMaskHead", **options).eval()
    reference = make_head("MaskRCNNHead", in_features=["p3"]).eval()
    state = {k: v for k, v in head.state_dict().items() if not k.startswith("level_convs.")}
    state.update({k.replace("level_convs.0.", "convs.0."): v for k, v in head.state_dict().items()
                  if k.startswith("level_convs.0.")})
    reference.load_state_dict(state, strict=True)
    feats = [features()["p3"]]
    with torch.no_grad():
        torch.testing.assert_close(head.layers(head.pool(feats, BOXES)), reference.layers(reference.pool(feats, BOXES)))


# ---------------------------------------------------------------------------- detector
def panet_config(**options) -> dict:
    cfg = tiny_config()
    cfg["roi_head"]["mask_head"] = {"type": "PANetMaskHead", "num_convs": 4, "conv_dim": 16, **options}
    return cfg


def test_detector_trains_a_step_with_gradients_reaching_every_level_conv_and_the_fc():
    torch.manual_seed(0)
    model = MODELS.build(panet_config(), path="model").train()
    images, targets = synthetic_batch()
    losses = model(images, masks_of(images, targets))
    assert torch.isfinite(losses["loss_mask"]) and 0 < float(losses["loss_mask"].detach()) < 2 * math.log(2)
    sum(losses.values()).backward()
    head = model.roi_heads.mask_head
    assert len(head.level_convs) == 4
    for name, param in [*head.level_convs.named_parameters(), *head.fc_convs.named_parameters(),
                        *(("fc." + n, p) for n, p in head.fc.named_parameters())]:
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_detector_eval_returns_masks_at_image_size():
    torch.manual_seed(0)
    model = MODELS.build(panet_config(), path="model").eval()
    images, _ = synthetic_batch()
    with torch.no_grad():
        out = model(images)
    assert all(o["masks"].shape == (len(o["boxes"]), 1, *img.shape[-2:]) for o, img in zip(out, images))


# ---------------------------------------------------------------------------- registry and errors
@pytest.mark.parametrize("name,adaptive,fused", [("PANetMaskHead", True, True), ("AFPMaskHead", True, False),
                                                 ("FusedMaskHead", False, True)])
def test_registry_builds_each_variant_with_its_defaults(name, adaptive, fused):
    assert name in HEADS.names()
    head = make_head(name)
    assert (head.adaptive_pooling, head.fused) == (adaptive, fused)
    assert hasattr(head, "level_convs") == adaptive and hasattr(head, "fc") == fused


@pytest.mark.parametrize(
    "options,match",
    [
        ({"fusion": "mean"}, r"PANetMaskHead: mask_head.fusion must be one of 'max', 'sum', got 'mean'"),
        ({"num_convs": 2}, r"mask_head.num_convs >= 3 \(got 2\).*fused: false"),
        ({"num_convs": 0, "fused": False}, r"mask_head.num_convs >= 1 \(got 0\).*adaptive_pooling: false"),
        ({"fc_conv_dim": 1}, r"mask_head.fc_conv_dim must be >= 2"),
    ],
)
def test_bad_option_values_are_config_errors_naming_the_option(options, match):
    # StandardRoIHead re-raises a mask head's ValueError at its own key, so the message names the option.
    with pytest.raises(ConfigError, match=match) as err:
        MODELS.build(panet_config(**options), path="model")
    assert err.value.key == "model.roi_head.mask_head"


def test_misspelt_option_suggests_the_right_name():
    with pytest.raises(ConfigError, match="fusion") as err:
        MODELS.build(panet_config(fusoin="max"), path="model")
    assert err.value.key == "model.roi_head.mask_head.fusoin"


@pytest.mark.parametrize("name", ["AFPMaskHead", "FusedMaskHead"])
def test_variants_check_their_arguments_by_name(name):
    with pytest.raises(ConfigError, match="fc_conv_dim") as err:
        make_head(name, fc_conv_dims=8)
    assert err.value.key == "model.roi_head.mask_head.fc_conv_dims"


def test_adaptive_pooling_alone_works_with_fewer_than_three_convs():
    assert eval_logits(make_head("AFPMaskHead", num_convs=1)).shape == (3, 3, 28, 28)
