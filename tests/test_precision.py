"""Mixed precision: under bfloat16 autocast, RoI pooling, box geometry, losses and detections stay
float32, and a bf16-mixed training run on the CPU gives finite losses."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

import segkit
from segkit.cli import main
from segkit.ops import MultiLevelRoIAlign
from segkit.ops.anchors import AnchorGenerator
from segkit.ops.box_coder import BoxCoder
from segkit.ops.losses import smooth_l1_loss
from segkit.ops.roi_align import roi_align


def _autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_roi_pooling_is_float32_and_exact_under_autocast():
    torch.manual_seed(0)
    feats = [torch.randn(1, 8, size, size).bfloat16().requires_grad_() for size in (64, 32)]
    # coordinates that bfloat16 cannot hold (it would round 201.9 to 202 and 100.3 to 100.5)
    boxes = [torch.tensor([[100.3, 37.7, 201.9, 150.2], [3.3, 5.1, 60.6, 90.9]])]
    pool = MultiLevelRoIAlign(strides=(4, 8), output_size=7, sampling_ratio=2)
    rois = torch.cat([torch.zeros(2, 1), boxes[0]], dim=1)
    with _autocast():
        pooled = pool(feats, boxes)
        every = pool.pool_all_levels(feats, boxes)
        single = roi_align(feats[0], rois, 7, 0.25, 2)
    assert pooled.dtype == every.dtype == single.dtype == torch.float32
    reference = [f.detach().float() for f in feats]  # the same values, pooled without autocast
    torch.testing.assert_close(pooled, pool(reference, boxes))
    torch.testing.assert_close(every, pool.pool_all_levels(reference, boxes))
    torch.testing.assert_close(single, roi_align(reference[0], rois, 7, 0.25, 2))
    (pooled.sum() + every.sum()).backward()
    assert all(f.grad is not None and f.grad.dtype == torch.bfloat16 for f in feats)


def test_anchors_and_decoded_boxes_are_float32_under_autocast():
    generator = AnchorGenerator(sizes=((32,),), aspect_ratios=((0.5, 1.0, 2.0),))
    feature = torch.zeros(1, 4, 40, 60, dtype=torch.bfloat16)
    with _autocast():
        (anchors,) = generator([feature], (640, 960))
    (expected,) = generator([feature.float()], (640, 960))
    assert anchors.dtype == torch.float32
    torch.testing.assert_close(anchors, expected)
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    deltas = (torch.randn(len(anchors), 4) * 0.1).bfloat16()
    with _autocast():
        boxes = coder.decode(deltas, anchors)
    assert boxes.dtype == torch.float32
    torch.testing.assert_close(boxes, coder.decode(deltas.float(), anchors))


def test_smooth_l1_and_l1_losses_are_float32_for_half_inputs():
    a, b = torch.randn(100, 4).bfloat16(), torch.randn(100, 4).bfloat16()
    for beta in (0.0, 1.0 / 9):
        loss = smooth_l1_loss(a, b, beta=beta)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, smooth_l1_loss(a.float(), b.float(), beta=beta))


def test_detector_losses_and_detections_are_float32_under_autocast():
    torch.manual_seed(0)
    model = segkit.build_model(segkit.load_config("configs/quickstart_mask.yaml"))
    images = [torch.rand(3, 96, 96) for _ in range(2)]
    masks = torch.zeros(2, 96, 96, dtype=torch.uint8)
    masks[0, 10:40, 10:40] = 1
    masks[1, 50:90, 40:80] = 1
    targets = [{"boxes": torch.tensor([[10.0, 10, 40, 40], [40, 50, 80, 90]]), "labels": torch.tensor([1, 2]),
                "masks": masks} for _ in images]
    with _autocast():
        losses = model.train()(images, targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box_reg", "loss_mask"}
    for name, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
    with torch.no_grad(), _autocast():
        outputs = model.eval()(images)
    for key in ("boxes", "scores", "masks"):
        assert outputs[0][key].dtype == torch.float32, key


def test_bf16_mixed_training_on_the_cpu_gives_finite_losses(tiny_config: Path):
    assert main(["train", str(tiny_config), "trainer.precision=bf16-mixed", "trainer.max_epochs=2",
                 "trainer.gradient_clip_val=1.0", "trainer.check_val_every_n_epoch=2"]) == 0
    work = tiny_config.parent / "work"
    with open(work / "logs" / "version_0" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    raw = torch.load(work / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert raw["segkit_config"]["trainer"]["precision"] == "bf16-mixed"
    assert all(v.dtype != torch.bfloat16 for v in raw["state_dict"].values())  # weights stay float32


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_precision_passes_through_to_lightning(precision: str, tmp_path: Path):
    from segkit.engine.runner import build_trainer

    trainer = build_trainer({"model": {}, "trainer": {"precision": precision}}, work_dir=str(tmp_path))
    assert trainer.precision == "bf16-mixed"  # on the CPU Lightning runs float16 AMP as bfloat16


def test_gradient_clipping_under_mixed_precision_uses_an_unfused_optimizer(tmp_path: Path):
    from segkit.engine.optim import build_optimizer, fused_allowed
    from segkit.engine.runner import build_trainer

    net = torch.nn.Linear(4, 2)
    for trainer_cfg, fused in (({"precision": "bf16-mixed", "gradient_clip_val": 1.0}, False),
                               ({"precision": "bf16-mixed"}, True), ({"gradient_clip_val": 1.0}, True)):
        trainer = build_trainer({"model": {}, "trainer": trainer_cfg}, work_dir=str(tmp_path))
        opt = build_optimizer(net, {"type": "AdamW", "lr": 0.1}, allow_fused=fused_allowed(trainer))
        assert bool(opt.defaults["fused"]) is fused, trainer_cfg
