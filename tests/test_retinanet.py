"""RetinaNet (OneStageDetector + RetinaNetHead + FPN P3-P7): torchvision parity of detections and losses
after `segkit convert`, the v2 pieces, anchors, training, coordinates, errors, and the command-line tools."""

from __future__ import annotations

import json
import math
import re
from functools import partial
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead as TorchvisionRetinaNetHead
from torchvision.models.detection.retinanet import _default_anchorgen
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

import segkit
from segkit.checkpoint import CLASSES_KEY, CONFIG_KEY, CheckpointError
from segkit.cli import main
from segkit.errors import ConfigError
from segkit.models import describe
from segkit.ops import AnchorGenerator, ShapeSpec, octave_anchor_sizes
from segkit.registry import HEADS, MODELS, NECKS
from segkit_plugins.heads.retinanet_weights import convert_torchvision_retinanet
from tests.reference import NO_TARGETS, assert_same_detections, convert_and_load, one_stage_features, overfit
from tests.test_detector import synthetic_batch

SIZE = {"min_size": 256, "max_size": 320}
TARGETS = [
    {"boxes": torch.tensor([[20.0, 30.0, 120.0, 150.0], [150.0, 40.0, 290.0, 110.0]]), "labels": torch.tensor([3, 17])},
    {"boxes": torch.tensor([[5.0, 5.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
]


def _torchvision_retinanet(name: str, **options) -> torch.nn.Module:
    """A random torchvision RetinaNet whose class biases are spread (so the score threshold and the top-k
    choose) and whose background class 0, never a target, scores nothing (segkit has no such class)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None, num_classes=91, **options)
    with torch.no_grad():
        bias = model.head.classification_head.cls_logits.bias.view(9, 91)
        bias.uniform_(-6.0, 0.0)
        bias[:, 0] = -40.0
    return model.eval()


# ---------------------------------------------------------------------------- torchvision parity
@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory):
    """torchvision's retinanet_resnet50_fpn and segkit's model from `segkit convert` of its state dict."""
    folder = tmp_path_factory.mktemp("retinanet")
    reference = _torchvision_retinanet("retinanet_resnet50_fpn", **SIZE)
    ours, path = convert_and_load(reference, folder, SIZE)
    # The second image is resized (200 -> 256 px) and padded to the first one's width.
    images = [torch.rand(3, 256, 320), torch.rand(3, 200, 240)]
    return reference, ours, images, path


def test_detections_equal_torchvision_retinanet_with_the_same_weights(parity):
    reference, ours, images, _ = parity
    assert not ours.training
    with torch.no_grad():
        expected, got = reference(images), ours(images)
    assert_same_detections(expected, got, score_atol=1e-4)


@pytest.fixture(scope="module")
def parity_features(parity):
    """Both models' preprocessed batches and feature maps of the parity images (computed once)."""
    reference, ours, images, _ = parity
    return one_stage_features(reference, ours, images)


def test_feature_pyramid_equals_torchvision_p3_to_p7(parity_features):
    tv_images, tv_features, batch, features = parity_features
    torch.testing.assert_close(batch, tv_images.tensors)
    assert list(features) == ["p3", "p4", "p5", "p6", "p7"]
    torch.testing.assert_close(list(features.values()), tv_features)  # P6 from P5, as torchvision's v1


@pytest.mark.parametrize("targets", [TARGETS, [TARGETS[0], NO_TARGETS]], ids=["boxes", "image_without_boxes"])
def test_losses_equal_torchvision_retinanet(parity, parity_features, targets):
    reference, ours, images, _ = parity
    tv_images, tv_features, batch, features = parity_features
    with torch.no_grad():
        _, tv_targets = reference.transform(images, targets)
        expected = reference.compute_loss(tv_targets, reference.head(tv_features),
                                          reference.anchor_generator(tv_images, tv_features))
        _, _, our_targets = ours.preprocess(images, targets)
        try:
            ours.head.train()
            _, got = ours.head(features, tuple(batch.shape[-2:]), our_targets)
        finally:
            ours.head.eval()
    torch.testing.assert_close(got["loss_cls"], expected["classification"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["loss_box_reg"], expected["bbox_regression"], atol=1e-5, rtol=1e-5)


def test_converted_checkpoint_carries_torchvision_s_config_and_coco_names(parity):
    ckpt = torch.load(parity[3], weights_only=True)
    cfg, classes = ckpt[CONFIG_KEY], ckpt[CLASSES_KEY]
    model = cfg["model"]
    assert model["type"] == "OneStageDetector" and model["detections_per_image"] == 300
    assert model["backbone"]["norm"] == "FrozenBN" and model["backbone"]["out_indices"] == [1, 2, 3]
    assert (model["neck"]["extra_block"], model["neck"]["extra_from"]) == ("p6p7", "output")
    head = model["head"]
    assert (head["num_classes"], head["norm"], head["box_loss"], head["num_convs"]) == (90, None, "l1", 4)
    assert head["anchor_sizes"][1] == [64, 80, 101]
    assert ckpt["state_dict"]["head.cls_logits.weight"].shape[0] == 9 * 90  # torchvision's background map dropped
    assert len(classes) == 90 and classes[0] == "person" and cfg["data"]["val"]["category_ids"] == list(range(1, 91))
    assert cfg["work_dir"] == "work_dirs/retinanet_resnet50_fpn"


def test_load_from_a_torchvision_retinanet_name_keeps_all_but_the_classifier(parity, tmp_path, monkeypatch):
    from segkit.checkpoint import init_from_checkpoint
    from tests.weight_cache import offline_caches, plant_torchvision

    offline_caches(tmp_path, monkeypatch)
    reference = parity[0]
    plant_torchvision("RetinaNet_ResNet50_FPN_Weights.COCO_V1", reference.state_dict())
    cfg = segkit.load_config("configs/retinanet_r50_fpn_coco.yaml", ["model.backbone.pretrained=null"])
    model = segkit.build_model(cfg)
    report = init_from_checkpoint(model, "torchvision://retinanet_resnet50_fpn")
    assert sorted(report["reinitialised"]) == ["head.cls_logits.bias", "head.cls_logits.weight"]  # 80 classes, not 90
    torch.testing.assert_close(model.head.bbox_pred.weight, reference.head.regression_head.bbox_reg.weight)
    torch.testing.assert_close(model.neck.extra_convs[1].weight, reference.backbone.fpn.extra_blocks.p7.weight)


# ---------------------------------------------------------------------------- v2 and the conversion
@pytest.fixture(scope="module")
def v2_state():
    with torch.device("meta"):
        return torchvision.models.detection.retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict()


def test_v2_converts_to_group_norm_towers_giou_and_p6_from_c5(v2_state):
    state, cfg = convert_torchvision_retinanet(v2_state)
    model = cfg["model"]
    assert model["backbone"]["norm"] == "BN" and model["neck"]["extra_from"] == "input"
    assert (model["head"]["norm"], model["head"]["box_loss"]) == ("GN", "giou")
    assert cfg["work_dir"] == "work_dirs/retinanet_resnet50_fpn_v2"
    with torch.device("meta"):
        ours = segkit.build_model(cfg)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.slow
def test_converted_v2_equals_torchvision_retinanet_v2(tmp_path):
    """The whole _v2 model (BatchNorm backbone, P6 from C5, GroupNorm towers, GIoU loss): detections and losses."""
    reference = _torchvision_retinanet("retinanet_resnet50_fpn_v2", **SIZE)
    state, cfg = convert_torchvision_retinanet(reference.state_dict())
    cfg["model"].update(SIZE)
    ours = segkit.build_model(cfg).eval()
    ours.load_state_dict(state, strict=True)
    images = [torch.rand(3, 256, 320), torch.rand(3, 200, 240)]
    with torch.no_grad():
        expected, got = reference(images), ours(images)
        for exp, out in zip(expected, got):
            assert 0 < len(out["boxes"]) == len(exp["boxes"])
            torch.testing.assert_close(out["boxes"], exp["boxes"], atol=1e-4, rtol=0)
            torch.testing.assert_close(out["scores"], exp["scores"], atol=1e-4, rtol=0)
            assert torch.equal(out["labels"], exp["labels"])
        for module in (reference, ours):  # the heads train, the backbones keep their running statistics
            module.train()
            module.backbone.eval()
        expected, got = reference(images, TARGETS), ours(images, TARGETS)
    torch.testing.assert_close(got["loss_cls"], expected["classification"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["loss_box_reg"], expected["bbox_regression"], atol=1e-5, rtol=1e-5)


def test_old_torchvision_head_spelling_converts_like_the_new_one(v2_state):
    with torch.device("meta"):
        v1 = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    # torchvision < 0.13 wrote the towers as Sequential(conv, ReLU, conv, ReLU, ...): conv.<2i>.weight
    old = {re.sub(r"(_head\.conv\.)(\d+)\.0\.", lambda m: f"{m.group(1)}{2 * int(m.group(2))}.", k): v
           for k, v in v1.items()}
    assert "head.classification_head.conv.6.weight" in old
    converted_old, cfg_old = convert_torchvision_retinanet(old)
    converted_new, cfg_new = convert_torchvision_retinanet(v1)
    assert cfg_old == cfg_new
    assert {k: v.shape for k, v in converted_old.items()} == {k: v.shape for k, v in converted_new.items()}


def test_a_torchvision_fcos_is_refused_naming_what_is_not_mapped(tmp_path, capsys):
    with torch.device("meta"):
        state = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    with pytest.raises(CheckpointError, match=r"bbox_ctrness.*retinanet_resnet50_fpn"):
        convert_torchvision_retinanet(state)


def test_group_norm_head_with_giou_loss_equals_torchvision_v2_head():
    torch.manual_seed(0)
    reference = TorchvisionRetinaNetHead(32, 9, 5, norm_layer=partial(torch.nn.GroupNorm, 32))
    reference.regression_head._loss_type = "giou"
    with torch.no_grad():  # torchvision's background class 0 (never a target) scores nothing, as segkit has none
        reference.classification_head.cls_logits.bias.view(9, 5)[:, 0] = -40.0
    shapes = {"p3": ShapeSpec(32, 8), "p4": ShapeSpec(32, 16)}
    sizes = octave_anchor_sizes((32, 64))
    ours = HEADS.build({"type": "RetinaNetHead", "num_classes": 4, "in_features": ["p3", "p4"], "norm": "GN",
                        "box_loss": "giou", "anchor_sizes": [list(s) for s in sizes]}, path="model.head", in_shapes=shapes)
    renamed = {}
    for key, value in reference.state_dict().items():
        key = re.sub(r"^classification_head\.conv\.", "cls_convs.", key)
        key = re.sub(r"^regression_head\.conv\.", "bbox_convs.", key)
        if key.startswith("classification_head.cls_logits."):
            value = value.view(9, 5, *value.shape[1:])[:, 1:].reshape(-1, *value.shape[1:])
        renamed[key.replace("classification_head.cls_logits", "cls_logits")
                   .replace("regression_head.bbox_reg", "bbox_pred")] = value
    ours.load_state_dict(renamed, strict=True)
    features = [torch.randn(2, 32, 8, 10), torch.randn(2, 32, 4, 5)]
    anchors = AnchorGenerator(sizes=sizes)(features, (64, 80))
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[10.0, 10.0, 30.0, 60.0], [0.0, 30.0, 70.0, 64.0]]), "labels": torch.tensor([4, 1])}]
    ours.train()
    with torch.no_grad():
        expected = reference.compute_loss(targets, reference(features), [torch.cat(anchors)] * 2,
                                          _torchvision_matches(anchors, targets))
        _, got = ours(dict(zip(shapes, features)), (64, 80), targets)
    torch.testing.assert_close(got["loss_cls"], expected["classification"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["loss_box_reg"], expected["bbox_regression"], atol=1e-5, rtol=1e-5)


def _torchvision_matches(anchors, targets):
    from torchvision.models.detection._utils import Matcher

    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
    return [matcher(torchvision.ops.box_iou(t["boxes"], torch.cat(anchors))) for t in targets]


def test_anchors_equal_torchvision_retinanet_anchors():
    ours = AnchorGenerator(sizes=octave_anchor_sizes(), aspect_ratios=(0.5, 1.0, 2.0))
    feats = [torch.zeros(1, 1, math.ceil(160 / s), math.ceil(224 / s)) for s in (8, 16, 32, 64, 128)]
    expected = _default_anchorgen()(ImageList(torch.zeros(1, 3, 160, 224), [(160, 224)]), feats)[0]
    torch.testing.assert_close(torch.cat(ours(feats, (160, 224))), expected, rtol=0, atol=0)


@pytest.mark.parametrize("extra_from, p6_input", [("output", 16), ("input", 64)])
def test_fpn_p6p7_equals_torchvision_last_level_p6p7(extra_from, p6_input):
    torch.manual_seed(0)
    reference = FeaturePyramidNetwork([16, 32, 64], 16, extra_blocks=LastLevelP6P7(p6_input, 16)).eval()
    shapes = {"c3": ShapeSpec(16, 8), "c4": ShapeSpec(32, 16), "c5": ShapeSpec(64, 32)}
    ours = NECKS.build({"type": "FPN", "in_features": ["c3", "c4", "c5"], "out_channels": 16, "extra_block": "p6p7",
                        "extra_from": extra_from}, path="model.neck", in_shapes=shapes)
    renamed = {k.replace("inner_blocks", "lateral_convs").replace("layer_blocks", "output_convs")
               .replace("extra_blocks.p6", "extra_convs.0").replace("extra_blocks.p7", "extra_convs.1"): v
               for k, v in reference.state_dict().items()}
    ours.load_state_dict(renamed, strict=True)
    x = {"c3": torch.rand(2, 16, 24, 20), "c4": torch.rand(2, 32, 12, 10), "c5": torch.rand(2, 64, 6, 5)}
    with torch.no_grad():
        expected, got = list(reference(x).values()), ours(x)
    assert list(got) == ["p3", "p4", "p5", "p6", "p7"] and ours.output_shape()["p7"] == ShapeSpec(16, 128)
    torch.testing.assert_close(list(got.values()), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------- a tiny RetinaNet
def tiny_config(**options) -> dict:
    """ResNet-18 (base 16) + FPN-32 P3-P7 + a two-conv RetinaNet head for 3 classes: fast on a CPU."""
    return {
        "type": "OneStageDetector",
        "backbone": {"type": "ResNet", "depth": 18, "base_channels": 16, "out_indices": [1, 2, 3]},
        "neck": {"type": "FPN", "in_features": ["c3", "c4", "c5"], "out_channels": 32, "extra_block": "p6p7"},
        "head": {"type": "RetinaNetHead", "num_classes": 3, "num_convs": 2,
                 "anchor_sizes": [list(s) for s in octave_anchor_sizes((16, 32, 64, 128, 256))]},
        **options,
    }


ATSS_HEAD = {"assigner": "atss", "aspect_ratios": [1.0], "anchor_sizes": [[32], [64], [128], [256], [512]]}


@pytest.mark.parametrize("head", [{}, ATSS_HEAD], ids=["max_iou", "atss"])
def test_training_returns_finite_losses_that_fall_on_fixed_images(head):
    torch.manual_seed(0)
    config = tiny_config()
    config["head"].update(head)
    model = MODELS.build(config, path="model").train()
    images, targets = synthetic_batch()
    steps = overfit(model, images, targets, steps=12, lr=1e-3)  # every loss a scalar
    assert all(set(step) == {"loss_cls", "loss_box_reg"} for step in steps)
    history = [sum(step.values()) for step in steps]
    assert all(math.isfinite(v) for v in history)
    assert sum(history[-3:]) < 0.6 * sum(history[:3]), history


def test_an_image_without_ground_truth_has_no_box_loss():
    torch.manual_seed(0)
    model = MODELS.build(tiny_config(), path="model").train()
    images, _ = synthetic_batch()
    losses = model(images[:1], [NO_TARGETS])
    assert float(losses["loss_box_reg"].detach()) == 0.0 and float(losses["loss_cls"].detach()) > 0.0
    sum(losses.values()).backward()
    assert model.head.bbox_pred.weight.grad is not None


def test_eval_outputs_are_in_input_image_coordinates_and_declared():
    torch.manual_seed(0)
    model = MODELS.build(tiny_config(min_size=160, max_size=256, score_threshold=0.0, detections_per_image=50),
                         path="model").eval()
    images = [torch.rand(3, 60, 90), torch.rand(3, 110, 70)]  # upscaled inside
    with torch.no_grad():
        outputs = model(images)
    for image, out in zip(images, outputs):
        h, w = image.shape[-2:]
        assert 0 < len(out["boxes"]) <= 50 and out["labels"].min() >= 1 and out["labels"].max() <= 3
        assert out["boxes"][:, 2].max() <= w + 1e-3 and out["boxes"][:, 3].max() <= h + 1e-3
        assert bool((out["scores"][:-1] >= out["scores"][1:]).all())
    info = describe(model)
    assert (info.task, info.num_classes, info.score_threshold, info.detections_per_image) == ("detection", 3, 0.0, 50)
    assert dict(info.feature_strides) == {"c3": 8, "c4": 16, "c5": 32} and model.default_cam_layer() == "c3"


def test_labels_out_of_range_and_missing_head_are_clear_errors():
    model = MODELS.build(tiny_config(), path="model").train()
    with pytest.raises(ValueError, match=r"1\.\.3"):
        model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([4])}])
    cfg = tiny_config()
    del cfg["head"]
    with pytest.raises(ConfigError, match="needs a 'head' section") as err:
        MODELS.build(cfg, path="model")
    assert err.value.key == "model.head"
    with pytest.raises(ConfigError, match="box_loss"):
        MODELS.build(tiny_config(head={**tiny_config()["head"], "box_loss": "iou"}), path="model")


# ---------------------------------------------------------------------------- the command-line tools
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny RetinaNet checkpoint (scores kept from 0, so every image has detections) with
    8 Shapes validation images of 64 px."""
    root = tmp_path_factory.mktemp("tiny_retinanet")
    cfg = {"model": tiny_config(score_threshold=0.0, detections_per_image=20),
           "data": {"batch_size": 4, "val": {"type": "Shapes", "split": "val", "num_images": 8, "image_size": 64,
                                             "root": str(root / "data"), "progress": False}},
           "evaluation": {"type": "CocoEvaluator", "main_metric": "bbox/AP"}, "work_dir": str(root / "work")}
    torch.manual_seed(0)
    model = segkit.build_model(cfg)
    path = root / "retinanet.ckpt"
    torch.save({"state_dict": model.state_dict(), CONFIG_KEY: cfg, CLASSES_KEY: ["circle", "square", "triangle"]}, path)
    return path


def _val_image_files(ckpt: Path, folder: Path) -> list[str]:
    """Two validation images of the checkpoint's data, written as PNG files into ``folder``."""
    import numpy as np
    from PIL import Image

    from segkit.registry import DATASETS

    dataset = DATASETS.build(segkit.config_from_checkpoint(ckpt)["data"]["val"], path="data.val")
    folder.mkdir()
    files = []
    for i in range(2):
        pixels = (dataset[i][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"v{i}.png")
        files.append(str(folder / f"v{i}.png"))
    return files


def test_segkit_eval_scores_a_retinanet_checkpoint(tiny_ckpt, tmp_path):
    out = tmp_path / "metrics.json"
    assert main(["eval", str(tiny_ckpt), "data.num_workers=0", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert 0.0 <= metrics["bbox/AP"] <= 1.0 and "bbox/AP50" in metrics


def test_segkit_predict_and_cam_draw_a_retinanet_s_detections(tiny_ckpt, tmp_path):
    files = _val_image_files(tiny_ckpt, tmp_path / "images")
    assert main(["predict", str(tiny_ckpt), *files, "--out", str(tmp_path / "predict"), "--score-thr", "0.0"]) == 0
    assert len(list((tmp_path / "predict").glob("*.png"))) == 2
    predictions = json.loads((tmp_path / "predict" / "predictions.json").read_text())
    assert predictions and {"bbox", "score", "category_id"} <= set(predictions[0])
    assert main(["cam", str(tiny_ckpt), *files, "--out", str(tmp_path / "cam")]) == 0
    assert len(list((tmp_path / "cam").glob("*.png"))) == 2


def _atss_by_hand(gt, anchors, level_sizes, topk):
    """ATSS written out box by box and level by level, with Python's statistics."""
    import statistics

    centres = [((a[0] + a[2]) / 2, (a[1] + a[3]) / 2) for a in anchors.tolist()]
    iou = torchvision.ops.box_iou(gt, anchors)
    best = [(-1.0, 0)] * len(anchors)
    for g, (x0, y0, x1, y1) in enumerate(gt.tolist()):
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        candidates, start = [], 0
        for size in level_sizes:
            order = sorted(range(start, start + size), key=lambda i: (centres[i][0] - cx) ** 2 + (centres[i][1] - cy) ** 2)
            candidates += order[:topk]
            start += size
        ious = [float(iou[g, i]) for i in candidates]
        threshold = statistics.mean(ious) + statistics.stdev(ious)
        for i, value in zip(candidates, ious):
            ax, ay = centres[i]
            if value >= threshold and min(ax - x0, ay - y0, x1 - ax, y1 - ay) > 0.01 and value > best[i][0]:
                best[i] = (value, g)
    return [g for _, g in best], [int(v >= 0) for v, _ in best]


def test_atss_matcher_equals_the_paper_s_rule_written_out():
    from segkit.ops import ATSSMatcher

    torch.manual_seed(0)
    sizes = [(16, 8, 32), (8, 16, 64), (4, 32, 128)]  # (grid, stride, anchor size) of three levels
    anchors = []
    for grid, stride, size in sizes:
        ys, xs = torch.meshgrid(torch.arange(grid) * stride + stride / 2, torch.arange(grid) * stride + stride / 2,
                                indexing="ij")
        ctr = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)
        anchors.append(torch.cat([ctr - size / 2, ctr + size / 2], 1))
    level_sizes = [len(a) for a in anchors]
    anchors = torch.cat(anchors)
    xy = torch.rand(12, 2) * 100
    wh = torch.rand(12, 2) * 60 + 4  # small, large and elongated boxes, overlapping each other
    gt = torch.cat([xy, xy + wh], 1)
    idx, labels = ATSSMatcher(topk=9)(gt, anchors, level_sizes)
    expected_idx, expected_labels = _atss_by_hand(gt, anchors, level_sizes, topk=9)
    assert labels.tolist() == expected_labels and 20 < sum(expected_labels) < len(anchors) // 4
    assert idx[labels == 1].tolist() == [g for g, fg in zip(expected_idx, expected_labels) if fg]
    empty_idx, empty_labels = ATSSMatcher()(gt[:0], anchors, level_sizes)
    assert not empty_labels.any() and len(empty_idx) == len(anchors)
    with pytest.raises(ValueError, match="level sizes summing to 10"):
        ATSSMatcher()(gt, anchors, [10])
    with pytest.raises(ValueError, match="topk must be >= 1"):
        ATSSMatcher(topk=0)


def test_atss_gives_a_small_box_more_foreground_anchors_than_iou_thresholds():
    torch.manual_seed(0)
    heads = {}
    for name, head in (("max_iou", {}), ("atss", ATSS_HEAD)):
        config = tiny_config()
        config["head"].update(head)
        heads[name] = MODELS.build(config, path="model").head
    feats = [torch.zeros(1, 32, 128 // s, 128 // s) for s in (8, 16, 32, 64, 128)]
    anchors = heads["atss"].anchor_generator(feats, (128, 128))
    small = [{"boxes": torch.tensor([[20.0, 20.0, 34.0, 34.0]]), "labels": torch.tensor([2])}]
    labels, boxes = heads["atss"]._match(torch.cat(anchors), small, [len(a) for a in anchors])
    assert int((labels == 2).sum()) >= 3 and set(labels.unique().tolist()) == {0, 2}
    iou_anchors = heads["max_iou"].anchor_generator(feats, (128, 128))
    iou_labels, _ = heads["max_iou"]._match(torch.cat(iou_anchors), small, [len(a) for a in iou_anchors])
    assert int((iou_labels == 2).sum()) < int((labels == 2).sum())
    with pytest.raises(ValueError, match="assigner must be one of max_iou, atss, got 'atss2'"):
        HEADS.build({"type": "RetinaNetHead", "num_classes": 3, "assigner": "atss2",
                     "in_shapes": {f"p{i}": ShapeSpec(32, 2 ** i) for i in range(3, 8)}}, path="head")
