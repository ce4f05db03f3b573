"""SSD300 (OneStageDetector + VGG + SSDExtraLayers + SSDHead): torchvision parity of detections and losses
after `segkit convert`, default boxes, the VGG backbone and its ImageNet weights, a tiny SSD that
trains, and the errors of the new options."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator as TorchvisionDefaultBoxes
from torchvision.models.detection.image_list import ImageList

import segkit
from segkit.checkpoint import CLASSES_KEY, CONFIG_KEY, CheckpointError
from segkit.errors import ConfigError
from segkit.models import describe
from segkit.ops import DefaultBoxGenerator
from segkit.registry import BACKBONES, MODELS
from segkit_plugins.heads.ssd_weights import convert_torchvision_ssd
from tests.reference import NO_TARGETS, assert_same_detections, convert_and_load, overfit
from tests.test_detector import synthetic_batch

TARGETS = [
    {"boxes": torch.tensor([[20.0, 30.0, 120.0, 150.0], [150.0, 40.0, 290.0, 110.0]]), "labels": torch.tensor([3, 17])},
    {"boxes": torch.tensor([[5.0, 5.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
]


def _torchvision_ssd() -> torch.nn.Module:
    """A random torchvision ssd300_vgg16 whose class biases are spread, so that the score threshold and the
    per-class top-k choose among the boxes."""
    torch.manual_seed(0)
    model = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91)
    with torch.no_grad():
        for conv in model.head.classification_head.module_list:
            conv.bias.view(-1, 91).uniform_(-3.0, 3.0)
    return model.eval()


# ---------------------------------------------------------------------------- torchvision parity
@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory):
    """torchvision's ssd300_vgg16, segkit's model from `segkit convert` of its state dict, both run once on
    two images of different sizes (not 300x300) with their feature maps captured."""
    folder = tmp_path_factory.mktemp("ssd")
    reference = _torchvision_ssd()
    ours, _ = convert_and_load(reference, folder)
    images = [torch.rand(3, 240, 320), torch.rand(3, 180, 150)]
    captured = {}
    hooks = [reference.backbone.register_forward_hook(lambda m, args, out: captured.update(tv=(args[0], out))),
             ours.backbone.register_forward_hook(lambda m, args, out: captured.update(batch=args[0])),
             ours.neck.register_forward_hook(lambda m, args, out: captured.update(ours=out))]
    try:
        with torch.no_grad():
            expected, got = reference(images), ours(images)
    finally:
        for hook in hooks:
            hook.remove()
    return {"reference": reference, "ours": ours, "images": images, "expected": expected, "got": got,
            "captured": captured, "file": folder / "segkit.pth"}


def test_detections_equal_torchvision_ssd300_with_the_same_weights(parity):
    assert not parity["ours"].training
    assert_same_detections(parity["expected"], parity["got"], score_atol=1e-5)
    for image, out in zip(parity["images"], parity["got"]):
        assert len(out["boxes"]) <= 200
        assert out["boxes"][:, 2].max() <= image.shape[-1] + 1e-3 and out["boxes"][:, 3].max() <= image.shape[-2] + 1e-3
    # The threshold and the top-k both chose: 91-way softmax scores straddle 0.01, and some classes hold
    # more than 400 boxes above it.
    assert parity["got"][0]["scores"].min() > 0.01


def test_preprocessing_and_feature_maps_equal_torchvision_ssd300(parity):
    tv_batch, tv_maps = parity["captured"]["tv"]
    assert tuple(parity["captured"]["batch"].shape) == (2, 3, 300, 300)  # fixed size, aspect ratio not kept
    torch.testing.assert_close(parity["captured"]["batch"], tv_batch)
    maps = parity["captured"]["ours"]
    assert list(maps) == ["conv4", "fc7", "conv8_2", "conv9_2", "conv10_2", "conv11_2"]
    assert [m.shape[-1] for m in maps.values()] == [38, 19, 10, 5, 3, 1]
    torch.testing.assert_close(list(maps.values()), list(tv_maps.values()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("targets", [TARGETS, [TARGETS[0], NO_TARGETS]], ids=["boxes", "image_without_boxes"])
def test_losses_equal_torchvision_ssd300(parity, targets):
    from torchvision.ops import box_iou

    reference, ours, images = parity["reference"], parity["ours"], parity["images"]
    _, tv_maps = parity["captured"]["tv"]
    features = list(tv_maps.values())
    with torch.no_grad():
        tv_images, tv_targets = reference.transform(images, [dict(t) for t in targets])
        anchors = reference.anchor_generator(tv_images, features)
        matched = [reference.proposal_matcher(box_iou(t["boxes"], a)) if len(t["boxes"]) else
                   torch.full((len(a),), -1, dtype=torch.int64) for a, t in zip(anchors, tv_targets)]
        expected = reference.compute_loss(tv_targets, reference.head(features), anchors, matched)
        _, _, our_targets = ours.preprocess(images, targets)
        try:
            ours.head.train()
            _, got = ours.head(parity["captured"]["ours"], (300, 300), our_targets)
        finally:
            ours.head.eval()
    assert float(expected["classification"]) > 0
    torch.testing.assert_close(got["loss_cls"], expected["classification"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["loss_box_reg"], expected["bbox_regression"], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_whole_training_forward_equals_torchvision_ssd300():
    """End to end in train mode (targets resized with the images inside both models), one image without
    boxes, and images of other sizes than the fast tests'."""
    reference = _torchvision_ssd()
    state, cfg = convert_torchvision_ssd(reference.state_dict())
    ours = segkit.build_model(cfg)
    ours.load_state_dict(state, strict=True)
    images = [torch.rand(3, 400, 260), torch.rand(3, 300, 300), torch.rand(3, 120, 500)]
    targets = [TARGETS[0], NO_TARGETS, {"boxes": torch.tensor([[10.0, 20.0, 480.0, 110.0]]), "labels": torch.tensor([90])}]
    reference.train()
    ours.train()
    with torch.no_grad():
        expected, got = reference(images, targets), ours(images, targets)
    torch.testing.assert_close(got["loss_cls"], expected["classification"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["loss_box_reg"], expected["bbox_regression"], atol=1e-5, rtol=1e-5)


def test_converted_checkpoint_carries_torchvision_s_config_and_coco_names(parity):
    ckpt = torch.load(parity["file"], weights_only=True)
    cfg, classes = ckpt[CONFIG_KEY], ckpt[CLASSES_KEY]
    model = cfg["model"]
    assert (model["selection"], model["fixed_size"], model["topk_candidates"], model["detections_per_image"]) == \
        ("per_class", [300, 300], 400, 200)
    assert model["backbone"]["type"] == "VGG" and model["neck"]["type"] == "SSDExtraLayers"
    assert model["head"]["num_classes"] == 90 and ckpt["state_dict"]["head.cls_logits.0.weight"].shape[0] == 4 * 91
    assert len(classes) == 90 and classes[0] == "person" and cfg["work_dir"] == "work_dirs/ssd300_vgg16"
    info = describe(parity["ours"])
    assert info.test_settings["selection"] == "per_class" and info.test_settings["fixed_size"] == [300, 300]


def test_load_from_the_torchvision_ssd300_name_keeps_all_but_the_classifier(parity, tmp_path, monkeypatch):
    from segkit.checkpoint import init_from_checkpoint
    from tests.weight_cache import offline_caches, plant_torchvision

    offline_caches(tmp_path, monkeypatch)
    reference = parity["reference"]
    plant_torchvision("SSD300_VGG16_Weights.COCO_V1", reference.state_dict())
    cfg = segkit.load_config("configs/ssd300_vgg16_coco.yaml", ["model.backbone.pretrained=null"])
    model = segkit.build_model(cfg)
    report = init_from_checkpoint(model, "torchvision://ssd300_vgg16")
    assert sorted(report["reinitialised"]) == sorted(f"head.cls_logits.{i}.{p}" for i in range(6)
                                                     for p in ("bias", "weight"))  # 80 classes, not 90
    torch.testing.assert_close(model.head.bbox_pred[2].weight, reference.head.regression_head.module_list[2].weight)
    torch.testing.assert_close(model.neck.layers[3][2].weight, reference.backbone.extra[4][2].weight)
    torch.testing.assert_close(model.backbone.l2_norm.weight, reference.backbone.scale_weight)


def test_ssd_coco_config_is_torchvision_s_ssd300_vgg16_and_its_recipe():
    cfg = segkit.load_config("configs/ssd300_vgg16_coco.yaml", ["model.backbone.pretrained=null",
                                                                 "model.head.num_classes=90"])
    with torch.device("meta"):
        reference = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None)
        model = segkit.build_model(cfg)
    state, converted = convert_torchvision_ssd(reference.state_dict())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert cfg["model"] == {**converted["model"], "backbone": {**converted["model"]["backbone"], "pretrained": None}}
    assert cfg["data"]["batch_size"] * cfg["trainer"]["devices"] == 32 and cfg["optimizer"]["lr"] == 0.002
    assert cfg["trainer"]["max_epochs"] == 120 and cfg["scheduler"]["milestones"] == [80, 110]
    assert [t["type"] for t in cfg["data"]["train"]["transforms"]] == [
        "PhotometricDistort", "ZoomOut", "MinIoURandomCrop", "HorizontalFlip"]


def test_another_ssd_is_refused_naming_what_is_supported():
    with torch.device("meta"):
        state = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None).state_dict()
    state = dict(state, **{"backbone.extra.5.0.weight": torch.zeros(1)})  # SSD512's fifth extra layer
    with pytest.raises(CheckpointError, match=r"extra layers \[1, 2, 3, 4, 5\].*ssd300_vgg16"):
        convert_torchvision_ssd(state)


def test_fixed_size_resize_scales_boxes_and_masks_per_axis_and_maps_detections_back():
    from segkit.models.preprocess import ImagePreprocessor

    pre = ImagePreprocessor(fixed_size=(30, 40), size_divisor=1)
    masks = torch.zeros(1, 60, 20, dtype=torch.uint8)
    masks[0, 30:, 10:] = 1
    target = {"boxes": torch.tensor([[10.0, 30.0, 20.0, 60.0]]), "labels": torch.tensor([1]), "masks": masks}
    batch = pre([torch.rand(3, 60, 20), torch.rand(3, 15, 80)], [target, {**NO_TARGETS, "masks": masks[:0, :15, :80]}])
    assert tuple(batch.tensor.shape) == (2, 3, 30, 40) and batch.image_sizes == [(30, 40), (30, 40)]
    assert batch.targets[0]["boxes"].tolist() == [[20.0, 15.0, 40.0, 30.0]]  # x times 2, y times 1/2
    assert batch.targets[0]["masks"].shape == (1, 30, 40) and batch.targets[0]["masks"][0, 15:, 20:].all()
    assert batch.targets[1]["masks"].shape == (0, 30, 40)
    back = pre.boxes_to_input(torch.tensor([[20.0, 15.0, 40.0, 30.0]]), (30, 40), (60, 20))
    assert back.tolist() == [[10.0, 30.0, 20.0, 60.0]]


# ---------------------------------------------------------------------------- default boxes and VGG
@pytest.mark.parametrize("options", [
    {"aspect_ratios": [[2], [2, 3], [2, 3], [2, 3], [2], [2]], "scales": [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
     "steps": [8, 16, 32, 64, 100, 300]},
    {"aspect_ratios": [[2, 3], [2], [3]], "min_ratio": 0.2, "max_ratio": 0.95, "clip": False},
], ids=["ssd300", "computed_scales_no_steps_no_clip"])
def test_default_boxes_equal_torchvision_default_box_generator(options):
    grids = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)][: len(options["aspect_ratios"])]
    size = (300, 300) if "steps" in options else (160, 224)
    feats = [torch.zeros(1, 1, *g) for g in grids]
    reference = TorchvisionDefaultBoxes(**options)
    expected = reference(ImageList(torch.zeros(1, 3, *size), [size]), feats)[0]
    ours = DefaultBoxGenerator(**options)
    assert ours.scales == pytest.approx(reference.scales)
    torch.testing.assert_close(torch.cat(ours(feats, size)), expected, rtol=0, atol=1e-5)


def test_vgg16_imagenet_weights_by_name_load_into_the_ssd_backbone(tmp_path, monkeypatch):
    from torchvision.models.vgg import cfgs, make_layers

    from tests.weight_cache import offline_caches, plant_torchvision

    offline_caches(tmp_path, monkeypatch)
    torch.manual_seed(0)
    features = make_layers(cfgs["D"]).eval()  # torchvision's vgg16 without the classifier
    plant_torchvision("VGG16_Weights.IMAGENET1K_FEATURES", {f"features.{k}": v for k, v in features.state_dict().items()})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fc6, fc7 and the L2 scale are SSD's: no warning that they are missing
        ssd = BACKBONES.build({"type": "VGG", "pretrained": "torchvision://vgg16.IMAGENET1K_FEATURES"}, path="backbone")
    torch.testing.assert_close(ssd.stages[3][4].weight, features[21].weight)  # conv4_3
    plain = BACKBONES.build({"type": "VGG", "ssd": False, "l2_norm_scale": None, "out_features": ["conv5"],
                             "pretrained": "torchvision://vgg16.IMAGENET1K_FEATURES"}, path="backbone")
    x = torch.rand(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(plain(x)["conv5"], features[:-1](x), rtol=0, atol=1e-5)  # up to conv5_3's ReLU
    assert plain.output_shape()["conv5"].stride == 16 and ssd.output_shape()["fc7"].channels == 1024
    with pytest.raises(CheckpointError, match="VGG-16.*VGG-19"):
        BACKBONES.build({"type": "VGG", "depth": 19, "pretrained": "torchvision://vgg16.IMAGENET1K_FEATURES"},
                        path="backbone")


# ---------------------------------------------------------------------------- a tiny SSD
def tiny_config(**options) -> dict:
    """ResNet-18 (base 16) + two SSD extra layers + an SSD head on four levels for 3 classes, at 96 px:
    the neck and head over another backbone, fast on a CPU."""
    return {
        "type": "OneStageDetector", "selection": "per_class", "fixed_size": [96, 96], "size_divisor": 1,
        "score_threshold": 0.01, "topk_candidates": 100, "nms_threshold": 0.45, "detections_per_image": 50,
        "backbone": {"type": "ResNet", "depth": 18, "base_channels": 16, "out_indices": [1, 2, 3]},
        "neck": {"type": "SSDExtraLayers", "in_features": ["c4", "c5"], "extra_layers": [[32, 64, 2, 1], [32, 64, 2, 1]]},
        "head": {"type": "SSDHead", "num_classes": 3, "in_features": ["c4", "c5", "conv8_2", "conv9_2"],
                 "aspect_ratios": [[2], [2, 3], [2], [2]], "scales": None, "min_ratio": 0.2, "max_ratio": 0.9,
                 "steps": None},
        **options,
    }


def test_tiny_ssd_losses_fall_and_an_image_without_boxes_has_no_box_loss():
    torch.manual_seed(0)
    model = MODELS.build(tiny_config(), path="model").train()
    images, targets = synthetic_batch()
    steps = overfit(model, images, targets, steps=10, lr=1e-3)
    assert all(set(step) == {"loss_cls", "loss_box_reg"} for step in steps)
    history = [sum(step.values()) for step in steps]
    assert all(math.isfinite(v) for v in history) and sum(history[-3:]) < 0.6 * sum(history[:3]), history
    empty = model(images[:1], [NO_TARGETS])
    assert float(empty["loss_box_reg"].detach()) == 0.0 and float(empty["loss_cls"].detach()) == 0.0  # no positives, no negatives


def test_tiny_ssd_detections_are_in_input_image_coordinates_and_export(tmp_path):
    torch.manual_seed(0)
    model = MODELS.build(tiny_config(score_threshold=0.0), path="model").eval()
    images = [torch.rand(3, 60, 90), torch.rand(3, 150, 70)]  # resized to 96x96 inside, both ways
    with torch.no_grad():
        outputs = model(images)
    for image, out in zip(images, outputs):
        h, w = image.shape[-2:]
        assert 0 < len(out["boxes"]) <= 50 and 1 <= out["labels"].min() and out["labels"].max() <= 3
        assert out["boxes"][:, 2].max() <= w + 1e-3 and out["boxes"][:, 3].max() <= h + 1e-3
        assert out["boxes"][:, 2].max() > 0.8 * w  # boxes reach the right border: scaled per axis
        assert bool((out["scores"][:-1] >= out["scores"][1:]).all())
    from segkit.export import check_export, export_model

    export_model(model, tmp_path / "ssd.pt", "torchscript", images[0])  # the per-class selection traces
    assert check_export(tmp_path / "ssd.pt", model, [images[0], torch.rand(3, 60, 90)])["max_abs_diff"] <= 1e-4


def test_bad_ssd_options_are_clear_errors():
    with pytest.raises(ConfigError, match="selection must be one of per_level, per_class"):
        MODELS.build(tiny_config(selection="per_image"), path="model")
    with pytest.raises(ConfigError, match="fixed_size and min_size"):
        MODELS.build(tiny_config(min_size=128), path="model")
    with pytest.raises(ConfigError, match="scales for 4 levels"):
        MODELS.build(tiny_config(head={**tiny_config()["head"], "scales": [0.1, 0.2]}), path="model")
    with pytest.raises(ConfigError, match="fc7 needs ssd: true") as err:
        MODELS.build(tiny_config(backbone={"type": "VGG", "ssd": False}), path="model")
    assert err.value.key == "model.backbone"
