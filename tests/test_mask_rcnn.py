"""Mask R-CNN: torchvision parity (masks, losses), mask ops, training on masks, input errors."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torchvision.models.detection import roi_heads as tv_roi_heads

from segkit_plugins.heads.rcnn_weights import convert_torchvision_detector
from segkit.ops.masks import paste_masks_in_image, project_masks_on_boxes, resize_masks
from segkit.errors import ConfigError
from segkit.registry import MODELS

from tests.reference import overfit, torchvision_head_losses
from test_detector import synthetic_batch, tiny_config

SIZE = {"min_size": 192, "max_size": 320}


def mask_config(**roi_options) -> dict:
    cfg = tiny_config()
    cfg["roi_head"]["mask_head"] = {"type": "MaskRCNNHead", "num_convs": 2, "conv_dim": 32, **roi_options}
    return cfg


def masks_of(images, targets):
    """Rectangle masks for the synthetic boxes (the boxes are filled rectangles)."""
    out = []
    for image, target in zip(images, targets):
        masks = torch.zeros(len(target["boxes"]), *image.shape[-2:], dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(target["boxes"].round().long().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        out.append({**target, "masks": masks})
    return out


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU per instance of two bool [N, H, W] stacks; 1 where both are empty."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


# ---------------------------------------------------------------------------- torchvision parity
@pytest.fixture(scope="module")
def parity_models():
    torch.manual_seed(0)
    reference = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, box_score_thresh=0.01,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, **SIZE,
    ).eval()
    # Untrained mask logits sit near 0 (exactly 0 where a thin box pools zeros): spread them (not so
    # far that probabilities saturate at 1, which puts the edge pixels of thin boxes at 0.5) and
    # shift them per class so that thresholding at 0.5 is well-posed.
    with torch.no_grad():
        predictor = reference.roi_heads.mask_predictor.mask_fcn_logits
        predictor.weight.mul_(3)
        predictor.bias.uniform_(-1, 1)
    ours = MODELS.build(
        {
            "type": "TwoStageDetector", **SIZE,
            "backbone": {"type": "ResNet", "depth": 50},
            "neck": {"type": "FPN", "out_channels": 256},
            "rpn_head": {"type": "RPN", "pre_nms_top_n_test": 300, "post_nms_top_n_test": 100},
            "roi_head": {"type": "StandardRoIHead", "num_classes": 90, "score_threshold": 0.01,
                         "mask_head": {"type": "MaskRCNNHead"}},
        },
        path="model",
    ).eval()
    ours.load_state_dict(convert_torchvision_detector(reference.state_dict())[0], strict=True)
    images = [torch.rand(3, 200, 300), torch.rand(3, 240, 320)]
    return reference, ours, images


def test_detections_and_masks_equal_torchvision_mask_rcnn(parity_models):
    reference, ours, images = parity_models
    with torch.no_grad():
        expected, got = reference(images), ours(images)
    for image, exp, out in zip(images, expected, got):
        assert len(out["boxes"]) > 0
        torch.testing.assert_close(out["boxes"], exp["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(out["scores"], exp["scores"], atol=1e-4, rtol=0)
        assert torch.equal(out["labels"], exp["labels"])
        assert out["masks"].shape == exp["masks"].shape == (len(out["boxes"]), 1, *image.shape[-2:])
        torch.testing.assert_close(out["masks"], exp["masks"], atol=1e-4, rtol=0)
        # Binary masks: pixels whose probability is within the tolerance of the threshold may
        # flip (random weights put some exactly at 0.5); they are left out of the IoU.
        clear = (exp["masks"][:, 0] - 0.5).abs() > 1e-4
        ious = mask_iou((out["masks"][:, 0] > 0.5) & clear, (exp["masks"][:, 0] > 0.5) & clear)
        assert ious.min() > 0.99
        assert (out["masks"] > 0.5).sum() > 1000


def test_mask_loss_equals_torchvision_given_the_same_sampling(parity_models):
    reference, ours, images = parity_models
    boxes = [torch.tensor([[20.0, 30.0, 120.0, 150.0], [150.0, 40.0, 290.0, 110.0]]), torch.tensor([[5.0, 5.0, 60.0, 90.0]])]
    targets = []
    for image, b, labels in zip(images, boxes, (torch.tensor([3, 17]), torch.tensor([1]))):
        masks = torch.zeros(len(b), *image.shape[-2:], dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(b.long().tolist()):  # ellipses inside the boxes
            yy, xx = torch.meshgrid(torch.arange(image.shape[-2]), torch.arange(image.shape[-1]), indexing="ij")
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            masks[k] = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).to(torch.uint8)
        targets.append({"boxes": b, "labels": labels, "masks": masks})
    expected, got = torchvision_head_losses(reference, ours, images, targets)
    assert expected["loss_mask"] > 0.1
    pairs = {"loss_rpn_cls": "loss_objectness", "loss_rpn_box": "loss_rpn_box_reg", "loss_cls": "loss_classifier",
             "loss_box_reg": "loss_box_reg", "loss_mask": "loss_mask"}
    for name, tv_name in pairs.items():
        torch.testing.assert_close(got[name], expected[tv_name], atol=1e-4, rtol=0, msg=name)


# ---------------------------------------------------------------------------- mask ops
def test_paste_masks_equals_torchvision_paste():
    torch.manual_seed(0)
    height, width = 120, 160
    masks = torch.rand(40, 1, 28, 28)
    corner = torch.rand(40, 2) * torch.tensor([width, height]) * 0.9
    boxes = torch.cat([corner, corner + torch.rand(40, 2) * 80 + 0.2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(max=width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(max=height)
    boxes[0] = torch.tensor([5.0, 6.0, 5.3, 6.2])  # a sub-pixel box
    expected = tv_roi_heads.paste_masks_in_image(masks, boxes, (height, width))[:, 0]
    got = paste_masks_in_image(masks, boxes, (height, width))
    assert got.shape == (40, height, width)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert paste_masks_in_image(masks[:0], boxes[:0], (height, width)).shape == (0, height, width)


def test_paste_mask_lies_inside_its_box():
    box = torch.tensor([[30.0, 20.0, 70.0, 50.0]])
    pasted = paste_masks_in_image(torch.ones(1, 28, 28), box, (80, 100))[0]
    ys, xs = torch.nonzero(pasted > 0.5, as_tuple=True)
    assert xs.min() >= 29 and xs.max() <= 71 and ys.min() >= 19 and ys.max() <= 51
    assert pasted[35, 50] == pytest.approx(1.0) and pasted[5, 5] == 0.0


def test_mask_targets_equal_torchvision_projection():
    torch.manual_seed(0)
    gt = (torch.rand(3, 50, 60) > 0.5).to(torch.uint8)
    boxes = torch.tensor([[1.0, 2.0, 30.0, 40.0], [10.0, 5.0, 59.0, 49.0], [0.0, 0.0, 12.5, 7.5]])
    idx = torch.tensor([2, 0, 1])
    expected = tv_roi_heads.project_masks_on_boxes(gt, boxes, idx, 28)
    torch.testing.assert_close(project_masks_on_boxes(gt, boxes, idx, 28), expected)


def test_target_masks_are_resized_with_the_images():
    model = MODELS.build({**mask_config(), "min_size": 64, "max_size": 200}, path="model")
    image = torch.rand(3, 32, 40)
    masks = torch.zeros(1, 32, 40, dtype=torch.uint8)
    masks[0, 8:16, 10:20] = 1
    target = {"boxes": torch.tensor([[10.0, 8.0, 20.0, 16.0]]), "labels": torch.tensor([1]), "masks": masks}
    _, sizes, new_targets = model.preprocess([image], [target])
    assert sizes == [(64, 80)] and new_targets[0]["masks"].shape == (1, 64, 80)
    assert new_targets[0]["masks"].sum() == 4 * masks.sum()
    assert torch.equal(resize_masks(masks, 2.0), new_targets[0]["masks"])


# ---------------------------------------------------------------------------- training
def test_training_adds_a_mask_loss_that_backpropagates():
    torch.manual_seed(0)
    model = MODELS.build(mask_config(), path="model").train()
    images, targets = synthetic_batch()
    losses = model(images, masks_of(images, targets))
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box_reg", "loss_mask"}
    assert math.log(2) * 0.9 < float(losses["loss_mask"].detach()) < math.log(2) * 1.1  # untrained: p = 0.5
    sum(losses.values()).backward()
    assert model.roi_heads.mask_head.predictor.weight.grad.abs().sum() > 0


def test_mask_loss_falls_and_masks_fit_the_objects():
    torch.manual_seed(0)
    model = MODELS.build(mask_config(), path="model").train()
    images, targets = synthetic_batch()
    targets = masks_of(images, targets)
    history = [step["loss_mask"] for step in overfit(model, images, targets, steps=40, lr=2e-3)]
    assert history[-1] < 0.5 * history[0], history
    # The ground-truth boxes as RoIs: the predicted masks must cover the rectangles.
    model.eval()
    with torch.no_grad():
        batch, _, _ = model.preprocess(images)
        features = model.extract_features(batch)
        detections = model.roi_heads.mask_head(features, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    for det, target in zip(detections, targets):
        pasted = paste_masks_in_image(det["roi_masks"], det["boxes"], tuple(target["masks"].shape[-2:]))
        assert mask_iou(pasted > 0.5, target["masks"].bool()).mean() > 0.7


def test_images_without_objects_give_a_zero_mask_loss():
    torch.manual_seed(0)
    model = MODELS.build(mask_config(), path="model").train()
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}]
    losses = model(images, targets)
    assert losses["loss_mask"] == 0.0
    losses["loss_mask"].backward()  # still connected to the graph (needed by DDP)


def test_class_agnostic_head_predicts_one_map():
    model = MODELS.build(mask_config(class_agnostic=True), path="model")
    assert model.roi_heads.mask_head.predictor.out_channels == 1
    images, targets = synthetic_batch()
    assert torch.isfinite(model.train()(images, masks_of(images, targets))["loss_mask"])
    with torch.no_grad():
        out = model.eval()(images)
    assert all(o["masks"].shape == (len(o["boxes"]), 1, *img.shape[-2:]) for o, img in zip(out, images))


def test_max_train_rois_caps_the_rois_that_train_the_mask_head():
    model = MODELS.build(mask_config(max_train_rois=2), path="model").train()
    seen = []
    hook = model.roi_heads.mask_head.predictor.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    images, targets = synthetic_batch()
    try:
        losses = model(images, masks_of(images, targets))
    finally:
        hook.remove()
    # Each image has at least 2 positives (its ground-truth boxes join the proposals), the first 3 or more.
    assert seen == [4] and torch.isfinite(losses["loss_mask"])


# ---------------------------------------------------------------------------- errors
def test_missing_masks_in_training_is_a_clear_error():
    model = MODELS.build(mask_config(), path="model").train()
    images, targets = synthetic_batch()
    with pytest.raises(ConfigError, match=r"has no 'masks'.*with_masks: true") as info:
        model(images, targets)
    assert info.value.key == "data.train.with_masks"


def test_training_a_mask_head_on_data_without_masks_exits_2(tmp_path, capsys):
    """A user error, not a traceback: `segkit train` of a Mask R-CNN on boxes only."""
    from segkit.cli import main
    from tests.conftest import TINY_CONFIG

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG.format(root=tmp_path / "data", work_dir=tmp_path / "work"))
    with pytest.raises(SystemExit) as info:
        main(["train", str(config), "trainer.max_epochs=1", "trainer.limit_train_batches=1",
              "model.roi_head.mask_head={type: MaskRCNNHead, num_convs: 1, conv_dim: 8}"])
    assert info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "has no 'masks'" in err and "with_masks: true" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "masks,match",
    [
        (torch.zeros(2, 96, 128, dtype=torch.uint8), r"\[3, 96, 128\]"),
        (torch.zeros(3, 90, 128, dtype=torch.uint8), r"\[3, 96, 128\]"),
        (torch.zeros(3, 96, 128), "uint8 or bool"),
    ],
)
def test_malformed_target_masks_are_clear_errors(masks, match):
    model = MODELS.build(mask_config(), path="model").train()
    images, targets = synthetic_batch()
    targets = masks_of(images, targets)
    targets[0]["masks"] = masks
    with pytest.raises(ValueError, match=match):
        model(images, targets)


def test_mask_head_config_errors_name_the_key():
    from segkit.errors import ConfigError

    cfg = mask_config(num_conv=3)
    with pytest.raises(ConfigError) as err:
        MODELS.build(cfg, path="model")
    assert err.value.key == "model.roi_head.mask_head.num_conv" and "num_convs" in str(err.value)
