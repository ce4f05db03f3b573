"""Parameter groups beyond one factor on the backbone: layer-wise learning-rate decay over a backbone that numbers
its layers (ViTDet's rule), per-parameter overrides by name, how both combine with ``backbone_lr_mult`` and the
weight-decay groups, and that the schedule keeps every group's factor."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from segkit.engine.optim import build_optimizer, build_scheduler, check_optimizer_config
from segkit.errors import ConfigError
from segkit.models import SegkitModel
from segkit.registry import BACKBONES

DEPTH = 3


class _ViTNet(SegkitModel):
    """A small ViT backbone (3 blocks, final norm) and a head with a GroupNorm."""

    def __init__(self, **backbone) -> None:
        super().__init__()
        self.backbone = BACKBONES.build({"type": "VisionTransformer", "arch": "vit_t_16", "embed_dim": 32,
                                         "depth": DEPTH, "num_heads": 2, "img_size": 32, **backbone})
        self.head = nn.Sequential(nn.Conv2d(32, 8, 1), nn.GroupNorm(2, 8))


class _ConvNet(SegkitModel):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def _settings(opt: torch.optim.Optimizer) -> dict[int, tuple[float, float]]:
    """``{id(parameter): (lr, weight decay)}``, each parameter in exactly one group."""
    settings = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert len(settings) == sum(len(g["params"]) for g in opt.param_groups)
    return settings


def _vitdet_layer(name: str) -> int:
    """ViTDet's numbering, written out: embeddings 0, block i i + 1, the rest num_layers + 1."""
    if name.startswith(("backbone.pos_embed", "backbone.patch_embed", "backbone.cls_token")):
        return 0
    if name.startswith("backbone.blocks."):
        return int(name.split(".")[2]) + 1
    return DEPTH + 1


def test_layer_decay_follows_vitdet_s_rule_and_leaves_the_rest_at_the_full_rate():
    net = _ViTNet()
    opt = build_optimizer(net, {"type": "AdamW", "lr": 0.1, "weight_decay": 0.05, "layer_decay": {"rate": 0.7}})
    settings = _settings(opt)
    for name, param in net.named_parameters():
        assert settings[id(param)] == (pytest.approx(0.1 * 0.7 ** (DEPTH + 1 - _vitdet_layer(name))), 0.05), name
    assert settings[id(net.backbone.pos_embed)][0] == pytest.approx(0.1 * 0.7 ** 4)
    assert settings[id(net.backbone.norm.weight)][0] == settings[id(net.head[0].weight)][0] == 0.1
    assert [g["name"] for g in opt.param_groups] == ["rest", *(f"backbone_layer{k}" for k in range(DEPTH + 2))]


def test_layer_decay_combines_with_backbone_lr_mult_and_the_weight_decay_groups():
    net = _ViTNet()
    opt = build_optimizer(net, {"type": "AdamW", "lr": 0.1, "weight_decay": 0.05, "norm_weight_decay": 0.0,
                                "bias_weight_decay": 0.01, "backbone_lr_mult": 0.5, "layer_decay": {"rate": 0.7}})
    settings = _settings(opt)
    for name, param in net.named_parameters():
        lr = 0.1 * (0.5 * 0.7 ** (DEPTH + 1 - _vitdet_layer(name)) if name.startswith("backbone.") else 1.0)
        norm = ".norm" in name or name.startswith("head.1.")
        wd = 0.0 if norm else 0.01 if name.endswith(".bias") else 0.05
        assert settings[id(param)] == (pytest.approx(lr), wd), name
    names = [g["name"] for g in opt.param_groups]
    assert names[:3] == ["rest", "rest_wd0.01", "rest_wd0"] and "backbone_layer2_wd0" in names


def test_the_schedule_keeps_each_group_s_factor():
    net = _ViTNet()
    opt = build_optimizer(net, {"type": "SGD", "lr": 0.1, "layer_decay": {"rate": 0.5},
                                "param_overrides": {"head.": {"lr_mult": 10.0}}})
    initial = [g["lr"] for g in opt.param_groups]
    sched = build_scheduler(opt, {"type": "Cosine", "warmup": "linear", "warmup_iters": 2, "warmup_ratio": 0.5},
                            total_iters=10, iters_per_epoch=5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr * 0.5 for lr in initial])  # warmup's first step
    for _ in range(4):
        opt.step()
        sched.step()
    factor = 0.5 * (1 + math.cos(math.pi * 4 / 10))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr * factor for lr in initial])
    assert initial[0] == pytest.approx(1.0) and initial[1] == pytest.approx(0.1 * 0.5 ** 4)  # the head x10


def test_layer_decay_needs_a_backbone_that_numbers_its_layers():
    with pytest.raises(ConfigError, match="the Sequential backbone declares none") as info:
        build_optimizer(_ConvNet(), {"type": "SGD", "lr": 0.1, "layer_decay": {"rate": 0.7}})
    assert info.value.key == "optimizer.layer_decay"
    with pytest.raises(ConfigError, match="Linear declares none") as info:
        build_optimizer(nn.Linear(2, 2), {"type": "SGD", "lr": 0.1, "layer_decay": {"rate": 0.7}})
    assert info.value.key == "optimizer.layer_decay"


def test_param_overrides_set_the_rate_and_weight_decay_of_matching_names_the_longest_pattern_winning():
    net = _ViTNet(frozen_stages=1)  # embeddings and block 0 frozen: not trained, not matched
    opt = build_optimizer(net, {"type": "AdamW", "lr": 0.1, "weight_decay": 0.05, "norm_weight_decay": 0.0,
                                "param_overrides": {"norm": {"lr_mult": 2.0},
                                                    "blocks.1.norm1": {"lr_mult": 3.0, "weight_decay": 0.5}}})
    settings = _settings(opt)
    expected = {name: (0.1, 0.05) for name, p in net.named_parameters() if p.requires_grad}
    expected.update({n: (0.2, 0.0) for n in expected if "norm" in n})
    expected.update({"backbone.blocks.1.norm1.weight": (0.3, 0.5), "backbone.blocks.1.norm1.bias": (0.3, 0.5),
                     "head.1.weight": (0.1, 0.0), "head.1.bias": (0.1, 0.0)})  # a GroupNorm not named "norm"
    for name, param in net.named_parameters():
        if param.requires_grad:
            assert settings[id(param)] == pytest.approx(expected[name]), name
    assert id(net.backbone.blocks[0].norm1.weight) not in settings
    vitdet = _ViTNet()
    opt = build_optimizer(vitdet, {"type": "AdamW", "lr": 0.1, "weight_decay": 0.05,
                                   "param_overrides": {"pos_embed": {"weight_decay": 0.0}}})
    assert _settings(opt)[id(vitdet.backbone.pos_embed)] == (0.1, 0.0)  # ViTDet's exemption
    assert [g["name"] for g in opt.param_groups] == ["rest", "rest_pos_embed_wd0"]


def test_optimizer_sections_with_the_new_keys_are_checked_without_a_model():
    check_optimizer_config({"type": "AdamW", "lr": 1e-4, "layer_decay": {"rate": 0.7},
                            "param_overrides": {"pos_embed": {"weight_decay": 0.0}, "head": {"lr_mult": 10}}})
    mistakes = [  # (section, key of the error, words of the message)
        ({"layer_decy": {"rate": 0.7}}, "optimizer.layer_decy", "Did you mean 'layer_decay'"),
        ({"layer_decay": {"rat": 0.7}}, "optimizer.layer_decay.rat", "Did you mean 'rate'"),
        ({"layer_decay": {"rate": 0.0}}, "optimizer.layer_decay.rate", "must be a finite number in (0, 1]"),
        ({"layer_decay": {"rate": 1.5}}, "optimizer.layer_decay.rate", "got 1.5"),
        ({"layer_decay": 0.7}, "optimizer.layer_decay", "a mapping such as {rate: 0.7}"),
        ({"param_overrides": {"pos_embed": {"weight_deca": 0.0}}}, "optimizer.param_overrides.pos_embed.weight_deca",
         "Did you mean 'weight_decay'"),
        ({"param_overrides": {"pos_embed": {"lr_mult": -1}}}, "optimizer.param_overrides.pos_embed.lr_mult",
         "must be a finite number >= 0"),
        ({"param_overrides": {"pos_embed": {}}}, "optimizer.param_overrides.pos_embed", "takes lr_mult and/or"),
        ({"param_overrides": ["pos_embed"]}, "optimizer.param_overrides", "maps parts of parameter names"),
    ]
    for extra, key, words in mistakes:
        with pytest.raises(ConfigError) as info:
            check_optimizer_config({"type": "AdamW", "lr": 1e-4, **extra})
        assert info.value.key == key and words in str(info.value), (extra, info.value.key, str(info.value))


def test_a_pattern_that_matches_no_trainable_parameter_is_named_with_close_names():
    with pytest.raises(ConfigError, match=r"pattern 'pos_embd' is in no trainable parameter's name.*"
                                          r"Did you mean 'pos_embed'") as info:
        build_optimizer(_ViTNet(), {"type": "AdamW", "lr": 0.1, "param_overrides": {"pos_embd": {"weight_decay": 0}}})
    assert info.value.key == "optimizer.param_overrides.pos_embd"
    with pytest.raises(ConfigError, match=r"'blocks\.0\.' matches only frozen parameters"):
        build_optimizer(_ViTNet(frozen_stages=1), {"type": "AdamW", "lr": 0.1,
                                                   "param_overrides": {"blocks.0.": {"lr_mult": 0.5}}})
