"""Optimizer options: backbone learning-rate multiplier, linear LR scaling, schedule length with
gradient accumulation, and the distributed / precision options passed to the Trainer."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import segkit
from segkit.engine.optim import BatchSize, build_optimizer, build_scheduler
from segkit.engine.runner import build_trainer, train
from segkit.errors import ConfigError
from segkit.models import SegkitModel


class _Net(SegkitModel):
    """A model whose backbone is the ``backbone`` submodule (the contract's default)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Sequential(nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1, bias=False))


def _groups_of(opt: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): group for group in opt.param_groups for p in group["params"]}


def test_backbone_lr_mult_combines_with_norm_and_bias_weight_decay():
    net = _Net()
    opt = build_optimizer(net, {"type": "SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
                                "norm_weight_decay": 0.0, "bias_weight_decay": 0.0, "backbone_lr_mult": 0.1})
    group = _groups_of(opt)
    conv, bn = net.backbone[0], net.backbone[1]
    head_conv, gn, last = net.head
    expected = {  # parameter: (lr, weight decay)
        conv.weight: (0.01, 1e-4), conv.bias: (0.01, 0.0), bn.weight: (0.01, 0.0), bn.bias: (0.01, 0.0),
        head_conv.weight: (0.1, 1e-4), head_conv.bias: (0.1, 0.0), gn.weight: (0.1, 0.0), gn.bias: (0.1, 0.0),
        last.weight: (0.1, 1e-4),
    }
    for param, (lr, wd) in expected.items():
        assert group[id(param)]["lr"] == pytest.approx(lr) and group[id(param)]["weight_decay"] == wd
    assert len(group) == len(expected) == sum(1 for _ in net.parameters())  # each parameter exactly once
    assert [g["name"] for g in opt.param_groups] == ["rest", "rest_wd0", "backbone", "backbone_wd0"]


def test_without_backbone_lr_mult_groups_are_unchanged():
    net = _Net()
    opt = build_optimizer(net, {"type": "SGD", "lr": 0.1, "weight_decay": 1e-4, "norm_weight_decay": 0.0})
    assert [len(g["params"]) for g in opt.param_groups] == [5, 4]  # optimizer's decay first, then the norms
    assert all(g["lr"] == 0.1 and "name" not in g for g in opt.param_groups)


def test_backbone_lr_mult_on_the_detector_covers_exactly_model_backbone(tiny_config: Path):
    model = segkit.build_model(segkit.load_config(tiny_config))
    opt = build_optimizer(model, {"type": "AdamW", "lr": 0.003, "backbone_lr_mult": 0.25})
    group = _groups_of(opt)
    backbone = {id(p) for p in model.backbone.parameters()}
    for name, param in model.named_parameters():
        lr = 0.003 * 0.25 if name.startswith("backbone.") else 0.003
        assert group[id(param)]["lr"] == pytest.approx(lr), name
    assert backbone and len(group) == sum(1 for _ in model.parameters())


def test_the_schedule_scales_every_group_from_its_own_learning_rate():
    net = _Net()
    opt = build_optimizer(net, {"type": "SGD", "lr": 0.1, "backbone_lr_mult": 0.1})
    sched = build_scheduler(opt, {"type": "Cosine", "warmup": "linear", "warmup_iters": 2, "warmup_ratio": 0.5},
                            total_iters=10, iters_per_epoch=5)
    for _ in range(4):
        opt.step()
        sched.step()
    factor = 0.5 * (1 + math.cos(math.pi * 4 / 10))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * factor, 0.01 * factor])


def test_bad_backbone_lr_mult_is_named():
    with pytest.raises(ConfigError) as info:
        build_optimizer(_Net(), {"type": "SGD", "lr": 0.1, "backbone_lr_mult": -1})
    assert info.value.key == "optimizer.backbone_lr_mult"
    with pytest.raises(ConfigError, match="Linear declares none") as info:
        build_optimizer(nn.Linear(2, 2), {"type": "SGD", "lr": 0.1, "backbone_lr_mult": 0.1})
    assert info.value.key == "optimizer.backbone_lr_mult"


def test_auto_scale_lr_is_linear_in_the_total_batch(caplog: pytest.LogCaptureFixture):
    batch = BatchSize(per_process=4, processes=8, accumulate=2)  # e.g. 4 GPUs x 2 nodes
    assert batch.total == 64
    cfg = {"type": "SGD", "lr": 0.02, "auto_scale_lr": {"base_batch_size": 16}, "backbone_lr_mult": 0.1}
    with caplog.at_level(logging.INFO):
        opt = build_optimizer(_Net(), cfg, batch_size=batch)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02 * 64 / 16, 0.02 * 64 / 16 * 0.1])
    assert "lr 0.02 x 64 / 16 = 0.08" in caplog.text and "4 per process x 8 process(es) x 2 accumulated" in caplog.text
    off = build_optimizer(_Net(), {**cfg, "auto_scale_lr": {"base_batch_size": 16, "enable": False}}, batch_size=batch)
    assert off.param_groups[0]["lr"] == 0.02
    assert build_optimizer(_Net(), {"type": "SGD", "lr": 0.02}, batch_size=batch).param_groups[0]["lr"] == 0.02


def test_auto_scale_lr_mistakes_are_named():
    batch = BatchSize(2)
    with pytest.raises(ConfigError, match="Did you mean 'base_batch_size'") as info:
        build_optimizer(_Net(), {"type": "SGD", "lr": 0.1, "auto_scale_lr": {"base_batch": 16}}, batch_size=batch)
    assert info.value.key == "optimizer.auto_scale_lr.base_batch"
    with pytest.raises(ConfigError) as info:
        build_optimizer(_Net(), {"type": "SGD", "lr": 0.1, "auto_scale_lr": {"base_batch_size": 0}}, batch_size=batch)
    assert info.value.key == "optimizer.auto_scale_lr.base_batch_size"
    with pytest.raises(ConfigError, match="needs the training batch size"):
        build_optimizer(_Net(), {"type": "SGD", "lr": 0.1, "auto_scale_lr": {"base_batch_size": 16}})


def test_distributed_and_precision_options_reach_the_trainer(tmp_path: Path):
    cfg = {"model": {}, "trainer": {"devices": 2, "num_nodes": 3, "strategy": "ddp", "precision": "bf16-mixed",
                                    "gradient_clip_val": 0.5, "accumulate_grad_batches": 4}}
    trainer = build_trainer(cfg, work_dir=str(tmp_path))
    assert (trainer.num_devices, trainer.num_nodes, trainer.world_size) == (2, 3, 6)
    assert type(trainer.strategy).__name__ == "DDPStrategy"
    assert trainer.precision == "bf16-mixed"
    assert trainer.gradient_clip_val == 0.5 and trainer.accumulate_grad_batches == 4


def test_sync_bn_or_sync_batchnorm_selects_the_plugin_and_values_are_checked(tmp_path: Path):
    from segkit.engine.sync_batchnorm import SyncBatchNormPlugin

    ddp = {"devices": 2, "strategy": "ddp"}
    for model_cfg, trainer_cfg, synced in (({"sync_bn": True}, {"sync_batchnorm": False}, True),
                                           ({}, {"sync_batchnorm": True}, True), ({"sync_bn": False}, {}, False)):
        trainer = build_trainer({"model": model_cfg, "trainer": {**ddp, **trainer_cfg}}, work_dir=str(tmp_path))
        assert isinstance(trainer.strategy._layer_sync, SyncBatchNormPlugin) is synced, (model_cfg, trainer_cfg)
    with pytest.raises(ConfigError) as info:
        build_trainer({"model": {"sync_bn": "yes"}}, work_dir=str(tmp_path))
    assert info.value.key == "model.sync_bn"


def test_accumulation_sets_the_schedule_length_and_the_scaled_lr(tiny_config: Path, caplog: pytest.LogCaptureFixture):
    # 16 images in batches of 4, 2 batches per optimizer step: 2 steps per epoch, 4 in 2 epochs.
    cfg = segkit.load_config(tiny_config, [
        "trainer.max_epochs=2", "trainer.accumulate_grad_batches=2", "trainer.limit_val_batches=0",
        "scheduler={type: Cosine, warmup: null}", "optimizer.auto_scale_lr={base_batch_size: 4}",
    ])
    with caplog.at_level(logging.INFO):
        train(cfg)
    assert "lr 0.003 x 8 / 4 = 0.006" in caplog.text
    work = Path(cfg["work_dir"])
    with open(work / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    lrs = {int(r["step"]): float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")}
    assert sorted(lrs) == [0, 1, 2, 3]  # one learning rate per optimizer step
    for step, lr in lrs.items():
        assert lr == pytest.approx(0.006 * 0.5 * (1 + math.cos(math.pi * step / 4))), step
    assert sum(1 for r in rows if r.get("train/loss")) == 4
