"""The YOLO-style head (YOLOHead + SimOTA) in OneStageDetector: outputs per grid cell, decoding, the
assignment on hand-made cases and against a plain per-box reference, losses, learning on a tiny batch,
coordinates after resizing, config errors, and FPN / PAFPN necks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

import segkit
from segkit.errors import ConfigError
from segkit.models import describe
from segkit.ops import ShapeSpec
from segkit.registry import HEADS, MODELS
from segkit_plugins.heads.simota import candidate_cells, simota_assign
from segkit_plugins.heads.yolo_head import YOLOHead
from tests.reference import overfit
from tests.test_detector import synthetic_batch

SHAPES = {"p3": ShapeSpec(8, 8), "p4": ShapeSpec(8, 16), "p5": ShapeSpec(8, 32)}
BACKBONE = {"type": "ResNet", "depth": 18, "base_channels": 8, "out_indices": [1, 2, 3], "frozen_stages": -1,
            "norm": "BN"}
NECKS = {"FPN": {"type": "FPN", "in_features": ["c3", "c4", "c5"], "out_channels": 16, "extra_block": None},
         "PAFPN": {"type": "PAFPN", "in_features": ["c3", "c4", "c5"], "out_channels": 16, "extra_block": None}}
DETECTOR = {"type": "OneStageDetector", "backbone": BACKBONE, "neck": NECKS["PAFPN"],
            "head": {"type": "YOLOHead", "num_classes": 3, "feat_channels": 16, "num_convs": 1}}
NO_TARGETS = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


def _head(**options) -> YOLOHead:
    torch.manual_seed(0)
    return YOLOHead(in_shapes=SHAPES, num_classes=3, feat_channels=8, num_convs=1, **options)


def _features(n: int = 2, size: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {name: torch.randn(n, 8, size // s.stride, size // s.stride, generator=g) for name, s in SHAPES.items()}


def _grid(size: int = 64, strides=(8, 16, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres Tensor[A, 2] and strides Tensor[A] of a square image, finest level first, row-major."""
    head = YOLOHead(in_shapes={f"p{int(math.log2(s))}": ShapeSpec(4, s) for s in strides}, num_classes=1,
                    in_features=[f"p{int(math.log2(s))}" for s in strides], feat_channels=4, num_convs=0)
    centers, level_strides = head.cell_centers([torch.zeros(1, 4, size // s, size // s) for s in strides])
    return torch.cat(centers), torch.cat(level_strides)


# ------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("share_levels", [False, True])
def test_one_score_per_class_and_one_box_per_cell_of_every_level(share_levels):
    head = _head(share_levels=share_levels).eval()
    with torch.no_grad():
        levels, losses = head(_features(), (64, 64))
    assert losses == {}
    assert [(tuple(s.shape), tuple(b.shape)) for s, b in levels] == [
        ((2, 64, 3), (2, 64, 4)), ((2, 16, 3), (2, 16, 4)), ((2, 4, 3), (2, 4, 4))]
    assert all(bool(((s >= 0) & (s <= 1)).all()) for s, _ in levels)
    assert len(head.stems) == (1 if share_levels else 3)


def test_untrained_cells_predict_a_stride_sized_box_at_their_centre_with_the_prior_squared():
    head = _head(prior_probability=0.02).eval()
    for conv in (*head.reg_preds, *head.cls_preds, *head.obj_preds):
        torch.nn.init.zeros_(conv.weight)
    for conv in head.reg_preds:
        torch.nn.init.zeros_(conv.bias)
    with torch.no_grad():
        levels, _ = head(_features(n=1), (64, 64))
    scores, boxes = levels[1]  # p4: stride 16, 4x4 cells
    assert torch.allclose(scores, torch.full_like(scores, 0.02 * 0.02))
    # Row-major: cell 5 is row 1, column 1, centred at (24, 24).
    assert boxes[0, 5].tolist() == [16.0, 16.0, 32.0, 32.0]
    offsets = torch.tensor([[[0.5, -0.25, math.log(2.0), 0.0]]])
    assert YOLOHead.decode(offsets, torch.tensor([[24.0, 24.0]]), torch.tensor([16.0]))[0, 0].tolist() == [
        16.0, 12.0, 48.0, 28.0]


# ------------------------------------------------------------------------------------ assignment
def _perfect(boxes: torch.Tensor, count: int) -> torch.Tensor:
    return boxes[:1].expand(count, 4).clone()


def test_a_box_gets_positives_only_inside_it_and_its_centre_region():
    centers, strides = _grid()
    gt = torch.tensor([[8.0, 8.0, 56.0, 56.0]])
    scores = torch.full((len(centers), 3), 0.1)
    fg, matched_gt, matched_iou = simota_assign(scores, _perfect(gt, len(centers)), centers, strides, gt,
                                                torch.tensor([1]))
    assert int(fg.sum()) == 10  # every candidate predicts the box exactly: k = min(10, sum of top-10 IoUs)
    x, y, s = centers[fg, 0], centers[fg, 1], strides[fg]
    assert bool(((x > 8) & (x < 56) & (y > 8) & (y < 56)).all())
    assert bool((((x - 32).abs() < 2.5 * s) & ((y - 32).abs() < 2.5 * s)).all())
    assert matched_gt.tolist() == [0] * 10 and torch.allclose(matched_iou, torch.ones(10))


@pytest.mark.parametrize("iou,k", [(0.35, 3), (0.05, 1), (1.0, 10)])
def test_dynamic_k_is_the_integer_sum_of_the_ten_best_ious_at_least_one(iou, k):
    centers, strides = _grid()
    gt = torch.tensor([[16.0, 16.0, 48.0, 48.0]])
    # Boxes sharing gt's left, top and height, narrowed to the wanted IoU.
    pred = gt.repeat(len(centers), 1)
    pred[:, 2] = 16.0 + 32.0 * iou
    fg, _, matched_iou = simota_assign(torch.full((len(centers), 3), 0.1), pred, centers, strides, gt,
                                       torch.tensor([0]))
    assert int(fg.sum()) == k and torch.allclose(matched_iou, torch.full((k,), iou))


def test_a_cell_claimed_by_two_boxes_goes_to_the_one_it_costs_least():
    centers, strides = _grid()
    gts = torch.tensor([[8.0, 8.0, 56.0, 56.0]] * 2)
    # The same box twice, with the predictions favouring the first one's class: both claim the same
    # cells (the same IoUs, each cell's a little different), and each cell goes to the first box.
    pred = gts[:1] + torch.arange(len(centers), dtype=torch.float32)[:, None] * torch.tensor([0.1, 0.1, -0.1, -0.1])
    scores = torch.tensor([[0.8, 0.2, 0.2]]).expand(len(centers), 3)
    fg, matched_gt, _ = simota_assign(scores, pred, centers, strides, gts, torch.tensor([0, 1]))
    candidates, _ = candidate_cells(centers, strides, gts, 2.5)
    k = int(box_iou(gts[:1], pred[candidates])[0].topk(10).values.sum())
    assert k > 1 and int(fg.sum()) == k and matched_gt.tolist() == [0] * k


def test_an_image_without_boxes_has_no_positive():
    centers, strides = _grid()
    fg, matched_gt, _ = simota_assign(torch.rand(len(centers), 3), torch.rand(len(centers), 4), centers, strides,
                                      torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert not fg.any() and matched_gt.numel() == 0


def _reference_simota(scores, pred, centers, strides, gts, labels, radius=2.5, topk=10, iou_weight=3.0):
    """SimOTA written box by box, as the YOLOX paper describes it: {cell: box} of the assignment."""
    x, y = centers[:, 0], centers[:, 1]
    cost, ious = {}, {}
    in_box = [(x > g[0]) & (x < g[2]) & (y > g[1]) & (y < g[3]) for g in gts]
    in_center = [((x - (g[0] + g[2]) / 2).abs() < radius * strides) & ((y - (g[1] + g[3]) / 2).abs() < radius * strides)
                 for g in gts]
    candidates = torch.nonzero(torch.stack([b | c for b, c in zip(in_box, in_center)]).any(0)).squeeze(1).tolist()
    for g, (box, label) in enumerate(zip(gts, labels)):
        iou = box_iou(box[None], pred[candidates])[0]
        p = scores[candidates].sqrt()
        cls = F.binary_cross_entropy(p, F.one_hot(label, scores.shape[1]).float().expand_as(p), reduction="none").sum(1)
        outside = ~(in_box[g] & in_center[g])[candidates]
        cost[g] = cls + iou_weight * -torch.log(iou + 1e-8) + 1e5 * outside.float()
        ious[g] = iou
    claims: dict[int, list[int]] = {}
    for g in range(len(gts)):
        k = max(1, int(ious[g].topk(min(topk, len(candidates))).values.sum()))
        for j in cost[g].argsort()[:k].tolist():
            claims.setdefault(candidates[j], []).append(g)
    return {cell: (owners[0] if len(owners) == 1 else
                   min(range(len(gts)), key=lambda g: float(cost[g][candidates.index(cell)])))
            for cell, owners in claims.items()}


@pytest.mark.parametrize("seed", range(4))
def test_assignment_equals_a_per_box_reference_on_random_cases(seed):
    g = torch.Generator().manual_seed(seed)
    centers, strides = _grid(96)
    xy = torch.rand(4, 2, generator=g) * 60
    gts = torch.cat([xy, xy + 12 + torch.rand(4, 2, generator=g) * 30], 1)
    labels = torch.randint(0, 3, (4,), generator=g)
    c = centers + torch.randn(len(centers), 2, generator=g) * 4
    wh = (torch.rand(len(centers), 2, generator=g) * 40 + 8) / 2
    pred = torch.cat([c - wh, c + wh], 1)
    scores = torch.rand(len(centers), 3, generator=g) * 0.9 + 0.05
    fg, matched_gt, _ = simota_assign(scores, pred, centers, strides, gts, labels)
    ours = dict(zip(torch.nonzero(fg).squeeze(1).tolist(), matched_gt.tolist()))
    assert ours == _reference_simota(scores, pred, centers, strides, gts, labels)


# ------------------------------------------------------------------------------------------ losses
def test_an_image_without_boxes_gives_only_the_objectness_loss():
    head = _head().train()
    losses = head(_features(n=1), (64, 64), [NO_TARGETS])[1]
    assert set(losses) == {"loss_obj", "loss_cls", "loss_box"}
    values = {k: float(v.detach()) for k, v in losses.items()}
    assert values["loss_cls"] == 0.0 and values["loss_box"] == 0.0 and values["loss_obj"] > 0
    sum(losses.values()).backward()
    assert all(float(p.grad.abs().sum()) == 0.0 for p in head.cls_preds.parameters())
    assert float(head.obj_preds[0].bias.grad.abs().sum()) > 0


def test_losses_are_normalised_by_the_number_of_positives():
    head = _head().train()
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]]), "labels": torch.tensor([2])}, NO_TARGETS]
    feats = _features()
    losses = head(feats, (64, 64), targets)[1]
    # Recomputed from the head's own outputs and the assignment.
    logits, offsets, objectness = head.predict([feats[f] for f in head.in_features])
    centers, strides = (torch.cat(t) for t in head.cell_centers([feats[f] for f in head.in_features]))
    boxes = head.decode(torch.cat(offsets, 1), centers, strides)
    logits, objectness = torch.cat(logits, 1), torch.cat(objectness, 1)
    scores = torch.sigmoid(logits[0]) * torch.sigmoid(objectness[0])[:, None]
    fg, _, iou = simota_assign(scores.detach(), boxes[0].detach(), centers, strides, targets[0]["boxes"],
                               torch.tensor([1]))
    n = int(fg.sum())
    obj = F.binary_cross_entropy_with_logits(objectness[0], fg.float(), reduction="sum")
    obj = obj + F.binary_cross_entropy_with_logits(objectness[1], torch.zeros_like(objectness[1]), reduction="sum")
    cls_target = torch.zeros(n, 3)
    cls_target[:, 1] = iou
    cls = F.binary_cross_entropy_with_logits(logits[0][fg], cls_target, reduction="sum")
    box_iou_fg = box_iou(boxes[0][fg], targets[0]["boxes"])[:, 0]
    assert torch.allclose(losses["loss_obj"], obj / n, rtol=1e-5)
    assert torch.allclose(losses["loss_cls"], cls / n, rtol=1e-5)
    assert torch.allclose(losses["loss_box"], 5.0 * (1 - box_iou_fg**2).sum() / n, rtol=1e-5)


@pytest.fixture(scope="module")
def trained():
    """A tiny detector overfitted on two images for a few steps, and its loss history."""
    torch.manual_seed(0)
    model = MODELS.build(DETECTOR, path="model").train()
    images, targets = synthetic_batch()
    history = overfit(model, images, targets, steps=16, lr=1e-2)
    return model.eval(), history


def test_losses_are_finite_and_fall_when_overfitting_a_tiny_batch(trained):
    _, history = trained
    assert all(math.isfinite(v) for step in history for v in step.values())
    total = [sum(step.values()) for step in history]
    assert sum(total[-3:]) < 0.7 * sum(total[:3]), total
    assert history[-1]["loss_obj"] < 0.5 * history[0]["loss_obj"]


def test_detections_are_in_input_image_coordinates_after_resize(trained):
    model, _ = trained
    model.preprocessor.min_size, model.preprocessor.max_size = 64, 96  # 96x128 -> 64x85, 128x96 -> 85x64
    images = [im for im in synthetic_batch()[0]]
    try:
        with torch.no_grad():
            results = model(images)
            batch = model.preprocessor(images)
            levels, _ = model.head(model.extract_features(batch.tensor), tuple(batch.tensor.shape[-2:]))
            selected = model.select_detections(levels, batch.image_sizes)
    finally:
        model.preprocessor.min_size = model.preprocessor.max_size = None
    for image, result, inner, size in zip(images, results, selected, batch.image_sizes):
        h, w = image.shape[-2:]
        assert size != (h, w) and len(result["boxes"]) > 0
        scale = torch.tensor([w / size[1], h / size[0]] * 2)
        assert torch.allclose(result["boxes"], inner["boxes"] * scale, atol=1e-4)
        boxes = result["boxes"]
        assert bool(((boxes[:, 0::2] >= 0) & (boxes[:, 0::2] <= w) & (boxes[:, 1::2] >= 0) & (boxes[:, 1::2] <= h)).all())
    assert describe(model).task == "detection" and describe(model).num_classes == 3


# ----------------------------------------------------------------------------------- config, necks
@pytest.mark.parametrize("key,value,words", [
    ("box_loss", "l2", "box_loss"), ("activation", "gelu", "activation"), ("center_radius", 0, "center_radius"),
    ("in_features", ["p3", "p6"], "in_features"), ("prior_probability", 1.5, "prior_probability")])
def test_a_bad_head_value_is_a_config_error_naming_the_key(key, value, words):
    cfg = {**DETECTOR, "head": {**DETECTOR["head"], key: value}}
    with pytest.raises(ConfigError) as info:
        MODELS.build(cfg, path="model")
    assert "model.head" in str(info.value) and words in str(info.value)


def test_an_unknown_head_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"model\.head\.feat_channel.*feat_channels"):
        MODELS.build({**DETECTOR, "head": {**DETECTOR["head"], "feat_channel": 16}}, path="model")


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(ValueError, match="1..3"):
        _head().train()(_features(n=1), (64, 64), [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]),
                                                    "labels": torch.tensor([4])}])


@pytest.mark.parametrize("neck", ["FPN", "PAFPN"])
def test_builds_trains_and_detects_with_fpn_and_pafpn_necks(neck):
    torch.manual_seed(0)
    model = MODELS.build({**DETECTOR, "neck": NECKS[neck]}, path="model")
    assert type(model.neck).__name__ == neck and model.head.strides == (8, 16, 32)
    images, targets = synthetic_batch()
    losses = model.train()(images, [targets[0], NO_TARGETS])
    assert all(math.isfinite(float(v)) for v in losses.values())
    with torch.no_grad():
        results = model.eval()(images)
    assert [set(r) for r in results] == [{"boxes", "labels", "scores"}] * 2


def test_the_quickstart_and_coco_configs_build_the_head_on_pafpn_p3_to_p5():
    for name in ("quickstart_yolo.yaml", "yolo_r50_pafpn_coco.yaml"):
        cfg = segkit.load_config(f"configs/{name}", ["model.backbone.pretrained=null"])
        assert cfg["model"]["neck"]["type"] == "PAFPN" and cfg["model"]["head"]["type"] == "YOLOHead"
        assert cfg["model"]["neck"]["extra_block"] is None and cfg["model"]["head"]["in_features"] == ["p3", "p4", "p5"]
    assert "YOLOHead" in HEADS


@pytest.mark.parametrize("share_levels", [False, True], ids=["per_level", "shared"])
def test_exported_yolo_detector_gives_the_same_detections(tmp_path, share_levels):
    from segkit.export import check_export, export_model

    torch.manual_seed(0)
    config = {**DETECTOR, "head": {**DETECTOR["head"], "share_levels": share_levels}, "score_threshold": 0.0,
              "detections_per_image": 20}
    model = MODELS.build(config, path="model").eval()
    image = torch.rand(3, 96, 128)
    assert export_model(model, tmp_path / "yolo.pt", "torchscript", image)["outputs"] == ["boxes", "labels", "scores"]
    report = check_export(tmp_path / "yolo.pt", model, [image, torch.rand(3, 96, 128)])  # traced at one size
    assert report["max_abs_diff"] <= 1e-4 and report["detections"] == 40
