"""Weights by name (``torchvision://...``, ``timm://...``): read from the libraries' caches, converted,
and refused with the file and the folder named when they are not there. Nothing is downloaded: each
test plants randomly initialised weights where the library looks, under ``tmp_path``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from segkit_plugins.backbones.resnet import ResNet

import segkit
from segkit.checkpoint import CheckpointError, init_from_checkpoint
from segkit.cli import main
from segkit.errors import ConfigError
from segkit.registry import BACKBONES
from segkit.weight_names import is_weight_name, resolve_weights
from segkit.weights import named_backbone_weights, named_model_weights
from tests.weight_cache import (offline_caches, plant_standin, plant_torchvision, random_state,
                                torchvision_file)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


@pytest.fixture()
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty torch.hub and Hugging Face caches under ``tmp_path``, offline; a download attempt fails the test."""
    return offline_caches(tmp_path, monkeypatch)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------- torchvision
def test_torchvision_name_loads_the_cached_file_like_its_path(caches: Path):
    path = plant_torchvision("ResNet18_Weights.IMAGENET1K_V1", random_state(torchvision.models.resnet18()))
    by_name = ResNet(depth=18, pretrained="torchvision://resnet18.IMAGENET1K_V1")
    by_path = ResNet(depth=18, pretrained=str(path))
    assert _same_weights(by_name, by_path)
    assert not _same_weights(by_name, ResNet(depth=18))


def test_model_name_enum_name_and_default_name_the_same_file(caches: Path):
    plant_torchvision("ResNet18_Weights.IMAGENET1K_V1", {"conv1.weight": torch.zeros(1)})
    files = {resolve_weights(name).file for name in ("torchvision://resnet18", "torchvision://resnet18.IMAGENET1K_V1",
                                                     "torchvision://ResNet18_Weights.IMAGENET1K_V1",
                                                     "torchvision://ResNet18_Weights")}
    assert files == {str(torchvision_file("ResNet18_Weights.IMAGENET1K_V1"))}
    assert is_weight_name("timm://resnet50c.gluon_in1k") and not is_weight_name("checkpoints/resnet50.pth")


def test_weights_of_another_depth_are_refused_naming_both(caches: Path):
    plant_torchvision("ResNet18_Weights.IMAGENET1K_V1", random_state(torchvision.models.resnet18()))
    with pytest.raises(CheckpointError, match=r"torchvision://resnet18.*depth=18 in the weights but 50 in the model"):
        ResNet(depth=50, pretrained="torchvision://resnet18")


def test_a_backbone_name_in_load_from_points_to_pretrained(caches: Path):
    plant_torchvision("ResNet18_Weights.IMAGENET1K_V1", random_state(torchvision.models.resnet18()))
    with pytest.raises(CheckpointError, match="weights of a backbone.*model.backbone.pretrained"):
        named_model_weights("torchvision://resnet18")


def test_convert_accepts_a_name(caches: Path, capsys: pytest.CaptureFixture[str]):
    reference = torchvision.models.resnet18()
    plant_torchvision("ResNet18_Weights.IMAGENET1K_V1", random_state(reference))
    out = caches / "r18_segkit.pth"
    assert main(["convert", "torchvision://resnet18", str(out)]) == 0
    assert "depth: 18" in capsys.readouterr().out
    assert _same_weights(ResNet(depth=18, pretrained=str(out)), ResNet(depth=18, pretrained="torchvision://resnet18"))


# ------------------------------------------------------------------------------------------- timm
def test_timm_file_in_the_torch_folder_is_read_without_the_hub(caches: Path):
    from safetensors.torch import save_file

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    folder.mkdir(parents=True)
    save_file({"conv1.0.weight": torch.ones(2)}, str(folder / "resnet50c.gluon_in1k.safetensors"))
    weights = resolve_weights("timm://resnet50c")
    assert weights.source == "timm" and torch.equal(weights.state_dict["conv1.0.weight"], torch.ones(2))


# ----------------------------------------------------------------------------- errors and offline
def test_offline_and_uncached_names_the_file_the_url_and_the_folder(caches: Path):
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    with pytest.raises(CheckpointError) as tv:
        resolve_weights("torchvision://resnet50.IMAGENET1K_V1")
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in str(tv.value)
    assert str(folder / "resnet50-0676ba61.pth") in str(tv.value)
    with pytest.raises(CheckpointError) as hf:
        resolve_weights("timm://resnet50c.gluon_in1k")
    message = str(hf.value)
    assert "https://huggingface.co/timm/resnet50c.gluon_in1k/resolve/main/model.safetensors" in message
    assert str(folder / "resnet50c.gluon_in1k.safetensors") in message
    assert "models--timm--resnet50c.gluon_in1k" in message and str(caches / "hf" / "hub") in message


@pytest.mark.parametrize("name,suggestion", [("torchvision://resnet5O", "resnet50"),
                                             ("torchvision://resnet50.IMAGENET_V1", "IMAGENET1K_V1"),
                                             ("timm://seresnext50_32x4", "seresnext50_32x4d"),
                                             ("torchvison://resnet50", "torchvision")])
def test_unknown_name_suggests_the_nearest(caches: Path, name: str, suggestion: str):
    with pytest.raises(CheckpointError, match=f"Did you mean '{suggestion}"):
        resolve_weights(name)


def test_cli_offline_uncached_exits_2_naming_file_and_folder(tmp_path: Path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "1",
           "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}  # no download gets through
    result = subprocess.run([sys.executable, "-m", "segkit.cli", "config", "--check", str(CONFIGS / "quickstart.yaml"),
                             "model.backbone.pretrained=torchvision://resnet18.IMAGENET1K_V1"],
                            check=False, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    text = " ".join(result.stderr.split())
    assert "Traceback" not in text and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in text
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in text


# ------------------------------------------------------------------------------ whole detectors
@pytest.fixture(scope="module")
def detector_state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """A randomly initialised torchvision maskrcnn_resnet50_fpn state dict (COCO's 91 classes)."""
    reference = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    return random_state(reference)


def test_detector_name_in_load_from_converts_and_skips_other_class_counts(caches: Path, detector_state):
    plant_torchvision("MaskRCNN_ResNet50_FPN_Weights.COCO_V1", detector_state)
    cfg = segkit.load_config(CONFIGS / "mask_rcnn_r50_fpn_coco.yaml", ["model.backbone.pretrained=null"])
    model = segkit.build_model(cfg)
    report = init_from_checkpoint(model, "torchvision://maskrcnn_resnet50_fpn")
    assert sorted(report["reinitialised"]) == sorted([
        "roi_heads.cls_score.weight", "roi_heads.cls_score.bias", "roi_heads.bbox_pred.weight",
        "roi_heads.bbox_pred.bias", "roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias"])
    torch.testing.assert_close(model.backbone.layer3[1].conv2.weight,
                               detector_state["backbone.body.layer3.1.conv2.weight"])
    torch.testing.assert_close(model.roi_heads.box_head.fc6.weight, detector_state["roi_heads.box_head.fc6.weight"])


def test_detector_name_as_pretrained_gives_its_backbone(caches: Path, detector_state):
    plant_torchvision("MaskRCNN_ResNet50_FPN_Weights.COCO_V1", detector_state)
    weights = named_backbone_weights("torchvision://MaskRCNN_ResNet50_FPN_Weights.COCO_V1")
    assert weights.kind == "backbone" and weights.config["depth"] == 50
    net = ResNet(depth=50, norm="FrozenBN", pretrained="torchvision://maskrcnn_resnet50_fpn")
    torch.testing.assert_close(net.layer1[0].conv1.weight, detector_state["backbone.body.layer1.0.conv1.weight"])


# ----------------------------------------------------------------------------- shipped configs
def _named_configs() -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        pretrained = segkit.load_config(path)["model"].get("backbone", {}).get("pretrained")
        if pretrained is not None:
            assert is_weight_name(pretrained), f"{path.name} names a local file: {pretrained}"
            names.setdefault(pretrained, []).append(path.name)
    return names


NAMED = _named_configs()


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if "101" in n or "vgg" in n or "convnext" in n
                                                or "vit_base" in n else [])
                                  for n in sorted(NAMED)])
def test_every_shipped_config_backbone_loads_its_named_weights(caches: Path, name: str):
    """The EncNet / FCN configs' deep-stem ResNet-50 takes timm's resnet50c (its stem included), the
    detectors' FrozenBN ResNet-50 torchvision's resnet50, the Mask R-CNN ConvNeXt-T timm's convnext_tiny, the
    Mask R-CNN ViT-B timm's MAE-pretrained vit_base_patch16_224; ResNet-101, ResNeXt-101, ConvNeXt-T and ViT-B
    are slow (tests/test_timm_backbone.py loads a timm:// name into a TimmBackbone, tests/test_vit.py torchvision://
    and timm:// names into a VisionTransformer, in the default suite)."""
    state = plant_standin(name)
    built: list[dict] = []
    for config in NAMED[name]:
        backbone_cfg = dict(segkit.load_config(CONFIGS / config)["model"]["backbone"])
        if backbone_cfg in built:  # the same backbone as a config before
            continue
        built.append(backbone_cfg)
        net = BACKBONES.build(backbone_cfg, path="model.backbone")
        if backbone_cfg["type"] == "TimmBackbone":  # timm's ConvNeXt-T, stages flattened by features_only
            torch.testing.assert_close(net.body.stages_3.blocks[2].conv_dw.weight,
                                       state["stages.3.blocks.2.conv_dw.weight"], msg=config)
            continue
        if backbone_cfg["type"] == "VisionTransformer":  # MAE's ViT-B without its class token and final norm
            torch.testing.assert_close(net.blocks[11].attn.qkv.weight, state["blocks.11.attn.qkv.weight"], msg=config)
            torch.testing.assert_close(net.pos_embed, state["pos_embed"][:, 1:], msg=config)
            continue
        if backbone_cfg["type"] == "VGG":  # SSD's VGG-16 (tests/test_ssd.py loads it by name in the default suite)
            torch.testing.assert_close(net.stages[3][4].weight, state["features.21.weight"], msg=config)
            continue
        torch.testing.assert_close(net.layer4[0].conv2.weight, state["layer4.0.conv2.weight"], msg=config)
        if backbone_cfg.get("stem") == "deep":
            torch.testing.assert_close(net.conv1.weight, state["conv1.0.weight"], msg=config)
            torch.testing.assert_close(net.conv3.weight, state["conv1.6.weight"], msg=config)
        else:
            torch.testing.assert_close(net.conv1.weight, state["conv1.weight"], msg=config)


def test_every_paper_config_names_its_weights():
    assert set(NAMED) == {"torchvision://resnet50.IMAGENET1K_V1", "torchvision://resnext101_64x4d.IMAGENET1K_V1",
                          "timm://resnet50c.gluon_in1k", "timm://resnet101c.gluon_in1k",
                          "torchvision://vgg16.IMAGENET1K_FEATURES", "torchvision://resnet101.IMAGENET1K_V1",
                          "timm://convnext_tiny.fb_in1k", "timm://vit_base_patch16_224.mae"}


def test_detector_name_as_load_from_starts_a_training_run(caches: Path, detector_state,
                                                        caplog: pytest.LogCaptureFixture, recwarn):
    """End to end: `engine.load_from: torchvision://maskrcnn_resnet50_fpn` in a one-step run on Shapes."""
    from segkit.engine.runner import train

    plant_torchvision("MaskRCNN_ResNet50_FPN_Weights.COCO_V1", detector_state)
    config = caches / "mask_r50_shapes.yaml"
    config.write_text(f"""
_base_: [{CONFIGS / "_base_" / "models" / "mask_rcnn_r50_fpn.yaml"}]
model: {{min_size: 64, max_size: 64, roi_head: {{num_classes: 3, batch_size_per_image: 32}}}}
data:
  batch_size: 1
  train: {{type: Shapes, split: train, num_images: 1, image_size: 64, root: "{caches / 'data'}", progress: false,
          with_masks: true}}
  val: {{type: Shapes, split: val, num_images: 1, image_size: 64, root: "{caches / 'data'}", progress: false,
        with_masks: true}}
optimizer: {{type: SGD, lr: 0.0001}}
scheduler: {{type: Constant, warmup: null}}
evaluation: {{type: CocoEvaluator, main_metric: bbox/AP}}
engine: {{load_from: torchvision://maskrcnn_resnet50_fpn}}
trainer: {{max_steps: 1, limit_val_batches: 0, num_sanity_val_steps: 0, enable_progress_bar: false, enable_model_summary: false, logger: false,
          enable_checkpointing: false}}
work_dir: "{caches / 'work'}"
""")
    with caplog.at_level("INFO"):
        train(segkit.load_config(config))
    assert "initialised 301 tensors from torchvision://maskrcnn_resnet50_fpn" in caplog.text
    # COCO's 91 classes against 3: the class-specific layers are reported and trained from scratch.
    assert "6 tensors of another shape" in caplog.text and "roi_heads.mask_head.predictor.weight" in caplog.text
    assert not [w for w in recwarn if "not finite" in str(w.message) or "is nan" in str(w.message)]


def test_a_model_trained_from_named_weights_evaluates_and_resumes_without_them(caches: Path, tiny_config: Path,
                                                                              capsys: pytest.CaptureFixture[str]):
    """The checkpoint's weights replace the pretrained ones, so eval, predict and --resume need not find
    (or download) the ImageNet file again: on an offline machine it may be gone."""
    from segkit.engine.runner import train

    path = plant_torchvision("ResNet18_Weights.IMAGENET1K_V1", random_state(torchvision.models.resnet18()))
    overrides = ["model.backbone.base_channels=64", "model.backbone.pretrained=torchvision://resnet18",
                 "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1"]
    train(segkit.load_config(tiny_config, overrides))
    path.unlink()
    last = tiny_config.parent / "work" / "checkpoints" / "last.ckpt"
    assert main(["eval", str(last), "data.val.num_images=2"]) == 0
    assert "AP50" in capsys.readouterr().out
    model = segkit.load_model(last)
    assert model.backbone.conv1.weight.shape[0] == 64
    train(segkit.load_config(tiny_config, [*overrides, "trainer.max_epochs=2"]), resume=str(last))
    with pytest.raises(ConfigError, match="save it as"):  # a new run needs the file, and says where
        train(segkit.load_config(tiny_config, [*overrides, "work_dir=" + str(caches / "again")]))
