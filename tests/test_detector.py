"""Two-stage detector: torchvision parity, losses, learning, coordinates, input errors, registry smoke."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torchvision
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchors
from torchvision.models.detection.image_list import ImageList

from segkit.errors import ConfigError
from segkit_plugins.heads.rcnn_weights import convert_torchvision_faster_rcnn
from segkit.ops import AnchorGenerator, BoxCoder, Matcher, ShapeSpec
from segkit.registry import BACKBONES, HEADS, MODELS, NECKS
from tests.reference import torchvision_head_losses

LOSS_NAMES = {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box_reg"}


def tiny_config(num_classes: int = 3, **options) -> dict:
    """ResNet-18 (base 16) + FPN 32 channels + small RPN / RoI budgets: fast on a CPU."""
    return {
        "type": "TwoStageDetector",
        "backbone": {"type": "ResNet", "depth": 18, "base_channels": 16},
        "neck": {"type": "FPN", "out_channels": 32},
        "rpn_head": {
            "type": "RPN",
            "anchor_sizes": [[16], [32], [64], [128], [256]],
            "pre_nms_top_n_train": 300, "post_nms_top_n_train": 100,
            "pre_nms_top_n_test": 200, "post_nms_top_n_test": 50,
            "batch_size_per_image": 64,
        },
        "roi_head": {
            "type": "StandardRoIHead", "num_classes": num_classes,
            "box_head": {"type": "TwoFCHead", "fc_dim": 64}, "batch_size_per_image": 64,
        },
        **options,
    }


def synthetic_batch(seed: int = 0):
    """Two images with a few coloured rectangles; label = colour index."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])
    images, targets = [], []
    for h, w, n in ((96, 128, 3), (128, 96, 2)):
        image = torch.rand(3, h, w, generator=g) * 0.2
        boxes, labels = [], []
        for _ in range(n):
            bw, bh = torch.randint(20, 44, (2,), generator=g).tolist()
            x1 = int(torch.randint(0, w - bw, (1,), generator=g))
            y1 = int(torch.randint(0, h - bh, (1,), generator=g))
            label = int(torch.randint(0, 3, (1,), generator=g))
            image[:, y1 : y1 + bh, x1 : x1 + bw] = colours[label][:, None, None]
            boxes.append([x1, y1, x1 + bw, y1 + bh])
            labels.append(label + 1)
        images.append(image)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, targets


# ---------------------------------------------------------------------------- torchvision parity
@pytest.fixture(scope="module")
def parity_models():
    torch.manual_seed(0)
    size = {"min_size": 192, "max_size": 320}
    reference = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, box_score_thresh=0.01,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, **size,
    ).eval()
    ours = MODELS.build(
        {
            "type": "TwoStageDetector", **size,
            "backbone": {"type": "ResNet", "depth": 50},
            "neck": {"type": "FPN", "out_channels": 256},
            "rpn_head": {"type": "RPN", "pre_nms_top_n_test": 300, "post_nms_top_n_test": 100},
            "roi_head": {"type": "StandardRoIHead", "num_classes": 90, "score_threshold": 0.01},
        },
        path="model",
    ).eval()
    ours.load_state_dict(convert_torchvision_faster_rcnn(reference.state_dict()), strict=True)
    # The padded batch width (288, set by the first image) is not a multiple of the P6 stride (64),
    # which exercises the grid-derived anchor stride.
    images = [torch.rand(3, 200, 300), torch.rand(3, 240, 320)]
    return reference, ours, images


def test_detections_equal_torchvision_faster_rcnn_with_the_same_weights(parity_models):
    reference, ours, images = parity_models
    with torch.no_grad():
        expected, got = reference(images), ours(images)
    for exp, out in zip(expected, got):
        assert len(out["boxes"]) > 0
        torch.testing.assert_close(out["boxes"], exp["boxes"], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(out["scores"], exp["scores"], atol=1e-4, rtol=1e-5)
        assert torch.equal(out["labels"], exp["labels"])


def test_rpn_proposals_equal_torchvision(parity_models):
    reference, ours, images = parity_models
    with torch.no_grad():
        tv_images, _ = reference.transform(images)
        tv_proposals, _ = reference.rpn(tv_images, reference.backbone(tv_images.tensors))
        batch, sizes, _ = ours.preprocess(images)
        proposals, _ = ours.rpn(ours.extract_features(batch), sizes, tuple(batch.shape[-2:]))
    torch.testing.assert_close(batch, tv_images.tensors)
    assert sizes == tv_images.image_sizes
    for exp, out in zip(tv_proposals, proposals):
        torch.testing.assert_close(out, exp, atol=1e-4, rtol=1e-5)


def test_head_losses_equal_torchvision_given_the_same_random_sampling(parity_models):
    reference, ours, images = parity_models
    targets = [
        {"boxes": torch.tensor([[20.0, 30.0, 120.0, 150.0], [150.0, 40.0, 290.0, 110.0]]), "labels": torch.tensor([3, 17])},
        {"boxes": torch.tensor([[5.0, 5.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
    ]
    expected, got = torchvision_head_losses(reference, ours, images, targets)
    pairs = {"loss_rpn_cls": "loss_objectness", "loss_rpn_box": "loss_rpn_box_reg", "loss_cls": "loss_classifier",
             "loss_box_reg": "loss_box_reg"}
    for name, tv_name in pairs.items():
        torch.testing.assert_close(got[name], expected[tv_name], atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------- ops against torchvision
def test_anchors_equal_torchvision_anchor_generator():
    sizes = ((32,), (64,), (128,), (256,), (512,))
    ours = AnchorGenerator(sizes=sizes, aspect_ratios=(0.5, 1.0, 2.0))
    reference = TorchvisionAnchors(sizes, ((0.5, 1.0, 2.0),) * 5)
    feats = [torch.zeros(1, 1, math.ceil(96 / s), math.ceil(160 / s)) for s in (4, 8, 16, 32, 64)]
    expected = reference(ImageList(torch.zeros(1, 3, 96, 160), [(96, 160)]), feats)[0]
    torch.testing.assert_close(torch.cat(ours(feats, (96, 160))), expected, rtol=0, atol=0)


def test_matcher_equals_torchvision_with_low_quality_matches():
    from torchvision.models.detection._utils import Matcher as TorchvisionMatcher

    torch.manual_seed(0)
    boxes = torch.rand(60, 4) * 50
    boxes[:, 2:] += boxes[:, :2] + 1
    iou = torchvision.ops.box_iou(boxes[:5], boxes)
    expected = TorchvisionMatcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    idx, labels = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=True)(iou)
    assert torch.equal(labels, torch.where(expected >= 0, 1, torch.where(expected == -1, 0, -1)).to(torch.int8))
    assert torch.equal(idx[labels == 1], expected[labels == 1])


def test_pool_all_levels_pools_every_box_from_every_level():
    from segkit.ops import MultiLevelRoIAlign

    torch.manual_seed(0)
    pooler = MultiLevelRoIAlign(strides=(4, 8, 16), output_size=5, sampling_ratio=2)
    feats = [torch.rand(2, 6, 64 // s, 64 // s) for s in (4, 8, 16)]
    boxes = [torch.tensor([[2.0, 3.0, 40.0, 50.0]]), torch.tensor([[0.0, 0.0, 10.0, 12.0], [5.0, 5.0, 60.0, 61.0]])]
    pooled = pooler.pool_all_levels(feats, boxes)
    assert pooled.shape == (3, 3, 6, 5, 5)
    rois = torch.cat([torch.tensor([[0.0]]), torch.tensor([[1.0], [1.0]])])
    rois = torch.cat([rois, torch.cat(boxes)], dim=1)
    for level, (feat, stride) in enumerate(zip(feats, (4, 8, 16))):
        expected = torchvision.ops.roi_align(feat, rois, 5, 1.0 / stride, 2, False)
        torch.testing.assert_close(pooled[level], expected)
    single = pooler(feats, boxes)  # the level-by-size pooling picks one of them per box
    assert all(any(torch.equal(single[r], pooled[lv, r]) for lv in range(3)) for r in range(3))


def test_box_coder_round_trip_and_clamp():
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    ref = torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 8.0, 4.0]])
    target = torch.tensor([[12.0, 18.0, 70.0, 55.0], [1.0, 1.0, 3.0, 9.0]])
    torch.testing.assert_close(coder.decode(coder.encode(target, ref), ref), target)
    huge = coder.decode(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), ref[:1])
    assert torch.isfinite(huge).all() and (huge[0, 2] - huge[0, 0]) == pytest.approx(40 * 1000 / 16, rel=1e-4)


# ---------------------------------------------------------------------------- training
def test_training_returns_the_four_finite_scalar_losses():
    torch.manual_seed(0)
    model = MODELS.build(tiny_config(), path="model").train()
    images, targets = synthetic_batch()
    losses = model(images, targets)
    assert set(losses) == LOSS_NAMES
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    sum(losses.values()).backward()
    assert model.rpn.conv.weight.grad is not None and model.roi_heads.cls_score.weight.grad is not None


def test_training_loss_falls_on_fixed_synthetic_images():
    torch.manual_seed(0)
    model = MODELS.build(tiny_config(), path="model").train()
    images, targets = synthetic_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    history = []
    for _ in range(40):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert all(math.isfinite(v) for v in history)
    assert last < 0.6 * first, history


def test_image_without_ground_truth_trains():
    torch.manual_seed(0)
    model = MODELS.build(tiny_config(), path="model").train()
    images, targets = synthetic_batch()
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    only_empty = model(images[1:], targets[1:])
    assert only_empty["loss_rpn_box"].detach() == 0.0 and only_empty["loss_box_reg"].detach() == 0.0
    assert torch.isfinite(only_empty["loss_cls"])


# ---------------------------------------------------------------------------- inference outputs
def test_eval_outputs_are_in_input_image_coordinates():
    torch.manual_seed(0)
    cfg = tiny_config(min_size=160, max_size=256)
    cfg["roi_head"]["score_threshold"] = 0.0
    model = MODELS.build(cfg, path="model").eval()
    images = [torch.rand(3, 60, 90), torch.rand(3, 110, 70)]  # upscaled about 2.7x and 2.3x inside
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for image, out in zip(images, outputs):
        h, w = image.shape[-2:]
        boxes = out["boxes"]
        assert len(boxes) > 0
        assert boxes.dtype == torch.float32 and out["scores"].dtype == torch.float32
        assert out["labels"].dtype == torch.int64 and out["labels"].min() >= 1 and out["labels"].max() <= 3
        assert boxes[:, 0::2].min() >= 0 and boxes[:, 1::2].min() >= 0
        assert boxes[:, 2].max() <= w + 1e-3 and boxes[:, 3].max() <= h + 1e-3
        # Boxes span the image (an untrained RPN proposes everywhere), so a missing rescale shows.
        assert boxes[:, 2].max() > 0.5 * w


def test_target_boxes_are_resized_with_the_images():
    model = MODELS.build(tiny_config(min_size=64, max_size=100), path="model")
    images = [torch.rand(3, 50, 100)]
    targets = [{"boxes": torch.tensor([[10.0, 5.0, 60.0, 45.0]]), "labels": torch.tensor([1])}]
    batch, sizes, new_targets = model.preprocess(images, targets)
    assert sizes == [(50, 100)] and batch.shape[-2:] == (64, 128)  # capped by max_size, padded to 32
    torch.testing.assert_close(new_targets[0]["boxes"], targets[0]["boxes"])
    batch, sizes, new_targets = model.preprocess([torch.rand(3, 32, 40)], targets)
    assert sizes == [(64, 80)]
    torch.testing.assert_close(new_targets[0]["boxes"], targets[0]["boxes"] * 2)
    assert targets[0]["boxes"][0, 0] == 10.0  # the caller's targets are not modified


def test_mask_head_protocol_is_called_in_training_and_inference():
    class DummyMaskHead(torch.nn.Module):
        def forward(self, features, instances, targets):
            if targets is not None:
                count = sum(len(i["proposal_boxes"]) for i in instances)
                assert all(len(i["labels"]) == len(i["matched_idxs"]) for i in instances)
                return {"loss_mask": features["p2"].sum() * 0 + count}
            return [{**d, "masks": torch.zeros(len(d["boxes"]), 1, 4, 4)} for d in instances]

    torch.manual_seed(0)
    cfg = tiny_config()
    cfg["roi_head"]["mask_head"] = DummyMaskHead()
    model = MODELS.build(cfg, path="model")
    images, targets = synthetic_batch()
    losses = model.train()(images, targets)
    assert set(losses) == LOSS_NAMES | {"loss_mask"} and losses["loss_mask"] > 0
    with torch.no_grad():
        out = model.eval()(images)
    assert all(o["masks"].shape[0] == len(o["boxes"]) for o in out)


# ---------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def tiny_model():
    return MODELS.build(tiny_config(), path="model")


def test_training_without_targets_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="training mode needs targets"):
        tiny_model.train()([torch.rand(3, 64, 64)])


@pytest.mark.parametrize(
    "images,match",
    [
        ([torch.rand(64, 64)], r"images\[0\] must be a tensor of shape \[3, H, W\]"),
        ([torch.rand(1, 64, 64)], r"\[3, H, W\]"),
        ([torch.zeros(3, 64, 64, dtype=torch.uint8)], "float tensor"),
        ([], "non-empty list"),
    ],
)
def test_malformed_images_are_clear_errors(tiny_model, images, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.eval()(images)


@pytest.mark.parametrize(
    "target,match",
    [
        ({"boxes": torch.tensor([[10.0, 10.0, 5.0, 20.0]]), "labels": torch.tensor([1])}, "positive width"),
        ({"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([4])}, r"1\.\.3"),
        ({"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([1.0])}, "int64"),
        ({"boxes": torch.tensor([1.0, 1.0, 5.0, 5.0]), "labels": torch.tensor([1])}, r"\[N, 4\]"),
        ({"labels": torch.tensor([1])}, "'boxes' and 'labels'"),
        ({"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]).repeat(10_001, 1), "labels": torch.ones(10_001, dtype=torch.int64)},
         r"targets\[0\] has 10,001 boxes, more than the 10,000"),
    ],
)
def test_malformed_targets_are_clear_errors(tiny_model, target, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.train()([torch.rand(3, 64, 64)], [target])


def test_config_errors_name_the_key_and_suggest():
    cfg = tiny_config()
    cfg["min_sise"] = 800
    with pytest.raises(ConfigError) as err:
        MODELS.build(cfg, path="model")
    assert err.value.key == "model.min_sise" and "min_size" in str(err.value)

    cfg = tiny_config()
    cfg["roi_head"]["box_head"]["fc_dims"] = 32
    with pytest.raises(ConfigError) as err:
        MODELS.build(cfg, path="model")
    assert err.value.key == "model.roi_head.box_head.fc_dims"

    cfg = tiny_config()
    cfg["rpn"] = cfg.pop("rpn_head")
    with pytest.raises(ConfigError, match="rpn_head"):
        MODELS.build(cfg, path="model")

    cfg = tiny_config()
    del cfg["neck"]  # the backbone gives c2..c5, the RPN asks for p2..p6
    with pytest.raises(ConfigError, match=r"in_features \['p2'") as err:
        MODELS.build(cfg, path="model")
    assert err.value.key == "model.rpn_head"


# ---------------------------------------------------------------------------- registry smoke test
TINY_SHAPES = {f"p{k}": ShapeSpec(16, 2**k) for k in range(2, 8)}
KNOWN_ARGUMENTS = {"in_shapes": TINY_SHAPES, "num_classes": 3, "in_channels": 16, "resolution": 7}


def _defaults_for(obj) -> dict:
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = inspect.signature(target).parameters.values()
    required = [p.name for p in params if p.default is inspect.Parameter.empty and p.kind is p.KEYWORD_ONLY]
    unknown = [n for n in required if n not in KNOWN_ARGUMENTS]
    if unknown and not hasattr(obj, "from_config"):  # from_config builds its own children
        pytest.skip(f"needs arguments without a generic default: {unknown}")
    return {n: KNOWN_ARGUMENTS[n] for n in required if n in KNOWN_ARGUMENTS}


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_backbone_builds_from_defaults_and_honours_output_shape(name):
    backbone = BACKBONES.build({"type": name, **_defaults_for(BACKBONES.get(name))}, path="model.backbone").eval()
    with torch.no_grad():
        outputs = backbone(torch.rand(1, 3, 64, 64))
    assert {k: v.shape[1] for k, v in outputs.items()} == {k: s.channels for k, s in backbone.output_shape().items()}


@pytest.mark.parametrize("name", NECKS.names())
def test_every_neck_builds_on_a_resnet_and_honours_output_shape(name):
    backbone = ResNetTiny()
    cfg, size = {"type": name}, 64
    default = inspect.signature(NECKS.get(name)).parameters.get("in_features")
    if default is not None and not set(default.default) <= set(backbone.output_shape()):
        # a neck made for another backbone: SSD's extra layers after VGG's fc7 (stride 16, as c4) shrink it 4 times
        cfg["in_features"], size = ["c3", "c4"], 320
    neck = NECKS.build(cfg, path="model.neck", in_shapes=backbone.output_shape()).eval()
    with torch.no_grad():
        outputs = neck(backbone.eval()(torch.rand(1, 3, size, size)))
    assert {k: v.shape[1] for k, v in outputs.items()} == {k: s.channels for k, s in neck.output_shape().items()}


@pytest.mark.parametrize("name", HEADS.names())
def test_every_head_builds_from_defaults(name):
    cfg = {"type": name, **_defaults_for(HEADS.get(name))}
    default = inspect.signature(HEADS.get(name)).parameters.get("in_features")
    if default is not None and isinstance(default.default, str) and default.default not in TINY_SHAPES:
        cfg["in_features"] = "p5"  # a decode head's default map (c5 of a backbone) is not in the tiny neck's
    elif default is not None and isinstance(default.default, (list, tuple)) and not set(default.default) <= set(TINY_SHAPES):
        cfg["in_features"] = list(TINY_SHAPES)[: len(default.default)]  # SSD's VGG maps: as many of the neck's
    low_level = inspect.signature(HEADS.get(name)).parameters.get("low_level_feature")
    if low_level is not None and low_level.default not in TINY_SHAPES:
        cfg["low_level_feature"] = "p2"  # DeepLabV3+'s decoder input (c2 of a backbone): the neck's finest map
    head = HEADS.build(cfg, path="model.head")
    assert isinstance(head, torch.nn.Module)


def ResNetTiny():  # noqa: N802 - reads like a class in the tests above
    return BACKBONES.build({"type": "ResNet", "depth": 18, "base_channels": 16}, path="model.backbone")
