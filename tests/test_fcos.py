"""FCOS (OneStageDetector + FCOSHead + FPN P3-P7): torchvision parity of detections and losses after
`segkit convert`, the point assignment (centre sampling, size ranges, smallest box), the box coding,
training, and configuration errors."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

import segkit
from segkit.checkpoint import CLASSES_KEY, CONFIG_KEY, CheckpointError
from segkit.errors import ConfigError
from segkit.ops import ShapeSpec
from segkit.registry import HEADS, MODELS
from segkit_plugins.heads.fcos_head import centerness_targets, decode_distances, encode_distances
from segkit_plugins.heads.fcos_weights import convert_torchvision_fcos, is_torchvision_fcos
from segkit_plugins.heads.retinanet_weights import is_torchvision_retinanet
from tests.reference import NO_TARGETS, assert_same_detections, convert_and_load, one_stage_features, overfit
from tests.test_detector import synthetic_batch

SIZE = {"min_size": 256, "max_size": 320}
# Box 3 lies inside box 1 (the smaller one wins the points they share); the first image's boxes span P3-P5.
TARGETS = [
    {"boxes": torch.tensor([[20.0, 30.0, 120.0, 150.0], [150.0, 40.0, 290.0, 110.0], [50.0, 60.0, 100.0, 120.0]]),
     "labels": torch.tensor([3, 17, 5])},
    {"boxes": torch.tensor([[5.0, 5.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
]


def _torchvision_fcos() -> torch.nn.Module:
    """A random torchvision FCOS whose class biases are spread (so the score threshold decides which
    candidates remain) and whose background class 0, never a target, scores nothing (segkit has no such class)."""
    torch.manual_seed(0)
    model = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, **SIZE)
    with torch.no_grad():
        bias = model.head.classification_head.cls_logits.bias
        bias.uniform_(-8.0, -1.0)
        bias[0] = -40.0
    return model.eval()


# ---------------------------------------------------------------------------- torchvision parity
@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory):
    """torchvision's fcos_resnet50_fpn and segkit's model from `segkit convert` of its state dict."""
    folder = tmp_path_factory.mktemp("fcos")
    reference = _torchvision_fcos()
    ours, path = convert_and_load(reference, folder, SIZE)
    # The second image is resized (200 -> 256 px) and padded to the first one's width.
    images = [torch.rand(3, 256, 320), torch.rand(3, 200, 240)]
    return reference, ours, images, path


def test_detections_equal_torchvision_fcos_with_the_same_weights(parity):
    reference, ours, images, _ = parity
    assert not ours.training
    with torch.no_grad():
        expected, got = reference(images), ours(images)
    assert_same_detections(expected, got, score_atol=1e-5)


@pytest.fixture(scope="module")
def parity_outputs(parity):
    """Both models' preprocessed batches, points and raw head outputs on the parity images (computed once)."""
    reference, ours, images, _ = parity
    tv_images, tv_features, batch, features = one_stage_features(reference, ours, images)
    with torch.no_grad():
        torch.testing.assert_close(batch, tv_images.tensors)
        torch.testing.assert_close(list(features.values()), tv_features)
        tv = (reference.head(tv_features), reference.anchor_generator(tv_images, tv_features),
              [f.shape[-2] * f.shape[-1] for f in tv_features])
        feats = [features[name] for name in ours.head.in_features]
        anchors = ours.head.point_generator(feats, tuple(batch.shape[-2:]))
        points, sizes = [(a[:, :2] + a[:, 2:]) / 2 for a in anchors], [a[:, 2] - a[:, 0] for a in anchors]
        logits, distances, centerness = (torch.cat(o, 1) for o in ours.head.predict(feats))
    return tv, (points, sizes, logits, distances, centerness)


@pytest.mark.parametrize("targets", [TARGETS, [TARGETS[0], NO_TARGETS]], ids=["boxes", "image_without_boxes"])
def test_losses_equal_torchvision_fcos(parity, parity_outputs, targets):
    reference, ours, images, _ = parity
    (tv_outputs, tv_anchors, tv_level_sizes), our_outputs = parity_outputs
    with torch.no_grad():
        _, tv_targets = reference.transform(images, targets)
        expected = reference.compute_loss(tv_targets, tv_outputs, tv_anchors, tv_level_sizes)
        _, _, our_targets = ours.preprocess(images, targets)
        got = ours.head.losses(*our_outputs, our_targets)
    assert float(expected["bbox_regression"]) > 0.0
    torch.testing.assert_close(got["loss_cls"], expected["classification"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["loss_box_reg"], expected["bbox_regression"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["loss_centerness"], expected["bbox_ctrness"], atol=1e-5, rtol=1e-5)


def test_converted_checkpoint_carries_torchvision_s_config_and_coco_names(parity):
    ckpt = torch.load(parity[3], weights_only=True)
    cfg, classes = ckpt[CONFIG_KEY], ckpt[CLASSES_KEY]
    model = cfg["model"]
    assert (model["score_threshold"], model["nms_threshold"], model["detections_per_image"]) == (0.2, 0.6, 100)
    assert model["backbone"]["norm"] == "BN"  # built without weights; the COCO weights have FrozenBN
    assert (model["neck"]["extra_block"], model["neck"]["extra_from"]) == ("p6p7", "output")
    head = model["head"]
    assert (head["type"], head["num_classes"], head["norm"], head["num_convs"]) == ("FCOSHead", 90, "GN", 4)
    assert ckpt["state_dict"]["head.cls_logits.weight"].shape[0] == 90  # torchvision's background map dropped
    assert ckpt["state_dict"]["head.centerness.weight"].shape == (1, 256, 3, 3)
    assert len(classes) == 90 and classes[0] == "person" and cfg["work_dir"] == "work_dirs/fcos_resnet50_fpn"


def test_load_from_a_torchvision_fcos_name_keeps_all_but_the_classifier(parity, tmp_path, monkeypatch):
    from segkit.checkpoint import init_from_checkpoint
    from tests.weight_cache import offline_caches, plant_torchvision

    offline_caches(tmp_path, monkeypatch)
    reference = parity[0]
    # torchvision's COCO file has a FrozenBN backbone: no batch counters.
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    plant_torchvision("FCOS_ResNet50_FPN_Weights.COCO_V1", state)
    cfg = segkit.load_config("configs/fcos_r50_fpn_coco.yaml", ["model.backbone.pretrained=null"])
    with torch.device("meta"):
        model = segkit.build_model(cfg)
    model.to_empty(device="cpu")
    report = init_from_checkpoint(model, "torchvision://fcos_resnet50_fpn")
    assert sorted(report["reinitialised"]) == ["head.cls_logits.bias", "head.cls_logits.weight"]  # 80 classes, not 90
    assert not report["missing"] and not report["unexpected"]
    torch.testing.assert_close(model.head.centerness.weight, reference.head.regression_head.bbox_ctrness.weight)


def test_a_torchvision_retinanet_is_not_taken_for_an_fcos():
    with torch.device("meta"):
        state = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    assert not is_torchvision_fcos(state) and is_torchvision_retinanet(state)
    with pytest.raises(CheckpointError, match=r"cannot map.*fcos_resnet50_fpn"):
        convert_torchvision_fcos(state)


# ---------------------------------------------------------------------------- the assignment and the coding
def _two_level_head(**options) -> torch.nn.Module:
    shapes = {"p3": ShapeSpec(8, 8), "p4": ShapeSpec(8, 16)}
    return HEADS.build({"type": "FCOSHead", "num_classes": 3, "in_features": ["p3", "p4"], "num_convs": 0,
                        "norm": None, **options}, path="model.head", in_shapes=shapes)


def _expected_labels(grid: int, stride: int, cells: dict[int, set[tuple[int, int]]]) -> torch.Tensor:
    labels = torch.zeros(grid, grid, dtype=torch.int64)
    for label, points in cells.items():
        for x, y in points:
            labels[y // stride, x // stride] = label
    return labels.flatten()


def test_points_are_assigned_by_centre_sampling_size_range_and_smallest_box():
    """A 160 px image, P3 (points every 8 px, sizes < 64) and P4 (every 16 px, sizes > 64), radius 1.5."""
    head = _two_level_head()
    features = {"p3": torch.zeros(1, 8, 20, 20), "p4": torch.zeros(1, 8, 10, 10)}
    anchors = head.point_generator(list(features.values()), (160, 160))
    points = [(a[:, :2] + a[:, 2:]) / 2 for a in anchors]
    sizes = [a[:, 2] - a[:, 0] for a in anchors]
    small = [20.0, 20.0, 44.0, 44.0]    # centre 32: P3 points 24..40 (within 12 px), farthest side < 64
    middle = [16.0, 16.0, 60.0, 60.0]   # centre 38: P3 points 32..48, those it shares with `small` lost to it
    large = [8.0, 8.0, 152.0, 152.0]    # centre 80: P4 points 64..96 (within 24 px), farthest side > 64
    target = {"boxes": torch.tensor([small, large, middle]), "labels": torch.tensor([1, 2, 3])}
    labels, boxes = head._assign(points, sizes, [target])
    near_small, near_middle, near_large = {24, 32, 40}, {32, 40, 48}, {64, 80, 96}
    p3 = _expected_labels(20, 8, {3: {(x, y) for x in near_middle for y in near_middle},
                                  1: {(x, y) for x in near_small for y in near_small}})
    p4 = _expected_labels(10, 16, {2: {(x, y) for x in near_large for y in near_large}})
    assert torch.equal(labels[0], torch.cat([p3, p4]))
    assert torch.equal(boxes[0][labels[0] == 2], torch.tensor([large] * 9))
    assert head.size_ranges == [(0.0, 64.0), (64.0, math.inf)]


def test_size_ranges_and_radius_can_be_set():
    head = _two_level_head(size_ranges=[[0, 200], [200, 400]], center_sampling_radius=0.5)
    features = [torch.zeros(1, 8, 20, 20), torch.zeros(1, 8, 10, 10)]
    anchors = head.point_generator(features, (160, 160))
    points = [(a[:, :2] + a[:, 2:]) / 2 for a in anchors]
    sizes = [a[:, 2] - a[:, 0] for a in anchors]
    target = {"boxes": torch.tensor([[8.0, 8.0, 152.0, 152.0]]), "labels": torch.tensor([2])}
    labels, _ = head._assign(points, sizes, [target])
    # Only the point at the centre (80, 80) is within 4 px of it, and the box now belongs to P3.
    assert labels[0].nonzero().flatten().tolist() == [10 * 20 + 10]


def test_distances_round_trip_and_centerness_is_one_at_the_centre():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 32.0, 32.0]])
    points = torch.tensor([[30.0, 30.0], [8.0, 16.0]])
    sizes = torch.tensor([8.0, 16.0])
    distances = encode_distances(boxes, points, sizes)
    torch.testing.assert_close(distances, torch.tensor([[2.5, 1.25, 2.5, 1.25], [0.5, 1.0, 1.5, 1.0]]))
    torch.testing.assert_close(decode_distances(distances, points, sizes), boxes)
    torch.testing.assert_close(centerness_targets(distances), torch.tensor([1.0, math.sqrt(1 / 3)]))


# ---------------------------------------------------------------------------- a tiny FCOS
def tiny_config(**options) -> dict:
    """ResNet-18 (base 16) + FPN-32 P3-P7 + a two-conv FCOS head for 3 classes: fast on a CPU."""
    return {
        "type": "OneStageDetector",
        "backbone": {"type": "ResNet", "depth": 18, "base_channels": 16, "out_indices": [1, 2, 3]},
        "neck": {"type": "FPN", "in_features": ["c3", "c4", "c5"], "out_channels": 32, "extra_block": "p6p7"},
        "head": {"type": "FCOSHead", "num_classes": 3, "num_convs": 2},
        **options,
    }


def test_training_returns_finite_losses_that_fall_on_fixed_images():
    torch.manual_seed(0)
    model = MODELS.build(tiny_config(), path="model").train()
    images, targets = synthetic_batch()
    steps = overfit(model, images, targets, steps=12, lr=1e-3)
    assert all(set(step) == {"loss_cls", "loss_box_reg", "loss_centerness"} for step in steps)
    history = [sum(step.values()) for step in steps]
    assert all(math.isfinite(v) for v in history)
    assert sum(history[-3:]) < 0.7 * sum(history[:3]), history


def test_an_image_without_ground_truth_has_only_a_classification_loss():
    torch.manual_seed(0)
    model = MODELS.build(tiny_config(), path="model").train()
    images, targets = synthetic_batch()
    losses = model(images, [targets[0], NO_TARGETS])
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_centerness"}
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in losses.values())
    losses = model(images, [NO_TARGETS, NO_TARGETS])
    assert float(losses["loss_box_reg"]) == float(losses["loss_centerness"]) == 0.0 < float(losses["loss_cls"])
    sum(losses.values()).backward()
    assert model.head.bbox_pred.weight.grad is not None and model.head.centerness.weight.grad is not None


def test_eval_outputs_are_in_input_image_coordinates():
    torch.manual_seed(0)
    model = MODELS.build(tiny_config(min_size=160, max_size=256, score_threshold=0.0, detections_per_image=50),
                         path="model").eval()
    images = [torch.rand(3, 60, 90), torch.rand(3, 110, 70)]
    with torch.no_grad():
        outputs = model(images)
    for image, out in zip(images, outputs):
        h, w = image.shape[-2:]
        assert 0 < len(out["boxes"]) <= 50 and out["labels"].min() >= 1 and out["labels"].max() <= 3
        assert out["boxes"][:, 2].max() <= w + 1e-3 and out["boxes"][:, 3].max() <= h + 1e-3
        assert bool((out["scores"][:-1] >= out["scores"][1:]).all())


@pytest.mark.parametrize("head, match", [
    ({"size_ranges": [[0, 64], [64, 128]]}, "size_ranges must be one"),
    ({"size_ranges": [[0, 64], [64, 128], [128, 256], [256, 512], [600, 512]]}, "low < high"),
    ({"level_sizes": [8, 16, 32]}, "level_sizes must be one positive size per level"),
    ({"center_sampling_radius": 0}, "center_sampling_radius must be > 0"),
    ({"norm": "IN"}, "FCOSHead norm must be"),
    ({"in_features": ["p3", "p8"]}, r"in_features \['p8'\]"),
])
def test_bad_head_settings_are_config_errors_at_the_head(head, match):
    cfg = tiny_config()
    cfg["head"].update(head)
    with pytest.raises(ConfigError, match=match) as err:
        MODELS.build(cfg, path="model")
    assert err.value.key == "model.head"


def test_labels_out_of_range_are_a_clear_error():
    model = MODELS.build(tiny_config(), path="model").train()
    target = {"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([4])}
    with pytest.raises(ValueError, match=r"1\.\.3"):
        model([torch.rand(3, 64, 64)] * 2, [target, target])


def test_exported_fcos_gives_the_same_detections(tmp_path):
    from segkit.export import check_export, export_model

    model = MODELS.build(tiny_config(score_threshold=0.0, detections_per_image=20), path="model").eval()
    image = torch.rand(3, 96, 160)  # P7 of 1x2: GroupNorm's 32 groups of the 32-channel FPN need 2 values
    assert export_model(model, tmp_path / "fcos.pt", "torchscript", image)["outputs"] == ["boxes", "labels", "scores"]
    assert check_export(tmp_path / "fcos.pt", model, [image, torch.rand(3, 96, 160)])["max_abs_diff"] <= 1e-4
