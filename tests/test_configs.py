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


def test_quickstart_is_cpu_sized():
    cfg = segkit.load_config(CONFIGS[0].parent / "quickstart.yaml")
    params = sum(p.numel() for p in segkit.build_model(cfg).parameters())
    assert params < 5_000_000  # torchvision's R50-FPN Faster R-CNN has about 41.8 million
    assert cfg["trainer"]["accelerator"] == "cpu"


def test_coco_recipe_is_the_standard_1x():
    cfg = segkit.load_config(CONFIGS[0].parent / "faster_rcnn_r50_fpn_coco.yaml")
    assert (cfg["model"]["min_size"], cfg["model"]["max_size"]) == (800, 1333)
    assert cfg["trainer"]["max_epochs"] == 12 and cfg["scheduler"]["milestones"] == [8, 11]
    assert cfg["data"]["batch_size"] * cfg["trainer"]["devices"] == 16
    assert cfg["optimizer"]["lr"] == 0.02
