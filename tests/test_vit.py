"""VisionTransformer and SimpleFeaturePyramid: token parity with torchvision's and timm's ViTs (plain and SAM, with
window attention and relative positions) given the same weights, position embeddings interpolated to other input
sizes, windows that see only themselves, declared strides equal to the maps', the weights it reads and refuses,
and one training step of a segmentor and of a Mask R-CNN on ViT + pyramid."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

import segkit
from segkit.checkpoint import CheckpointError
from segkit.cli import main
from segkit.errors import ConfigError
from segkit.registry import BACKBONES, NECKS
from tests.weight_cache import offline_caches, plant_hf, plant_torchvision

timm = pytest.importorskip("timm")

# torchvision's VisionTransformer at a width and depth that run in milliseconds; the layout of vit_b_16.
TV_SMALL = {"image_size": 64, "patch_size": 16, "num_layers": 2, "num_heads": 4, "hidden_dim": 64, "mlp_dim": 128}
OURS_SMALL = {"arch": None, "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0,
              "img_size": 64}


def _build(**cfg) -> torch.nn.Module:
    return BACKBONES.build({"type": "VisionTransformer", **cfg}, path="model.backbone")


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight moved away from its initial value (zero class token and biases, unit norms)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _torchvision_tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's encoder output (class token first, after encoder.ln), as its forward computes it."""
    tokens = model._process_input(x)
    return model.encoder(torch.cat([model.class_token.expand(len(x), -1, -1), tokens], dim=1))


# ------------------------------------------------------------------------------------------- parity
def test_torchvision_weights_give_torchvision_s_encoder_tokens(tmp_path: Path, one_thread):
    torch.manual_seed(0)
    reference = _randomised(torchvision.models.VisionTransformer(**TV_SMALL))
    torch.save(reference.state_dict(), tmp_path / "vit_tv.pth")
    ours = _build(**OURS_SMALL, pretrained=str(tmp_path / "vit_tv.pth")).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = _torchvision_tokens(reference, x), ours.forward_tokens(x)
    assert got.shape == expected.shape == (2, 1 + 16, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with torch.no_grad():  # the map is the patch tokens of the same output, row-major
        torch.testing.assert_close(ours(x)["c4"], expected[:, 1:].transpose(1, 2).reshape(2, 64, 4, 4), rtol=0, atol=1e-5)


def test_timm_weights_give_timm_s_forward_features(tmp_path: Path, one_thread):
    reference = _randomised(timm.create_model("vit_tiny_patch16_224", pretrained=False))
    torch.save(reference.state_dict(), tmp_path / "vit_tiny.pth")
    ours = _build(arch="vit_t_16", pretrained=str(tmp_path / "vit_tiny.pth")).eval()
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_tokens(x), reference.forward_features(x), rtol=0, atol=1e-5)


def test_a_224_model_at_320_uses_the_bicubic_interpolation_of_its_14x14_grid(one_thread):
    """The paper's 2-D interpolation of the pretrained position embeddings (class token's kept apart), as
    ViTDet computes it: bicubic, align_corners=False, no antialiasing."""
    net = _randomised(_build(arch="vit_t_16", depth=1))
    grid = net.pos_embed[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(20, 20), mode="bicubic", align_corners=False)
    x = torch.rand(1, 3, 320, 320)
    with torch.no_grad():
        tokens = net.embed(x)
        patches = net.patch_embed(x).flatten(2).transpose(1, 2)
    used = (tokens[:, 1:] - patches).transpose(1, 2).reshape(1, 192, 20, 20)
    torch.testing.assert_close(used, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(tokens[:, 0], (net.cls_token + net.pos_embed[:, :1])[:, 0], rtol=0, atol=0)
    with torch.no_grad():
        assert torch.equal(net.position_embeddings((14, 14)), net.pos_embed)  # its own grid: as learned
        assert net(torch.rand(1, 3, 320, 480))["c4"].shape == (1, 192, 20, 30)


# timm's SAM ViT (ViTDet's backbone): 14x14-like windows scaled down to 4x4 on an 8x8 grid, blocks 1 and 3 global.
SAM_SMALL = {"img_size": 128, "patch_size": 16, "embed_dim": 96, "depth": 4, "num_heads": 3, "window_size": 4,
             "global_attn_indexes": (1, 3), "use_rel_pos": True, "use_abs_pos": True, "neck_chans": None,
             "num_classes": 0}
OURS_SAM = {"arch": None, "patch_size": 16, "embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 4.0,
            "img_size": 128, "with_cls_token": False, "final_norm": False, "window_size": 4,
            "global_attn_indexes": [1, 3], "use_rel_pos": True}


def _timm_sam(**options) -> torch.nn.Module:
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    torch.manual_seed(0)  # ViTDet's and SAM's LayerNorm eps, which timm's SAM entry points pass
    return _randomised(VisionTransformerSAM(**{**SAM_SMALL, **options},
                                            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)))


@pytest.mark.parametrize("size", [(128, 128), (160, 96)], ids=["trained_size", "padded_and_interpolated"])
def test_timm_sam_weights_give_timm_s_last_block_tokens(size: tuple[int, int], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, one_thread):
    """Window attention, padding to whole windows and decomposed relative positions as timm's SAM ViT computes
    them: at 160x96 the 10x6 grid is padded to 12x8 for the 4x4 windows and the global blocks' 15-row tables are
    interpolated to 19 and 11 rows. timm's resize of the absolute position embeddings antialiases; ViTDet's (and
    segkit's) does not, so timm's is run without it: the one documented difference."""
    import timm.models.vision_transformer_sam as timm_sam

    reference = _timm_sam()
    torch.save(reference.state_dict(), tmp_path / "samvit.pth")
    ours = _build(**OURS_SAM, pretrained=str(tmp_path / "samvit.pth")).eval()
    monkeypatch.setattr(timm_sam, "resample_abs_pos_embed_nhwc",
                        functools.partial(timm.layers.resample_abs_pos_embed_nhwc, antialias=False))
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, indices=[3], intermediates_only=True)[0]  # before the neck
        got = ours(x)["c4"]
    assert got.shape == expected.shape == (2, 96, size[0] // 16, size[1] // 16)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_window_covering_the_grid_without_rel_pos_is_global_attention(one_thread):
    options = {**OURS_SAM, "use_rel_pos": False, "global_attn_indexes": []}
    windowed = _randomised(_build(**{**options, "window_size": 8}))  # the 128 px grid is 8x8: one window
    plain = _build(**{**options, "window_size": 0}).eval()
    plain.load_state_dict(windowed.state_dict())
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(windowed(x)["c4"], plain(x)["c4"])


def test_a_windowed_token_sees_only_its_window(one_thread):
    net = _randomised(_build(**{**OURS_SAM, "global_attn_indexes": []}))  # every block within 4x4 windows
    x = torch.rand(1, 3, 160, 96)  # a 10x6 grid: windows rows 0-3 / 4-7 / 8-9 (padded), columns 0-3 / 4-5 (padded)
    changed = x.clone()
    changed[..., 5 * 16:6 * 16, 5 * 16:6 * 16] += 1.0  # patch (5, 5), in the window of rows 4-7, columns 4-5
    with torch.no_grad():
        before, after = net(x)["c4"], net(changed)["c4"]
    differs = (before - after).abs().amax(dim=1)[0] > 0
    inside = torch.zeros(10, 6, dtype=torch.bool)
    inside[4:8, 4:6] = True
    assert torch.equal(differs, inside)


def test_class_token_with_windows_or_relative_positions_is_refused():
    for options in ({"window_size": 4}, {"use_rel_pos": True}):
        with pytest.raises(ConfigError, match="with_cls_token: true does not combine with window_size > 0 or "
                                              "use_rel_pos: true.*set with_cls_token: false"):
            BACKBONES.build_child({"type": "VisionTransformer", "arch": "vit_t_16", "depth": 2, **options},
                                  path="model.backbone")
    with pytest.raises(ConfigError, match=r"global_attn_indexes must be blocks 0\.\.1, got \[2\]"):
        BACKBONES.build_child({"type": "VisionTransformer", "arch": "vit_t_16", "depth": 2, "with_cls_token": False,
                               "window_size": 4, "global_attn_indexes": [2]}, path="model.backbone")


def test_weights_without_relative_positions_load_with_zero_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  one_thread):
    """ViTDet starts from MAE's ViT, which has no relative positions: its tables start at zero, and nothing else
    may be missing."""
    offline_caches(tmp_path, monkeypatch)
    mae = _randomised(timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=96, depth=2,
                                        num_heads=3)).state_dict()  # vit_base's layout, a small width
    plant_hf(timm.models.get_pretrained_cfg("vit_base_patch16_224.mae").hf_hub_id, mae)
    options = {**OURS_SAM, "depth": 2, "img_size": 224, "window_size": 7, "global_attn_indexes": [1]}
    net = _build(**options, pretrained="timm://vit_base_patch16_224.mae")
    tables = {k: v for k, v in net.state_dict().items() if ".attn.rel_pos_" in k}
    assert [tuple(v.shape) for v in tables.values()] == [(13, 32), (13, 32), (27, 32), (27, 32)]
    assert all(not v.any() for v in tables.values())
    assert torch.equal(net.pos_embed, mae["pos_embed"][:, 1:]) and torch.equal(net.blocks[1].mlp.fc2.weight,
                                                                               mae["blocks.1.mlp.fc2.weight"])
    torch.save({k: v for k, v in mae.items() if k != "blocks.1.norm2.bias"}, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match=r"short\.pth.*1 missing key\(s\) \[blocks\.1\.norm2\.bias\]"):
        _build(**options, pretrained=str(tmp_path / "short.pth"))


def test_relative_position_weights_are_refused_where_the_model_differs(tmp_path: Path, one_thread):
    state = _timm_sam().state_dict()
    torch.save(state, tmp_path / "samvit.pth")
    torch.save({k: v for k, v in state.items() if k != "blocks.2.attn.rel_pos_w"}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"use_rel_pos=True in the weights but False in the model"):
        _build(**{**OURS_SAM, "use_rel_pos": False}, pretrained=str(tmp_path / "samvit.pth"))
    with pytest.raises(CheckpointError, match=r"window_size=4 in the weights but 2 in the model"):
        _build(**{**OURS_SAM, "window_size": 2}, pretrained=str(tmp_path / "samvit.pth"))
    with pytest.raises(CheckpointError, match=r"global_attn_indexes=\[1, 3\] in the weights but \[3\] in the model"):
        _build(**{**OURS_SAM, "global_attn_indexes": [3]}, pretrained=str(tmp_path / "samvit.pth"))
    with pytest.raises(CheckpointError, match=r"partial\.pth.*1 missing key\(s\) \[blocks\.2\.attn\.rel_pos_w\]"):
        _build(**OURS_SAM, pretrained=str(tmp_path / "partial.pth"))


def test_segkit_convert_reads_a_timm_sam_vit_with_its_window_layout(tmp_path: Path, one_thread):
    state = _timm_sam().state_dict()
    torch.save(state, tmp_path / "samvit.pth")
    assert main(["convert", "--from", "timm", str(tmp_path / "samvit.pth"), str(tmp_path / "converted.pth")]) == 0
    info = torch.load(tmp_path / "converted.pth", weights_only=True)["segkit_backbone"]
    assert {k: info[k] for k in ("window_size", "global_attn_indexes", "use_rel_pos", "with_cls_token")} == {
        "window_size": 4, "global_attn_indexes": [1, 3], "use_rel_pos": True, "with_cls_token": False}
    net = _build(**OURS_SAM, pretrained=str(tmp_path / "converted.pth"))
    assert torch.equal(net.blocks[3].attn.rel_pos_h, state["blocks.3.attn.rel_pos_h"])
    assert torch.equal(net.pos_embed, state["pos_embed"].reshape(1, 64, 96))
    # the global blocks' tables, made for 128 px, fit another rel_pos_img_size by linear interpolation
    with pytest.warns(UserWarning, match=r"4 relative position table\(s\) of global blocks .* 16x16 grid"):
        wider = _build(**OURS_SAM, rel_pos_img_size=256, pretrained=str(tmp_path / "converted.pth"))
    assert wider.blocks[1].attn.rel_pos_w.shape == (31, 32) and wider.blocks[0].attn.rel_pos_w.shape == (7, 32)


def test_layer_ids_number_the_embeddings_the_blocks_and_the_final_norm():
    net = _build(arch="vit_t_16", depth=3)
    layers = {name: net.layer_id(name) for name, _ in net.named_parameters()}
    assert net.num_layers == 3
    assert {k for k, v in layers.items() if v == 0} == {"cls_token", "pos_embed", "patch_embed.weight",
                                                        "patch_embed.bias"}
    assert layers["blocks.0.attn.qkv.weight"] == 1 and layers["blocks.2.mlp.fc2.bias"] == 3
    assert layers["norm.weight"] == layers["norm.bias"] == 4
    assert isinstance(net, segkit.models.LayeredBackbone)


# ----------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("options", [{"arch": "vit_t_16", "depth": 2}, {**OURS_SMALL, "patch_size": 8},
                                     {"arch": "vit_t_16", "depth": 3, "out_indices": [0, 2]}],
                         ids=["patch16", "patch8", "two_blocks"])
def test_declared_strides_are_the_maps_strides_for_the_backbone_and_the_pyramid(options: dict, one_thread):
    net = _build(**options).eval()
    neck = NECKS.build({"type": "SimpleFeaturePyramid", "out_channels": 16}, path="model.neck",
                       in_shapes=net.output_shape()).eval()
    x = torch.rand(1, 3, 128, 192)  # multiples of the coarsest stride, 64
    with torch.no_grad():
        maps = net(x)
        pyramid = neck(maps)
    for module, outputs in ((net, maps), (neck, pyramid)):
        shapes = module.output_shape()
        assert list(outputs) == list(shapes)
        for name, value in outputs.items():
            assert value.shape[1] == shapes[name].channels
            assert (128 / value.shape[2], 192 / value.shape[3]) == (shapes[name].stride, shapes[name].stride), name
    patch = options["patch_size"] if "patch_size" in options else 16
    assert [s.stride for s in neck.output_shape().values()] == [patch // 4, patch // 2, patch, patch * 2, patch * 4]
    if "out_indices" in options:
        assert net.block_outputs() == {"c4_0": 0, "c4_2": 2} and neck.in_feature == "c4_2"


def test_input_sides_not_multiples_of_the_patch_size_are_explained(one_thread):
    net = _build(arch="vit_t_16", depth=1)
    with pytest.raises(ValueError, match=r"multiples of its patch size 16, got 70x96: set the model's size_divisor"):
        net(torch.rand(1, 3, 70, 96))


def test_configuration_errors_are_clear():
    def _child(**cfg):  # as a meta-architecture builds its backbone: errors at the config key
        return BACKBONES.build_child({"type": "VisionTransformer", **cfg}, path="model.backbone")

    with pytest.raises(ConfigError, match="unknown ViT arch 'vit_b16'; choose one of vit_t_16"):
        _child(arch="vit_b16")
    with pytest.raises(ConfigError, match="a ViT without arch needs num_heads, mlp_ratio"):
        _child(arch=None, patch_size=16, embed_dim=64, depth=2)
    with pytest.raises(ConfigError, match="embed_dim 192 is not divisible by num_heads 5"):
        _child(arch="vit_t_16", num_heads=5)
    with pytest.raises(ConfigError, match="img_size must be .*multiples of patch_size 16, got 100"):
        _child(arch="vit_t_16", img_size=100)
    with pytest.raises(ConfigError, match=r"out_indices must be blocks 0\.\.11"):
        _child(arch="vit_t_16", out_indices=[12])
    with pytest.raises(ConfigError, match="in_feature 'c5' is not produced by the backbone"):
        NECKS.build_child({"type": "SimpleFeaturePyramid", "in_feature": "c5"}, path="model.neck",
                          in_shapes={"c4": segkit.ops.ShapeSpec(64, 16)})


# ---------------------------------------------------------------------------------------- weights
def test_weights_by_name_and_through_segkit_convert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread):
    offline_caches(tmp_path, monkeypatch)
    small = _randomised(torchvision.models.VisionTransformer(**TV_SMALL)).state_dict()
    plant_torchvision("ViT_B_16_Weights.IMAGENET1K_V1", small)  # a small ViT where vit_b_16's file goes
    by_name = _build(**OURS_SMALL, pretrained="torchvision://vit_b_16.IMAGENET1K_V1")
    assert torch.equal(by_name.blocks[1].attn.qkv.weight, small["encoder.layers.encoder_layer_1.self_attention.in_proj_weight"])
    torch.save(small, tmp_path / "tv.pth")
    assert main(["convert", "--from", "torchvision", str(tmp_path / "tv.pth"), str(tmp_path / "converted.pth")]) == 0
    converted = _build(**OURS_SMALL, pretrained=str(tmp_path / "converted.pth"))
    assert all(torch.equal(a, b) for a, b in zip(by_name.state_dict().values(), converted.state_dict().values()))
    config = timm.models.get_pretrained_cfg("vit_base_patch16_224.mae")  # the Mask R-CNN ViT-B config's weights
    tiny = _randomised(timm.create_model("vit_tiny_patch16_224", pretrained=False)).state_dict()
    plant_hf(config.hf_hub_id, tiny)  # a ViT-Ti where they go
    net = _build(arch="vit_t_16", pretrained="timm://vit_base_patch16_224.mae")
    assert torch.equal(net.patch_embed.weight, tiny["patch_embed.proj.weight"])


def test_weights_without_a_class_token_a_final_norm_or_of_another_grid_are_fitted(tmp_path: Path, one_thread):
    """ViTDet drops the class token and the final norm; position embeddings of another grid are interpolated."""
    state = _randomised(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)).state_dict()
    torch.save(state, tmp_path / "tiny.pth")
    plain = _build(arch="vit_t_16", depth=2, with_cls_token=False, final_norm=False, pretrained=str(tmp_path / "tiny.pth"))
    assert plain.cls_token is None and plain.norm is None
    assert torch.equal(plain.pos_embed, state["pos_embed"][:, 1:])
    with pytest.warns(UserWarning, match=r"14x14 grid interpolated to the backbone's 8x8 \(img_size\)"):
        small = _build(arch="vit_t_16", depth=2, img_size=128, pretrained=str(tmp_path / "tiny.pth"))
    assert torch.equal(small.pos_embed[:, 0], state["pos_embed"][:, 0]) and small.pos_embed.shape == (1, 65, 192)


def test_unknown_missing_and_other_architectures_are_refused_naming_the_file(tmp_path: Path, one_thread):
    state = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2).state_dict()
    for name, bad in [("extra.pth", {**state, "blocks.0.ls1.gamma": torch.ones(192)}),
                      ("short.pth", {k: v for k, v in state.items() if not k.startswith("blocks.1.mlp.")}),
                      ("deeper.pth", timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3).state_dict()),
                      ("resnet.pth", torchvision.models.resnet18().state_dict())]:
        torch.save(bad, tmp_path / name)
    with pytest.raises(CheckpointError, match=r"extra\.pth.*1 unknown key\(s\) \[blocks\.0\.ls1\.gamma\]"):
        _build(arch="vit_t_16", depth=2, pretrained=str(tmp_path / "extra.pth"))
    with pytest.raises(CheckpointError, match=r"short\.pth.*4 missing key\(s\) \[blocks\.1\.mlp\.fc1\.weight"):
        _build(arch="vit_t_16", depth=2, pretrained=str(tmp_path / "short.pth"))
    with pytest.raises(CheckpointError, match=r"deeper\.pth.*depth=3 in the weights but 2 in the model"):
        _build(arch="vit_t_16", depth=2, pretrained=str(tmp_path / "deeper.pth"))
    with pytest.raises(CheckpointError, match=r"resnet\.pth' are not a Vision Transformer's"):
        _build(arch="vit_t_16", depth=2, pretrained=str(tmp_path / "resnet.pth"))
    no_cls = {k: v for k, v in state.items() if k != "cls_token"}
    no_cls["pos_embed"] = state["pos_embed"][:, 1:]
    torch.save(no_cls, tmp_path / "no_cls.pth")
    with pytest.raises(CheckpointError, match=r"no_cls\.pth' have no class token; set .*with_cls_token: false"):
        _build(arch="vit_t_16", depth=2, pretrained=str(tmp_path / "no_cls.pth"))


def test_frozen_stages_freeze_the_embeddings_and_the_first_blocks(one_thread):
    net = _build(arch="vit_t_16", depth=3, frozen_stages=1, drop_path_rate=0.1).train()
    frozen = {k for k, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {k for k, _ in net.named_parameters() if k.startswith(("patch_embed.", "cls_token", "pos_embed",
                                                                            "blocks.0."))}
    assert not net.blocks[0].training and net.blocks[1].training
    net(torch.rand(1, 3, 32, 32))["c4"].sum().backward()
    assert net.patch_embed.weight.grad is None and net.blocks[1].attn.qkv.weight.grad is not None


# ----------------------------------------------------------------------------------------- models
def _one_step(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
    model.train()
    losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grad = model.backbone_module().patch_embed.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    return losses


TINY_VIT = {"type": "VisionTransformer", "arch": "vit_t_16", "embed_dim": 64, "depth": 2, "num_heads": 2,
            "img_size": 64, "drop_path_rate": 0.1}


def test_a_segmentor_and_a_mask_rcnn_on_vit_and_the_pyramid_train_a_step(one_thread):
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 96), torch.rand(3, 60, 80)]
    neck = {"type": "SimpleFeaturePyramid", "out_channels": 16}
    segmentor = segkit.build_model({"model": {
        "type": "EncoderDecoder", "backbone": TINY_VIT, "neck": neck,
        "decode_head": {"type": "FCNHead", "in_features": "p3", "num_convs": 1, "channels": 16, "num_classes": 4},
    }})
    label_maps = [{"sem_seg": torch.randint(0, 4, image.shape[1:])} for image in images]
    assert "loss_seg" in _one_step(segmentor, images, label_maps)
    detector = segkit.build_model({"model": {
        "type": "TwoStageDetector", "backbone": TINY_VIT, "neck": neck, "min_size": 64, "max_size": 96,
        "rpn_head": {"type": "RPN", "anchor_sizes": [[16], [32], [64], [128], [256]], "pre_nms_top_n_train": 200,
                     "post_nms_top_n_train": 50, "pre_nms_top_n_test": 100, "post_nms_top_n_test": 50},
        "roi_head": {"type": "StandardRoIHead", "num_classes": 3, "batch_size_per_image": 32,
                     "box_head": {"type": "TwoFCHead", "fc_dim": 32},
                     "mask_head": {"type": "MaskRCNNHead", "num_convs": 1, "conv_dim": 16}},
    }})
    masks = [torch.zeros(1, 64, 96, dtype=torch.uint8), torch.zeros(2, 60, 80, dtype=torch.uint8)]
    masks[0][0, 6:50, 4:40] = 1
    masks[1][0, 10:40, 10:30] = 1
    masks[1][1, 5:30, 40:70] = 1
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([2]), "masks": masks[0]},
               {"boxes": torch.tensor([[10.0, 10.0, 30.0, 40.0], [40.0, 5.0, 70.0, 30.0]]),
                "labels": torch.tensor([1, 3]), "masks": masks[1]}]
    assert {"loss_rpn_cls", "loss_cls", "loss_box_reg", "loss_mask"} <= set(_one_step(detector, images, targets))
    detector.eval()
    with torch.no_grad():
        assert set(detector(images)[1]) >= {"boxes", "labels", "scores", "masks"}


def test_a_conv_stem_gives_the_same_maps_and_round_trips_through_a_file(tmp_path):
    # The paper's hybrid input: tokens from a small CNN's stride-8 map instead of 8-pixel patches.
    from segkit.checkpoint import CheckpointError
    from segkit_plugins.backbones.vit import VisionTransformer

    net = VisionTransformer(arch=None, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, img_size=32,
                            stem="conv")
    assert [m.stride for m in net.patch_embed if isinstance(m, torch.nn.Conv2d)] == [(2, 2)] * 3 + [(1, 1)]
    assert [m.out_channels for m in net.patch_embed if isinstance(m, torch.nn.Conv2d)] == [4, 8, 16, 32]
    out = net(torch.rand(2, 3, 32, 48))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"c3": (2, 32, 4, 6)}
    assert net.output_shape()["c3"].stride == 8
    path = tmp_path / "vit.pt"
    torch.save(net.state_dict(), path)
    again = VisionTransformer(arch=None, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                              img_size=32, stem="conv", pretrained=str(path)).eval()
    net.eval()
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(again(x)["c3"], net(x)["c3"])
    with pytest.raises(CheckpointError, match="patch stem"):
        VisionTransformer(arch="vit_t_16", stem="conv", pretrained="torchvision://vit_b_16")
    with pytest.raises(ValueError, match="power of 2"):
        VisionTransformer(arch="vit_t_16", patch_size=14, stem="conv")


def test_a_backbone_stem_makes_the_papers_hybrid_vit_whose_tokens_are_the_cnn_map_projected(one_thread):
    from segkit_plugins.backbones.resnet import ResNet
    from segkit_plugins.backbones.vit import VisionTransformer

    cnn = {"type": "ResNet", "depth": 18, "base_channels": 8, "out_indices": [1]}
    net = VisionTransformer(arch=None, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, img_size=32,
                            with_cls_token=False, stem=cnn).eval()
    assert isinstance(net.patch_embed.cnn, ResNet) and net.patch_embed.proj.in_channels == 16
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        cnn_map = net.patch_embed.cnn(x)["c3"]
        expected = F.conv2d(cnn_map, net.patch_embed.proj.weight, net.patch_embed.proj.bias).flatten(2).transpose(1, 2)
        tokens = net.embed(x)
        assert torch.allclose(tokens, expected + net.position_embeddings((4, 6)), atol=1e-6)
        assert net(x)["c3"].shape == (2, 32, 4, 6) and net.output_shape()["c3"].stride == 8
    with pytest.raises(ValueError, match="stem's map has stride 16, so each token covers 16 px: set patch_size: 16"):
        VisionTransformer(arch="vit_t_16", patch_size=8, stem={**cnn, "out_indices": [2]})
    with pytest.raises(ValueError, match=r"must return one map .*\['c3', 'c4'\]: make it return one"):
        VisionTransformer(arch="vit_t_16", patch_size=8, stem={**cnn, "out_indices": [1, 2]})
