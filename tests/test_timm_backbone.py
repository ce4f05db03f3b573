"""TimmBackbone: timm's features_only extractors as backbones, checked against timm itself with the same
weights, their names and strides, loading weights (files, segkit checkpoints, timm:// names) and refusing
the wrong ones, freezing, and training inside the meta-architectures."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import torch

import segkit
from segkit.checkpoint import BACKBONE_INFO_KEY, CONFIG_KEY, CheckpointError
from segkit.errors import ConfigError, UserError
from segkit.registry import BACKBONES
from tests.weight_cache import offline_caches, plant_hf

timm = pytest.importorskip("timm")

# A Swin of the real layout (patch embedding, shifted windows, patch merging, channels-last maps) at a
# width and depth that build and run in a fraction of a second; the real swin_tiny is in the slow tests.
TINY_SWIN = {"depths": [1, 1, 2, 1], "embed_dim": 16, "num_heads": [1, 1, 2, 2]}
FAMILIES = [
    ("convnext_atto", {}),
    ("swin_tiny_patch4_window7_224", TINY_SWIN),
    ("efficientnet_b0", {}),
    ("regnetx_002", {}),
    ("resnet18", {}),
]


def _build(**cfg) -> torch.nn.Module:
    return BACKBONES.build({"type": "TimmBackbone", **cfg}, path="model.backbone")


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Weights and BatchNorm statistics away from their initial values, so that loading is really checked."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.rand_like(value) + 0.5 if name.endswith("running_var") else
                            torch.randn_like(value) * 0.05)
    return model.eval()


def _timm_features(name: str, path: Path, kwargs: dict) -> torch.nn.Module:
    """timm's own features_only model with the whole model's state dict in ``path``, loaded by timm."""
    return timm.create_model(name, features_only=True, pretrained=True,
                             pretrained_cfg_overlay={"file": str(path)}, **kwargs).eval()


@pytest.mark.parametrize("name,model_kwargs", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_same_weights_give_timm_s_feature_maps(tmp_path: Path, one_thread, name: str, model_kwargs: dict):
    path = tmp_path / f"{name}.pth"
    torch.save(_randomised(timm.create_model(name, **model_kwargs)).state_dict(), path)
    ours = _build(model_name=name, pretrained=str(path), model_kwargs=model_kwargs).eval()
    reference = _timm_features(name, path, {**model_kwargs, **{k: v for k, v in ours.timm_kwargs.items()
                                                               if k == "dynamic_img_size"}})
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        got, expected = ours(x), reference(x)
    levels = [reference.feature_info.out_indices.index(level) for level in ours.timm_levels().values()]
    assert list(got) == ["c2", "c3", "c4", "c5"]
    for (key, value), level in zip(got.items(), levels):
        ref = expected[level].permute(0, 3, 1, 2) if "swin" in name else expected[level]  # Swin's maps are NHWC
        assert torch.equal(value, ref), key
        shape = ours.output_shape()[key]
        assert value.shape[1] == shape.channels
        assert (64 / value.shape[2], 96 / value.shape[3]) == (shape.stride, shape.stride)
    assert [s.stride for s in ours.output_shape().values()] == [4, 8, 16, 32]


def test_features_only_state_dict_and_segkit_checkpoints_load(tmp_path: Path, one_thread):
    reference = _randomised(timm.create_model("regnetx_002", features_only=True, out_indices=(1, 2, 3, 4)))
    torch.save(reference.state_dict(), tmp_path / "features.pth")
    ours = _build(model_name="regnetx_002", pretrained=str(tmp_path / "features.pth")).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
        assert all(torch.equal(a, b) for a, b in zip(ours(x).values(), expected))
    # The backbone's own state dict with its description, and a whole segkit model holding it.
    torch.save({"state_dict": ours.state_dict(), BACKBONE_INFO_KEY: {"type": "TimmBackbone",
                                                                     "model_name": "regnetx_002"}},
               tmp_path / "backbone.pth")
    model_state = {f"model.backbone.{k}": v for k, v in ours.state_dict().items()}
    model_state["model.neck.conv.weight"] = torch.zeros(1)
    torch.save({"state_dict": model_state, CONFIG_KEY: {"model": {"backbone": {"type": "TimmBackbone",
                                                                                "model_name": "regnetx_002"}}}},
               tmp_path / "model.ckpt")
    for file in ("backbone.pth", "model.ckpt"):
        again = _build(model_name="regnetx_002", out_indices=[2, 3], pretrained=str(tmp_path / file)).eval()
        with torch.no_grad():
            got = again(x)
        assert list(got) == ["c3", "c4"] and all(torch.equal(a, b) for a, b in zip(got.values(), expected[1:3]))


def test_timm_weight_name_is_read_from_timm_s_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread):
    offline_caches(tmp_path, monkeypatch)
    config = timm.models.get_pretrained_cfg("convnext_atto.d2_in1k")
    state = _randomised(timm.create_model("convnext_atto")).state_dict()
    plant_hf(config.hf_hub_id, state)
    ours = _build(model_name="convnext_atto", pretrained="timm://convnext_atto.d2_in1k")
    assert torch.equal(ours.body.stages_3.blocks[1].mlp.fc2.weight, state["stages.3.blocks.1.mlp.fc2.weight"])
    with pytest.raises(CheckpointError, match="timm's resnet18 but the backbone is convnext_atto"):
        _build(model_name="convnext_atto", pretrained="timm://resnet18.a1_in1k")
    with pytest.raises(CheckpointError, match="write the name as timm://convnext_atto.TAG"):
        _build(model_name="convnext_atto", pretrained="torchvision://resnet18")


def test_unknown_and_missing_keys_and_shapes_are_refused_naming_the_file(tmp_path: Path, one_thread):
    state = timm.create_model("resnet18").state_dict()
    for name, bad in [("extra.pth", {**state, "layer9.conv.weight": torch.zeros(1)}),
                      ("short.pth", {k: v for k, v in state.items() if not k.startswith("layer4.1.")}),
                      ("other.pth", timm.create_model("regnetx_002").state_dict())]:
        torch.save(bad, tmp_path / name)
    with pytest.raises(CheckpointError, match=r"extra\.pth.*1 unknown key\(s\) \[layer9\.conv\.weight\]"):
        _build(model_name="resnet18", pretrained=str(tmp_path / "extra.pth"))
    with pytest.raises(CheckpointError, match=r"short\.pth.*missing key\(s\) \[layer4\.1\.conv1\.weight"):
        _build(model_name="resnet18", pretrained=str(tmp_path / "short.pth"))
    with pytest.raises(CheckpointError, match=r"other\.pth.*unknown key\(s\) \[stem\.conv\.weight, .*missing key\(s\) \[conv1\.weight"):
        _build(model_name="resnet18", pretrained=str(tmp_path / "other.pth"))
    torch.save(timm.create_model("convnext_femto").state_dict(), tmp_path / "femto.pth")
    with pytest.raises(CheckpointError, match=r"femto\.pth.*'stem_0\.weight' has shape \(48, 3, 4, 4\) in the file "
                                              r"but \(40, 3, 4, 4\)"):
        _build(model_name="convnext_atto", pretrained=str(tmp_path / "femto.pth"))
    torch.save({"state_dict": state, BACKBONE_INFO_KEY: {"type": "ResNet", "depth": 18}}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="a ResNet backbone's, not a TimmBackbone's"):
        _build(model_name="resnet18", pretrained=str(tmp_path / "resnet.pth"))


def test_names_by_stride_and_chosen_levels(one_thread):
    from segkit_plugins.backbones.timm_backbone import level_names

    assert level_names([2, 4, 8, 16, 32, 64], range(6)) == ["c1", "c2", "c3", "c4", "c5", "c6"]
    assert level_names([16, 16, 14], [9, 11, 3]) == ["c4_9", "c4_11", "s14"]
    net = _build(model_name="resnet18", out_indices=[0, 2, 4]).eval()
    assert {k: (s.channels, s.stride) for k, s in net.output_shape().items()} == {
        "c1": (64, 2), "c3": (128, 8), "c5": (512, 32)}
    with torch.no_grad():
        assert [tuple(v.shape) for v in net(torch.rand(1, 3, 64, 64)).values()] == [
            (1, 64, 32, 32), (1, 128, 8, 8), (1, 512, 2, 2)]


def test_configuration_errors_are_clear():
    def _build(**cfg):  # as a meta-architecture builds its backbone: errors at the config key
        return BACKBONES.build_child({"type": "TimmBackbone", **cfg}, path="model.backbone")

    with pytest.raises(ConfigError, match="timm has no model 'convnxt_atto'. Did you mean 'convnext_atto'"):
        _build(model_name="convnxt_atto")
    with pytest.raises(ConfigError, match=r"out_indices \[1, 7\] are not all levels of timm's resnet18, whose "
                                          r"levels are 0: stride 2, 1: stride 4"):
        _build(model_name="resnet18", out_indices=[1, 7])
    with pytest.raises(ConfigError, match="resnet18 takes no argument 'img_size'"):
        _build(model_name="resnet18", img_size=224)
    with pytest.raises(ConfigError, match="model_kwargs.out_indices is set by TimmBackbone itself"):
        _build(model_name="resnet18", model_kwargs={"out_indices": [1]})
    with pytest.raises(ConfigError, match="resnet18 takes no argument 'depth' .*model_kwargs.depth"):
        _build(model_name="resnet18", model_kwargs={"depth": 3})
    with pytest.raises(ConfigError, match=r"frozen_stages must be in -1\.\.4"):
        _build(model_name="resnet18", frozen_stages=5)


def test_without_timm_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch):
    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(UserError, match=r"pip install 'segkit-cv\[timm\]'"):
        _build(model_name="resnet18")


def test_fixed_input_size_and_patch_multiples_are_explained(one_thread):
    fixed = _build(model_name="swin_tiny_patch4_window7_224", dynamic_img_size=False, model_kwargs=TINY_SWIN)
    with pytest.raises(ValueError, match="built for 224x224 inputs .* got a 64x96 batch"):
        fixed(torch.rand(1, 3, 64, 96))
    sized = _build(model_name="swin_tiny_patch4_window7_224", img_size=[64, 96], dynamic_img_size=False,
                   model_kwargs=TINY_SWIN)
    assert tuple(sized(torch.rand(1, 3, 64, 96))["c5"].shape) == (1, 128, 2, 3)
    dynamic = _build(model_name="swin_tiny_patch4_window7_224", model_kwargs=TINY_SWIN)
    assert dynamic.timm_kwargs["dynamic_img_size"] is True
    with pytest.raises(ValueError, match="multiples of its patch size 4x4, got 66x96"):
        dynamic(torch.rand(1, 3, 66, 96))


def test_frozen_stages_and_norm_eval(one_thread):
    net = _build(model_name="resnet18", frozen_stages=1, norm_eval=True).train()
    frozen = {k for k, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {k for k, _ in net.named_parameters() if k.startswith(("body.conv1.", "body.bn1.", "body.layer1."))}
    assert not net.body.layer1.training and net.body.layer2.training
    assert all(not m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    convnext = _build(model_name="convnext_atto", frozen_stages=0).train()
    trainable = [k for k, p in convnext.named_parameters() if p.requires_grad]
    assert trainable[0].startswith("body.stages_1.") and not convnext.body.stages_0.training
    sum(v.sum() for v in convnext(torch.rand(1, 3, 64, 64)).values()).backward()
    assert convnext.body.stem_0.weight.grad is None and convnext.body.stages_1.downsample[1].weight.grad is not None


def _detector_config(backbone: dict) -> dict:
    return {"model": {
        "type": "TwoStageDetector", "backbone": backbone, "neck": {"type": "FPN", "out_channels": 16},
        "min_size": 64, "max_size": 96,
        "rpn_head": {"type": "RPN", "anchor_sizes": [[16], [32], [64], [128], [256]], "pre_nms_top_n_train": 200,
                     "post_nms_top_n_train": 50, "pre_nms_top_n_test": 100, "post_nms_top_n_test": 50},
        "roi_head": {"type": "StandardRoIHead", "num_classes": 3, "batch_size_per_image": 32,
                     "box_head": {"type": "TwoFCHead", "fc_dim": 32}},
    }}


def _one_step(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
    model.train()
    losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone_module().parameters())
    return losses


def test_feeds_fpn_faster_rcnn_and_a_segmentor_for_a_training_step(one_thread):
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 96), torch.rand(3, 60, 80)]
    detector = segkit.build_model(_detector_config({"type": "TimmBackbone", "model_name": "convnext_atto",
                                                    "model_kwargs": {"drop_path_rate": 0.1}}))
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[10.0, 10.0, 30.0, 40.0], [40.0, 5.0, 70.0, 30.0]]),
                "labels": torch.tensor([1, 3])}]
    assert {"loss_rpn_cls", "loss_cls", "loss_box_reg"} <= set(_one_step(detector, images, targets))
    segmentor = segkit.build_model({"model": {
        "type": "EncoderDecoder",
        "backbone": {"type": "TimmBackbone", "model_name": "swin_tiny_patch4_window7_224", "model_kwargs": TINY_SWIN},
        "neck": {"type": "FPN", "out_channels": 16},
        "decode_head": {"type": "FCNHead", "in_features": "p2", "num_convs": 1, "channels": 16, "num_classes": 4},
    }})
    label_maps = [{"sem_seg": torch.randint(0, 4, image.shape[1:])} for image in images]
    assert "loss_seg" in _one_step(segmentor, images, label_maps)
    segmentor.eval()
    with torch.no_grad():
        assert segmentor(images)[1]["sem_seg"].shape == (4, 60, 80)


@pytest.mark.slow
def test_swin_tiny_at_its_own_size_gives_timm_s_maps(tmp_path: Path):
    """The real swin_tiny, built with dynamic_img_size as the backbone builds it, gives at 224x224 the maps
    of timm's default (fixed-size) features_only model with the same weights."""
    name = "swin_tiny_patch4_window7_224"
    path = tmp_path / "swin.pth"
    torch.save(_randomised(timm.create_model(name)).state_dict(), path)
    ours = _build(model_name=name, pretrained=str(path)).eval()
    reference = _timm_features(name, path, {})
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        got, expected = ours(x), reference(x)
    for value, ref in zip(got.values(), expected):
        torch.testing.assert_close(value, ref.permute(0, 3, 1, 2), rtol=0, atol=1e-6)
    with torch.no_grad():
        assert [tuple(v.shape) for v in ours(torch.rand(1, 3, 96, 128)).values()] == [
            (1, 96, 24, 32), (1, 192, 12, 16), (1, 384, 6, 8), (1, 768, 3, 4)]
