"""Every one-stage detector with PANet's path-aggregation neck: its PAFPN config builds the neck it names,
trains on fixed images (the losses fall) and detects in input-image coordinates."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import segkit
from segkit.models import describe
from segkit.registry import MODELS
from segkit_plugins.necks.pafpn import PAFPN

from reference import overfit
from test_detector import synthetic_batch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAFPN_CONFIGS = sorted(p.name for p in CONFIGS.glob("*_pafpn_coco.yaml"))
# Small enough for the default suite: the architecture of the config, at a fraction of its width.
SMALL = ["model.backbone.depth=18", "model.backbone.base_channels=16", "model.backbone.pretrained=null",
         "model.backbone.frozen_stages=-1", "model.backbone.norm=BN", "model.neck.out_channels=32",
         "model.min_size=null", "model.max_size=null", "model.head.num_classes=3"]
# A head whose assignment follows its own predictions (YOLOHead's SimOTA) moves its targets in the first
# steps; a larger step shows the fall within the same ten steps.
LEARNING_RATES = {"YOLOHead": 3e-3}


def test_every_one_stage_detector_has_a_pafpn_config():
    one_stage = {segkit.load_config(CONFIGS / name)["model"]["head"]["type"] for name in PAFPN_CONFIGS
                 if segkit.load_config(CONFIGS / name)["model"]["type"] == "OneStageDetector"}
    assert {"RetinaNetHead", "FCOSHead", "SSDHead", "YOLOHead"} <= one_stage


@pytest.mark.parametrize("name", PAFPN_CONFIGS)
def test_pafpn_config_trains_and_detects(name):
    cfg = segkit.load_config(CONFIGS / name, overrides=SMALL)
    torch.manual_seed(0)
    model = MODELS.build(cfg["model"], path="model").train()
    assert isinstance(model.neck, PAFPN) and model.neck.bottom_up
    images, targets = synthetic_batch()
    lr = LEARNING_RATES.get(cfg["model"]["head"]["type"], 1e-3)
    history = [sum(step.values()) for step in overfit(model, images, targets, steps=10, lr=lr)]
    assert all(math.isfinite(v) for v in history)
    assert sum(history[-3:]) < 0.7 * sum(history[:3]), history
    model.eval()
    with torch.no_grad():
        results = model(images)
    assert describe(model).task == "detection"
    for image, result in zip(images, results):
        h, w = image.shape[-2:]
        boxes = result["boxes"]
        assert boxes.shape[1] == 4 and len(result["labels"]) == len(result["scores"]) == len(boxes)
        assert bool(((boxes[:, 0::2] >= 0) & (boxes[:, 0::2] <= w) & (boxes[:, 1::2] >= 0)
                     & (boxes[:, 1::2] <= h)).all())
