"""Every shipped config loads, and its model builds with the declared feature shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import segkit

CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml"))


# The ResNet-101 / ResNeXt-101 models build as their R50 versions do, at twice the cost: in the slow suite.
# So is DeepLabV3 R50-D8 (9 s: a 480 px window through the ASPP): tests/test_deeplab.py checks its
# parameters against torchvision's deeplabv3_resnet50 and runs that model converted.
SLOW_CONFIGS = ("deeplabv3_r50_d8_voc.yaml",)


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if "101" in p.name or p.name in SLOW_CONFIGS
                                  else p for p in CONFIGS], ids=lambda p: p.name)
def test_config_loads_and_model_builds(path: Path):
    cfg = segkit.load_config(path, ["model.backbone.pretrained=null"])
    # The forward checks the outputs, not the recipe's test-time cost: one scale, and the small image
    # not resized up to COCO's 800 px (the recipes' sizes and scales are checked below and in their tests).
    if "min_size" in cfg["model"]:
        cfg["model"].update(min_size=96, max_size=128)
    if len((cfg["model"].get("test_cfg") or {}).get("scales", [1.0])) > 1:
        cfg["model"]["test_cfg"]["scales"] = [1.0]
    model = segkit.build_model(cfg).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 96, 128)])
    if cfg["model"]["type"] == "EncoderDecoder":
        assert out[0]["sem_seg"].shape == (model.num_classes, 96, 128)
        assert cfg["evaluation"]["type"] == "SemSegEvaluator" and cfg["evaluation"]["main_metric"] == "mIoU"
        return
    assert set(out[0]) >= {"boxes", "labels", "scores"}
    if "mask_head" in (cfg["model"].get("roi_head") or {}):
        assert out[0]["masks"].shape == (len(out[0]["boxes"]), 1, 96, 128)
        assert "segm" in cfg["evaluation"]["iou_types"] and cfg["data"]["val"]["with_masks"]


# PANet's adaptive pooling gives each level its own first box-head layer and its fused mask branch a
# 28x28-output FC layer: more parameters, on the same small backbone.
@pytest.mark.parametrize("name,limit", [("quickstart.yaml", 5e6), ("quickstart_mask.yaml", 5e6),
                                        ("quickstart_panet.yaml", 10e6), ("quickstart_seg.yaml", 2e6),
                                        ("quickstart_deeplabv3.yaml", 2e6), ("quickstart_unet.yaml", 2e6),
                                        ("quickstart_vit.yaml", 2e6),
                                        ("quickstart_retinanet.yaml", 5e6), ("quickstart_fcos.yaml", 5e6),
                                        ("quickstart_yolo.yaml", 5e6), ("quickstart_ssd.yaml", 5e6)])
def test_quickstart_is_cpu_sized(name, limit):
    cfg = segkit.load_config(CONFIGS[0].parent / name)
    params = sum(p.numel() for p in segkit.build_model(cfg).parameters())
    assert params < limit  # torchvision's R50-FPN Faster R-CNN has about 41.8 million
    assert cfg["trainer"]["accelerator"] == "cpu"


@pytest.mark.parametrize("name", ["faster_rcnn_r50_fpn_coco.yaml", "mask_rcnn_r50_fpn_coco.yaml", "panet_r50_fpn_coco.yaml"])
def test_coco_recipe_is_the_standard_1x(name):
    cfg = segkit.load_config(CONFIGS[0].parent / name)
    if name.startswith("panet"):  # the PANet authors' sizes, see test_multiscale_coco_recipes_use_their_sources_sizes
        assert (cfg["model"]["min_size"], cfg["model"]["max_size"]) == (1000, 1400)
    else:
        assert (cfg["model"]["min_size"], cfg["model"]["max_size"]) == (800, 1333)
        assert cfg["model"].get("train_min_size") is None  # single-scale training, as the papers' main results
    assert cfg["trainer"]["max_epochs"] == 12 and cfg["scheduler"]["milestones"] == [8, 11]
    assert cfg["data"]["batch_size"] * cfg["trainer"]["devices"] == 16
    assert cfg["optimizer"]["lr"] == 0.02


@pytest.mark.parametrize("name, train_sizes, test_sizes", [
    # the PANet authors' released config: TRAIN.SCALES, MAX_SIZE 1400, TEST.SCALE 1000
    ("panet_r50_fpn_coco.yaml", [1200, 1200, 1000, 800, 600, 400], (1000, 1400)),
    ("panet_x101_64x4d_coco.yaml", [1200, 1200, 1000, 800, 600, 400], (1000, 1400)),
    ("panet_x101_64x4d_dcn_coco.yaml", [1200, 1200, 1000, 800, 600, 400], (1000, 1400)),
    # Detectron2's Base-RCNN-FPN: MIN_SIZE_TRAIN 640..800 step 32, max 1333, test 800
    ("mask_rcnn_r50_fpn_ms_3x_coco.yaml", list(range(640, 801, 32)), (800, 1333)),
])
def test_multiscale_coco_recipes_use_their_sources_sizes(name, train_sizes, test_sizes):
    model_cfg = segkit.load_config(CONFIGS[0].parent / name, ["model.backbone.pretrained=null"])["model"]
    assert model_cfg["train_min_size"] == train_sizes and (model_cfg["min_size"], model_cfg["max_size"]) == test_sizes
    assert (model_cfg["train_min_size_sampling"], model_cfg["train_min_size_per"]) == ("choice", "image")


def test_mask_rcnn_ms_3x_is_the_1x_model_trained_36_epochs():
    one = segkit.load_config(CONFIGS[0].parent / "mask_rcnn_r50_fpn_coco.yaml")
    three = segkit.load_config(CONFIGS[0].parent / "mask_rcnn_r50_fpn_ms_3x_coco.yaml")
    assert three["trainer"]["max_epochs"] == 36 and three["scheduler"]["milestones"] == [27, 33]
    ignored = ("train_min_size", "train_min_size_sampling", "train_min_size_per")
    assert {k: v for k, v in three["model"].items() if k not in ignored} == one["model"]


def test_mask_rcnn_coco_config_matches_torchvision_maskrcnn_resnet50_fpn():
    """Same architecture as torchvision's model: every parameter shape agrees after conversion."""
    import torchvision

    from segkit_plugins.heads.rcnn_weights import convert_torchvision_detector

    cfg = segkit.load_config(CONFIGS[0].parent / "mask_rcnn_r50_fpn_coco.yaml",
                             ["model.backbone.pretrained=null", "model.roi_head.num_classes=90"])
    reference = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    state, converted_cfg = convert_torchvision_detector(reference.state_dict())
    model = segkit.build_model(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert cfg["evaluation"]["iou_types"] == ["bbox", "segm"] and cfg["data"]["train"]["with_masks"]


def test_retinanet_coco_config_matches_torchvision_retinanet_resnet50_fpn():
    """torchvision's architecture (every parameter shape agrees after conversion) on the 1x schedule, SGD lr 0.01."""
    import torchvision

    from segkit_plugins.heads.retinanet_weights import convert_torchvision_retinanet

    cfg = segkit.load_config(CONFIGS[0].parent / "retinanet_r50_fpn_coco.yaml",
                             ["model.backbone.pretrained=null", "model.head.num_classes=90"])
    with torch.device("meta"):
        reference = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None)
        model = segkit.build_model(cfg)
    state, converted = convert_torchvision_retinanet(reference.state_dict())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert converted["model"]["head"]["anchor_sizes"] == cfg["model"]["head"]["anchor_sizes"]
    assert (cfg["model"]["min_size"], cfg["model"]["max_size"]) == (800, 1333)
    assert cfg["trainer"]["max_epochs"] == 12 and cfg["scheduler"]["milestones"] == [8, 11]
    assert cfg["data"]["batch_size"] * cfg["trainer"]["devices"] == 16 and cfg["optimizer"]["lr"] == 0.01


def test_fcos_coco_config_matches_torchvision_fcos_resnet50_fpn():
    """torchvision's architecture (every parameter shape agrees after conversion) and test-time settings."""
    import torchvision

    from segkit_plugins.heads.fcos_weights import convert_torchvision_fcos

    cfg = segkit.load_config(CONFIGS[0].parent / "fcos_r50_fpn_coco.yaml",
                             ["model.backbone.pretrained=null", "model.head.num_classes=90"])
    with torch.device("meta"):
        reference = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None,
                                                                   trainable_backbone_layers=3)
        model = segkit.build_model(cfg)
    state, converted = convert_torchvision_fcos(reference.state_dict())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()
                                                                         if not k.endswith("num_batches_tracked")}
    settings = ("min_size", "max_size", "score_threshold", "topk_candidates", "nms_threshold", "detections_per_image")
    assert {k: cfg["model"][k] for k in settings} == {k: converted["model"][k] for k in settings}
    assert cfg["trainer"]["max_epochs"] == 12 and cfg["data"]["batch_size"] * cfg["trainer"]["devices"] == 16
    assert cfg["optimizer"]["lr"] == 0.01


def test_panet_ablations_switch_exactly_one_part_on_over_mask_rcnn():
    def parts(name):
        model = segkit.build_model(segkit.load_config(CONFIGS[0].parent / name))
        box, mask = model.roi_heads.box_head, model.roi_heads.mask_head
        return {"bottom_up": getattr(model.neck, "bottom_up", False),
                "afp": bool(getattr(box, "adaptive_pooling", False)) and bool(getattr(mask, "adaptive_pooling", False)),
                "fused": bool(getattr(mask, "fused", False))}

    assert parts("quickstart_panet.yaml") == {"bottom_up": True, "afp": True, "fused": True}
    assert parts("quickstart_panet_bottom_up_only.yaml") == {"bottom_up": True, "afp": False, "fused": False}
    assert parts("quickstart_panet_afp_only.yaml") == {"bottom_up": False, "afp": True, "fused": False}
    assert parts("quickstart_panet_fused_only.yaml") == {"bottom_up": False, "afp": False, "fused": True}
    assert parts("quickstart_mask.yaml") == {"bottom_up": False, "afp": False, "fused": False}
    x101 = segkit.load_config(CONFIGS[0].parent / "panet_x101_64x4d_coco.yaml")["model"]["backbone"]
    assert (x101["depth"], x101["groups"], x101["width_per_group"]) == (101, 64, 4)


def test_panet_dcn_config_is_the_x101_config_with_dcnv2_in_c3_to_c5():
    x101 = segkit.load_config(CONFIGS[0].parent / "panet_x101_64x4d_coco.yaml")
    dcn = segkit.load_config(CONFIGS[0].parent / "panet_x101_64x4d_dcn_coco.yaml")
    backbone = dcn["model"]["backbone"]
    assert (backbone["dcn_stages"], backbone["dcn_deform_groups"], backbone["dcn_mask_scale"]) == (
        [False, True, True, True], 1, 2.0)
    assert {k: v for k, v in backbone.items() if not k.startswith("dcn_")} == x101["model"]["backbone"]
    assert {k: v for k, v in dcn["model"].items() if k != "backbone"} == {
        k: v for k, v in x101["model"].items() if k != "backbone"}


def test_encnet_configs_follow_the_paper():
    for name, classes, depth in (("encnet_r50_d8_voc.yaml", 21, 50), ("encnet_r101_d8_pcontext.yaml", 59, 101)):
        cfg = segkit.load_config(CONFIGS[0].parent / name)
        model, backbone = cfg["model"], cfg["model"]["backbone"]
        assert (backbone["depth"], backbone["strides"], backbone["dilations"]) == (depth, [1, 2, 1, 1], [1, 1, 2, 4])
        head, aux = model["decode_head"], model["auxiliary_head"]
        assert (head["type"], head["num_codes"], head["use_se_loss"], head["se_loss_weight"]) == ("EncHead", 32, True, 0.2)
        assert (aux["type"], aux["in_features"], aux["loss_weight"]) == ("FCNHead", "c4", 0.2)
        assert head["num_classes"] == aux["num_classes"] == classes
        assert cfg["optimizer"]["type"] == "SGD" and cfg["optimizer"]["lr"] == 0.001 * cfg["data"]["batch_size"] / 16
        assert (cfg["scheduler"]["type"], cfg["scheduler"]["power"]) == ("Poly", 0.9)
        crop = next(t for t in cfg["data"]["train"]["transforms"] if t["type"] == "SegRandomCrop")
        assert (crop["height"], crop["width"]) == (480, 480)
        jitter = cfg["data"]["train"]["transforms"][0]  # PyTorch-Encoding's: base 520, long side 0.5-2.0 x base
        assert (jitter["type"], jitter["base_size"], jitter["ratio_range"], jitter["side"]) == (
            "BaseSizeJitter", 520, [0.5, 2.0], "long")
    fcn = segkit.load_config(CONFIGS[0].parent / "fcn_r50_d8_voc.yaml")["model"]
    assert fcn["decode_head"]["type"] == "FCNHead" and "num_codes" not in fcn["decode_head"]


def test_deeplab_configs_follow_the_papers():
    from segkit.models.segmentor import SegTestConfig

    for name, head_type in (("deeplabv3_r101_voc_aug.yaml", "ASPPHead"), ("deeplabv3plus_r50_d16_voc.yaml",
                                                                           "DeepLabV3PlusHead")):
        cfg = segkit.load_config(CONFIGS[0].parent / name)
        model, backbone = cfg["model"], cfg["model"]["backbone"]
        # output stride 16 with the multi-grid (1, 2, 4) on stage 4, ASPP rates (6, 12, 18)
        assert (backbone["strides"], backbone["dilations"], backbone["multi_grid"]) == ([1, 2, 2, 1], [1, 1, 1, 2],
                                                                                        [1, 2, 4])
        head = model["decode_head"]
        assert (head["type"], head["dilations"], head["channels"]) == (head_type, [6, 12, 18], 256)
        assert model.get("auxiliary_head") is None and cfg["data"]["train"]["split"] == "train_aug"
        crop = next(t for t in cfg["data"]["train"]["transforms"] if t["type"] == "SegRandomCrop")
        assert (crop["height"], crop["width"], cfg["data"]["batch_size"], cfg["optimizer"]["lr"]) == (513, 513, 16, 0.007)
        assert cfg["trainer"]["max_epochs"] == pytest.approx(30_000 * 16 / 10_582, rel=0.01)  # 30k iterations
    plus = segkit.load_config(CONFIGS[0].parent / "deeplabv3plus_r50_d16_voc.yaml")["model"]["decode_head"]
    assert (plus["low_level_feature"], plus["low_level_channels"]) == ("c2", 48)
    city = segkit.load_config(CONFIGS[0].parent / "deeplabv3_r101_d8_cityscapes.yaml")
    assert city["model"]["decode_head"]["num_classes"] == city["model"]["auxiliary_head"]["num_classes"] == 19
    assert city["data"]["train"]["type"] == "Cityscapes" and city["model"]["backbone"]["depth"] == 101
    assert SegTestConfig.from_mapping(city["model"]["test_cfg"]).crop_size == (769, 769)
    steps = city["trainer"]["max_epochs"] * 2975 / city["data"]["batch_size"]
    assert steps == pytest.approx(80_000, rel=0.01)


def test_vitdet_config_follows_the_recipe():
    """ViTDet's Mask R-CNN ViT-B: MAE weights without the class token, 14x14 windows but in blocks 2, 5, 8 and
    11, relative position biases, the simple pyramid with LayerNorm, large-scale jitter at 1024, 64 images per
    step, AdamW 1e-4 with weight decay 0.1 (none on the position embeddings), layer-wise decay 0.7, 100 epochs."""
    cfg = segkit.load_config(CONFIGS[0].parent / "mask_rcnn_vit_b_simple_fpn_coco.yaml")
    model, backbone, neck = cfg["model"], cfg["model"]["backbone"], cfg["model"]["neck"]
    assert (backbone["type"], backbone["arch"], backbone["img_size"], backbone["drop_path_rate"]) == (
        "VisionTransformer", "vit_b_16", 224, 0.1)
    assert backbone["pretrained"] == "timm://vit_base_patch16_224.mae" and not backbone["with_cls_token"]
    assert (backbone["window_size"], backbone["global_attn_indexes"], backbone["use_rel_pos"],
            backbone["rel_pos_img_size"]) == (14, [2, 5, 8, 11], True, 1024)
    assert (neck["type"], neck["scale_factors"], neck["norm"], neck["extra_block"]) == (
        "SimpleFeaturePyramid", [4.0, 2.0, 1.0, 0.5], "LN", "maxpool")
    assert model["roi_head"]["box_head"]["norm"] == model["roi_head"]["mask_head"]["norm"] == "LN"
    assert model["roi_head"]["box_head"]["num_convs"] == 4 and model["rpn_head"]["conv_depth"] == 2
    assert (model["min_size"], model["max_size"]) == (1024, 1024)
    types = [t["type"] for t in cfg["data"]["train"]["transforms"]]
    assert types == ["LongestMaxSize", "RandomScale", "RandomCrop", "HorizontalFlip"]
    assert cfg["data"]["train"]["transforms"][1]["scale_limit"] == [-0.9, 1.0]  # factors 0.1 .. 2.0
    assert cfg["data"]["batch_size"] * cfg["trainer"]["devices"] == 64 and cfg["trainer"]["max_epochs"] == 100
    optimizer = cfg["optimizer"]
    assert (optimizer["type"], optimizer["lr"], optimizer["weight_decay"]) == ("AdamW", 1e-4, 0.1)
    assert optimizer["layer_decay"] == {"rate": 0.7}
    assert optimizer["param_overrides"] == {"pos_embed": {"weight_decay": 0.0}}


def test_vitdet_optimizer_decays_the_vit_layer_by_layer():
    """Block i of 12 at lr x 0.7^(12 - i), the embeddings at x 0.7^13 without weight decay, the rest at lr (a
    narrow ViT-B, the recipe's optimizer section as it is)."""
    from segkit.engine.optim import build_optimizer

    cfg = segkit.load_config(CONFIGS[0].parent / "mask_rcnn_vit_b_simple_fpn_coco.yaml", [
        "model.backbone.pretrained=null", "model.backbone.embed_dim=64", "model.backbone.num_heads=2"])
    model = segkit.build_model(cfg)
    settings = {id(p): (g["lr"], g["weight_decay"]) for g in build_optimizer(model, cfg["optimizer"]).param_groups
                for p in g["params"]}
    backbone = model.backbone_module()
    assert settings[id(backbone.pos_embed)] == (pytest.approx(1e-4 * 0.7 ** 13), 0.0)
    assert settings[id(backbone.patch_embed.weight)] == (pytest.approx(1e-4 * 0.7 ** 13), 0.1)
    assert settings[id(backbone.blocks[11].attn.qkv.weight)] == (pytest.approx(1e-4 * 0.7), 0.1)
    assert settings[id(backbone.blocks[2].attn.rel_pos_h)] == (pytest.approx(1e-4 * 0.7 ** 10), 0.1)
    assert {settings[id(p)][0] for name, p in model.named_parameters() if not name.startswith("backbone.")} == {1e-4}


def test_voc0712_recipe():
    cfg = segkit.load_config(CONFIGS[0].parent / "faster_rcnn_r50_fpn_voc0712.yaml")
    assert cfg["model"]["roi_head"]["num_classes"] == 20
    assert (cfg["model"]["min_size"], cfg["model"]["max_size"]) == (600, 1000)
    assert [r.rsplit("/", 1)[-1] for r in cfg["data"]["train"]["root"]] == ["VOC2007", "VOC2012"]
    assert cfg["data"]["train"]["split"] == "trainval" and cfg["data"]["test"]["split"] == "test"
    assert cfg["evaluation"] == {"type": "VOCEvaluator", "method": "11points", "main_metric": "voc/mAP"}
    assert cfg["data"]["batch_size"] * cfg["trainer"]["devices"] == 16 and cfg["optimizer"]["lr"] == 0.01
