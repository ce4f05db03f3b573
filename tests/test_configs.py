"""Every shipped config loads, and its model builds with the declared feature shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import segkit

CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_model_builds(path: Path):
    cfg = segkit.load_config(path, ["model.backbone.pretrained=null"])
    model = segkit.build_model(cfg).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 96, 128)])
    assert set(out[0]) >= {"boxes", "labels", "scores"}
    if "mask_head" in (cfg["model"].get("roi_head") or {}):
        assert out[0]["masks"].shape == (len(out[0]["boxes"]), 1, 96, 128)
        assert "segm" in cfg["evaluation"]["iou_types"] and cfg["data"]["val"]["with_masks"]


@pytest.mark.parametrize("name", ["quickstart.yaml", "quickstart_mask.yaml"])
def test_quickstart_is_cpu_sized(name):
    cfg = segkit.load_config(CONFIGS[0].parent / name)
    params = sum(p.numel() for p in segkit.build_model(cfg).parameters())
    assert params < 5_000_000  # torchvision's R50-FPN Faster R-CNN has about 41.8 million
    assert cfg["trainer"]["accelerator"] == "cpu"


@pytest.mark.parametrize("name", ["faster_rcnn_r50_fpn_coco.yaml", "mask_rcnn_r50_fpn_coco.yaml"])
def test_coco_recipe_is_the_standard_1x(name):
    cfg = segkit.load_config(CONFIGS[0].parent / name)
    assert (cfg["model"]["min_size"], cfg["model"]["max_size"]) == (800, 1333)
    assert cfg["trainer"]["max_epochs"] == 12 and cfg["scheduler"]["milestones"] == [8, 11]
    assert cfg["data"]["batch_size"] * cfg["trainer"]["devices"] == 16
    assert cfg["optimizer"]["lr"] == 0.02


def test_mask_rcnn_coco_config_matches_torchvision_maskrcnn_resnet50_fpn():
    """Same architecture as torchvision's model: every parameter shape agrees after conversion."""
    import torchvision

    from segkit.models.convert_detectors import convert_torchvision_detector

    cfg = segkit.load_config(CONFIGS[0].parent / "mask_rcnn_r50_fpn_coco.yaml",
                             ["model.backbone.pretrained=null", "model.roi_head.num_classes=90"])
    reference = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    state, converted_cfg = convert_torchvision_detector(reference.state_dict())
    model = segkit.build_model(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert cfg["evaluation"]["iou_types"] == ["bbox", "segm"] and cfg["data"]["train"]["with_masks"]
