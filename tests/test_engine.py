"""Optimizers, learning-rate schedules and checkpoint loading built from config."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import segkit
from segkit.checkpoint import CheckpointError, load_checkpoint
from segkit.engine.optim import LRSchedule, build_optimizer, build_scheduler
from segkit.errors import ConfigError


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


def test_optimizer_is_built_by_name_with_checked_arguments():
    opt = build_optimizer(_net(), {"type": "SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4})
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    with pytest.raises(ConfigError) as info:
        build_optimizer(_net(), {"type": "AdamW", "lr": 0.1, "momentum": 0.9})
    assert info.value.key == "optimizer.momentum"
    with pytest.raises(ConfigError, match="Did you mean 'AdamW'"):
        build_optimizer(_net(), {"type": "AdamWW", "lr": 0.1})


def test_fused_implementation_by_default_unless_configured():
    torch.manual_seed(0)
    # (no bias in front of a BatchNorm here: its gradient is rounding noise that Adam would amplify)
    net, reference = (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)) for _ in range(2))
    reference.load_state_dict(net.state_dict())
    fused = build_optimizer(net, {"type": "AdamW", "lr": 0.1})
    loop = build_optimizer(reference, {"type": "AdamW", "lr": 0.1, "fused": False})
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    assert not build_optimizer(_net(), {"type": "SGD", "lr": 0.1, "foreach": True}).defaults["fused"]
    assert "fused" not in build_optimizer(_net(), {"type": "RMSprop", "lr": 0.1}).defaults
    x = torch.rand(2, 3, 8, 8)
    for model, opt in ((net, fused), (reference, loop)):  # the same update either way
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_norm_and_bias_weight_decay_make_parameter_groups():
    net = _net()
    opt = build_optimizer(net, {"type": "SGD", "lr": 0.1, "weight_decay": 1e-4, "norm_weight_decay": 0.0,
                                "bias_weight_decay": 0.0})
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay_of[id(net[0].weight)] == 1e-4 and decay_of[id(net[2].weight)] == 1e-4
    assert decay_of[id(net[1].weight)] == 0.0 and decay_of[id(net[1].bias)] == 0.0
    assert decay_of[id(net[0].bias)] == 0.0
    assert len(decay_of) == sum(1 for _ in net.parameters())


def test_linear_warmup_then_multistep_by_epoch():
    sched = LRSchedule(total_iters=1200, iters_per_epoch=100, type="MultiStep", milestones=[8, 11], gamma=0.1,
                       warmup="linear", warmup_iters=500, warmup_ratio=0.001)
    assert sched(0) == pytest.approx(0.001)
    assert sched(250) == pytest.approx(0.001 * 0.5 + 0.5)
    assert sched(500) == 1.0 and sched(799) == 1.0
    assert sched(800) == pytest.approx(0.1) and sched(1100) == pytest.approx(0.01)


def test_cosine_and_poly_reach_their_floor():
    cos = LRSchedule(total_iters=100, iters_per_epoch=10, type="Cosine", min_lr_ratio=0.05, warmup=None)
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.05 + 0.95 * 0.5) and cos(100) == pytest.approx(0.05)
    poly = LRSchedule(total_iters=100, iters_per_epoch=10, type="Poly", power=0.9, warmup=None)
    assert poly(50) == pytest.approx(0.5 ** 0.9) and poly(100) == 0.0


def test_scheduler_steps_the_learning_rate_and_rejects_unknown_keys():
    opt = torch.optim.SGD(_net().parameters(), lr=0.2)
    sched = build_scheduler(opt, {"type": "Cosine", "warmup": None}, total_iters=10, iters_per_epoch=5)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    with pytest.raises(ConfigError) as info:
        build_scheduler(opt, {"type": "Cosine", "warmup_iter": 5}, total_iters=10, iters_per_epoch=5)
    assert info.value.key == "scheduler.warmup_iter" and "warmup_iters" in str(info.value)


def _tiny_model(tiny_config: Path, num_classes: int = 3) -> nn.Module:
    return segkit.build_model(segkit.load_config(tiny_config, [f"model.roi_head.num_classes={num_classes}"]))


def test_load_checkpoint_round_trip(tiny_config: Path, tmp_path: Path):
    model = _tiny_model(tiny_config)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    other = _tiny_model(tiny_config)
    report = load_checkpoint(other, path)
    assert report == {"missing": [], "unexpected": []}
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_of_another_num_classes_is_refused_with_the_key(tiny_config: Path, tmp_path: Path):
    path = tmp_path / "five.ckpt"
    torch.save({"state_dict": _tiny_model(tiny_config, 5).state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_tiny_model(tiny_config, 3), path)
    assert "cls_score" in str(info.value) and "num_classes" in str(info.value)


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Exploit()}, f)
    with pytest.raises(CheckpointError, match="refuses"):
        load_checkpoint(nn.Linear(1, 1), path)
    assert "this must never run" not in capsys.readouterr().out
