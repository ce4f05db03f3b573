"""`segkit convert --from torchvision` of whole detectors: torchvision parity after conversion, the
v2 head pieces (two-conv RPN, 4conv1fc box head), the stored config and class names, and errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.rpn import RPNHead

import segkit
from segkit.checkpoint import CLASSES_KEY, CONFIG_KEY, CheckpointError
from segkit.cli import main
from segkit.config import TOP_LEVEL_KEYS
from segkit_plugins.heads.rcnn_weights import convert_torchvision_detector
from segkit.ops import ShapeSpec
from segkit.registry import HEADS

SIZE = {"min_size": 192, "max_size": 320}
TEST_OVERRIDES = [
    "model.min_size=192", "model.max_size=320", "model.rpn_head.pre_nms_top_n_test=300",
    "model.rpn_head.post_nms_top_n_test=100", "model.roi_head.score_threshold=0.01",
]
VARIANTS = [
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
]


def _torchvision_detector(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models.detection, name)(
        weights=None, weights_backbone=None, num_classes=91, box_score_thresh=0.01,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, **SIZE,
    )
    if getattr(model.roi_heads, "mask_predictor", None) is not None:
        # A zero bias makes every dead-ReLU pixel exactly 0.5, where thresholding is a coin toss.
        torch.nn.init.uniform_(model.roi_heads.mask_predictor.mask_fcn_logits.bias, -1.0, 1.0)
    return model.eval()  # BatchNorm (v2, and v1 built without weights) uses its running statistics


def _convert(reference: torch.nn.Module, folder: Path) -> Path:
    src, dst = folder / "torchvision.pth", folder / "out" / "segkit.pth"
    torch.save(reference.state_dict(), src)
    assert main(["convert", "--from", "torchvision", str(src), str(dst)]) == 0
    return dst


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code), " ".join(capsys.readouterr().err.split())


# ---------------------------------------------------------------------------- whole-model parity
# The Faster R-CNN variants are the Mask R-CNN ones without the mask branch: in the slow suite.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("faster") else n
                                  for n in VARIANTS])
def test_converted_detector_equals_torchvision(name: str, tmp_path: Path):
    reference = _torchvision_detector(name)
    ours = segkit.load_model(_convert(reference, tmp_path), overrides=TEST_OVERRIDES)
    assert not ours.training
    images = [torch.rand(3, 200, 300), torch.rand(3, 240, 320)]
    with torch.no_grad():
        expected, got = reference(images), ours(images)
    for exp, out in zip(expected, got):
        assert len(out["boxes"]) > 0
        torch.testing.assert_close(out["boxes"], exp["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(out["scores"], exp["scores"], atol=1e-4, rtol=0)
        assert torch.equal(out["labels"], exp["labels"])
        if "masks" in exp:
            _assert_masks_match(out["masks"], exp["masks"])


def _assert_masks_match(masks: torch.Tensor, expected: torch.Tensor) -> None:
    """Pasted probabilities agree, and the > 0.5 masks overlap with IoU > 0.99 per detection
    (pixels whose reference probability is within 1e-3 of 0.5 are left out: float noise decides them)."""
    assert masks.shape == expected.shape and masks.dtype == torch.float32
    torch.testing.assert_close(masks, expected, atol=1e-3, rtol=0)
    clear = ((expected - 0.5).abs() > 1e-3).flatten(1)
    ours, theirs = (masks > 0.5).flatten(1) & clear, (expected > 0.5).flatten(1) & clear
    union = (ours | theirs).sum(1)
    iou = (ours & theirs).sum(1) / union.clamp(min=1)
    assert (union > 0).any()
    assert (iou[union > 0] > 0.99).all(), iou


# ---------------------------------------------------------------------------- v2 pieces
def test_rpn_with_conv_depth_2_equals_torchvision_rpn_head():
    torch.manual_seed(0)
    reference = RPNHead(16, 3, conv_depth=2).eval()
    shapes = {"p2": ShapeSpec(16, 4), "p3": ShapeSpec(16, 8)}
    ours = HEADS.build({"type": "RPN", "in_features": ["p2", "p3"], "anchor_sizes": [[16], [32]], "conv_depth": 2},
                       path="model.rpn_head", in_shapes=shapes).eval()
    assert [k for k in ours.state_dict() if "conv" in k] == [
        "convs.0.weight", "convs.0.bias", "convs.1.weight", "convs.1.bias"]
    renamed = {re.sub(r"^conv\.(\d+)\.0\.", r"convs.\1.", k).replace("cls_logits.", "objectness_logits.")
               .replace("bbox_pred.", "anchor_deltas."): v for k, v in reference.state_dict().items()}
    ours.load_state_dict(renamed, strict=True)
    features = [torch.randn(2, 16, 12, 10), torch.randn(2, 16, 6, 5)]
    with torch.no_grad():
        tv_logits, tv_deltas = reference(features)
        logits, deltas = ours.predict(features)
    n = len(features[0])
    expected_logits = torch.cat([t.permute(0, 2, 3, 1).reshape(n, -1) for t in tv_logits], 1)
    expected_deltas = torch.cat([t.view(n, 3, 4, *t.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
                                 for t in tv_deltas], 1)
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(deltas, expected_deltas)


def test_rpn_with_one_conv_keeps_the_faster_rcnn_parameter_names():
    rpn = HEADS.build({"type": "RPN", "in_features": ["p2"], "anchor_sizes": [[16]]}, path="model.rpn_head",
                      in_shapes={"p2": ShapeSpec(8, 4)})
    assert {k for k in rpn.state_dict() if k.startswith("conv")} == {"conv.weight", "conv.bias"}


def test_rpn_conv_depth_below_one_is_refused():
    with pytest.raises(ValueError, match="conv_depth"):
        HEADS.build({"type": "RPN", "in_features": ["p2"], "anchor_sizes": [[16]], "conv_depth": 0},
                    path="model.rpn_head", in_shapes={"p2": ShapeSpec(8, 4)})


def test_conv_fc_head_with_batch_norm_equals_torchvision_fast_rcnn_conv_fc_head():
    torch.manual_seed(0)
    reference = FastRCNNConvFCHead((16, 7, 7), [32] * 4, [64], norm_layer=torch.nn.BatchNorm2d)
    for module in reference.modules():  # non-trivial running statistics and affine parameters
        if isinstance(module, torch.nn.BatchNorm2d):
            for buffer in (module.running_mean, module.weight, module.bias):
                buffer.data.uniform_(-0.5, 0.5)
            module.running_var.data.uniform_(0.5, 2.0)
    reference.eval()
    ours = HEADS.build({"type": "ConvFCHead", "num_convs": 4, "conv_dim": 32, "num_fcs": 1, "fc_dim": 64,
                        "norm": "BN"}, path="model.roi_head.box_head", in_channels=16, resolution=7).eval()
    renamed = {(f"fcs.0.{k.split('.')[-1]}" if k.startswith("5.") else f"convs.{k}"): v
               for k, v in reference.state_dict().items()}
    ours.load_state_dict(renamed, strict=True)
    x = torch.randn(6, 16, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))
    assert ours.out_channels == 64 and ours.convs[0][0].bias is None


@pytest.mark.parametrize("norm", [None, "GN"])
def test_conv_fc_head_without_batch_norm(norm):
    head = HEADS.build({"type": "ConvFCHead", "num_convs": 2, "conv_dim": 8, "num_fcs": 2, "fc_dim": 24,
                        "norm": norm}, path="model.roi_head.box_head", in_channels=4, resolution=5)
    assert head(torch.rand(3, 4, 5, 5)).shape == (3, 24) and head.out_channels == 24
    assert (head.convs[0][0].bias is None) == (norm is not None)
    assert isinstance(head.convs[0][-1], torch.nn.GroupNorm if norm else torch.nn.Conv2d)


# ---------------------------------------------------------------------------- checkpoint contents
@pytest.fixture(scope="module")
def mask_v2_state():
    with torch.device("meta"):
        return torchvision.models.detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict()


def test_converted_checkpoint_carries_its_config_and_the_coco_class_names(tmp_path: Path, capsys):
    torch.manual_seed(0)
    reference = torchvision.models.detection.fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)
    dst = _convert(reference, tmp_path)
    assert "fasterrcnn_resnet50_fpn_v2" in capsys.readouterr().out
    ckpt = torch.load(dst, weights_only=True)
    assert set(ckpt) == {"state_dict", CONFIG_KEY, CLASSES_KEY}
    cfg, classes = ckpt[CONFIG_KEY], ckpt[CLASSES_KEY]
    assert set(cfg) <= set(TOP_LEVEL_KEYS) and {"model", "data", "evaluation", "work_dir"} <= set(cfg)
    assert len(classes) == 90 and classes[0] == "person" and classes[89] == "toothbrush" and "N/A" in classes
    model = cfg["model"]
    assert (model["min_size"], model["max_size"]) == (800, 1333)
    assert model["backbone"]["norm"] == "BN" and model["neck"]["norm"] == "BN"
    assert model["rpn_head"]["conv_depth"] == 2
    assert model["roi_head"]["box_head"] == {"type": "ConvFCHead", "num_convs": 4, "conv_dim": 256, "num_fcs": 1,
                                             "fc_dim": 1024, "norm": "BN"}
    assert model["roi_head"]["num_classes"] == 90 and "mask_head" not in model["roi_head"]
    val = cfg["data"]["val"]
    assert val["type"] == "CocoDataset" and val["category_ids"] == list(range(1, 91)) and "with_masks" not in val
    assert val["ann_file"] == "${env:SEGKIT_COCO,data/coco}/annotations/instances_val2017.json"
    assert cfg["data"]["test"] == val
    assert cfg["evaluation"] == {"type": "CocoEvaluator", "iou_types": ["bbox"], "main_metric": "bbox/AP"}


def test_mask_rcnn_configs_describe_their_heads(mask_v2_state):
    _, v2 = convert_torchvision_detector(mask_v2_state)
    mask = v2["model"]["roi_head"]["mask_head"]
    assert mask["type"] == "MaskRCNNHead" and (mask["num_convs"], mask["conv_dim"], mask["norm"]) == (4, 256, "BN")
    assert (mask["pooler_resolution"], mask["mask_threshold"]) == (14, 0.5)
    assert v2["data"]["val"]["with_masks"] is True and v2["evaluation"]["iou_types"] == ["bbox", "segm"]
    with torch.device("meta"):
        v1_state = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    state, v1 = convert_torchvision_detector(v1_state)
    assert v1["model"]["backbone"]["norm"] == "FrozenBN" and v1["model"]["neck"]["norm"] is None
    assert v1["model"]["rpn_head"]["conv_depth"] == 1 and v1["model"]["roi_head"]["box_head"]["type"] == "TwoFCHead"
    assert v1["model"]["roi_head"]["mask_head"]["norm"] is None
    assert not any(k.startswith("backbone.") and k.endswith("num_batches_tracked") for k in state)
    assert state["roi_heads.mask_head.predictor.weight"].shape[0] == 90  # torchvision's background map dropped


def test_old_torchvision_key_spellings_convert_like_the_new_ones():
    with torch.device("meta"):
        state = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    legacy = (  # how torchvision < 0.13 and early Mask R-CNN checkpoints name the same tensors
        (r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv."),
        (r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.0\.", r"\1."),
        (r"^roi_heads\.mask_head\.(\d+)\.0\.", lambda m: f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}."),
    )
    old = {}
    for key, value in state.items():
        for pattern, replacement in legacy:
            key = re.sub(pattern, replacement, key)
        old[key] = value
    assert "rpn.head.conv.weight" in old and "roi_heads.mask_head.mask_fcn4.bias" in old
    assert "backbone.fpn.inner_blocks.3.weight" in old
    converted_old, cfg_old = convert_torchvision_detector(old)
    converted_new, cfg_new = convert_torchvision_detector(state)
    assert cfg_old == cfg_new
    assert {k: v.shape for k, v in converted_old.items()} == {k: v.shape for k, v in converted_new.items()}


# ---------------------------------------------------------------------------- errors
def test_a_state_dict_that_is_neither_backbone_nor_detector_exits_2(tmp_path: Path, capsys):
    src = tmp_path / "garbage.pth"
    torch.save({"encoder.blocks.0.weight": torch.zeros(4, 4)}, src)
    code, err = _run_cli(["convert", "--from", "torchvision", str(src), str(tmp_path / "o.pth")], capsys)
    assert code == 2 and "no torchvision converter recognises" in err and "maskrcnn_resnet50_fpn" in err
    assert "encoder.blocks.0.weight" in err and "Traceback" not in err
    assert not (tmp_path / "o.pth").exists()


def test_an_incomplete_torchvision_detector_exits_2_naming_what_is_missing(tmp_path: Path, capsys):
    src = tmp_path / "fcos.pth"  # the key groups of torchvision's fcos_resnet50_fpn, without P6/P7
    torch.save({"backbone.body.conv1.weight": torch.zeros(64, 3, 7, 7),
                "backbone.fpn.inner_blocks.0.0.weight": torch.zeros(256, 512, 1, 1),
                "head.classification_head.cls_logits.weight": torch.zeros(91, 256, 3, 3),
                "head.regression_head.bbox_ctrness.weight": torch.zeros(1, 256, 3, 3)}, src)
    code, err = _run_cli(["convert", "--from", "torchvision", str(src), str(tmp_path / "o.pth")], capsys)
    assert code == 2 and "backbone.fpn.extra_blocks.p6." in err
    assert "fcos_resnet50_fpn" in err and not (tmp_path / "o.pth").exists()


def test_a_detector_without_its_heads_exits_2_naming_what_was_found(tmp_path: Path, capsys):
    src = tmp_path / "body.pth"
    torch.save({"backbone.body.conv1.weight": torch.zeros(64, 3, 7, 7),
                "backbone.fpn.inner_blocks.0.0.weight": torch.zeros(256, 256, 1, 1)}, src)
    code, err = _run_cli(["convert", "--from", "torchvision", str(src), str(tmp_path / "o.pth")], capsys)
    assert code == 2 and "rpn.head.cls_logits" in err and "fasterrcnn_resnet50_fpn" in err


def test_unmapped_keys_of_a_detector_are_refused(mask_v2_state):
    state = dict(mask_v2_state)
    state["roi_heads.keypoint_head.0.weight"] = torch.zeros(1, device="meta")
    with pytest.raises(CheckpointError, match="roi_heads.keypoint_head.0.weight"):
        convert_torchvision_detector(state)


# ---------------------------------------------------------------------------- segkit eval CKPT
def test_segkit_eval_of_a_converted_mask_rcnn_equals_cocoeval_of_torchvision_outputs(tmp_path: Path, capsys,
                                                                                     monkeypatch):
    """`SEGKIT_COCO=... segkit eval OUT` needs nothing but the data: its bbox and segm numbers equal
    pycocotools' on torchvision's own detections (ground truth: some of them, under COCO ids)."""
    import contextlib
    import io
    import json

    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from segkit.evaluation.coco import COCO_METRIC_NAMES

    reference = _torchvision_detector("maskrcnn_resnet50_fpn")
    ckpt = _convert(reference, tmp_path)
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    g = torch.Generator().manual_seed(3)
    images, annotations, results = [], [], []
    for image_id, (h, w) in enumerate(((200, 300), (240, 320)), start=1):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "val2017" / f"{image_id:012d}.png")
        images.append({"id": image_id, "file_name": f"{image_id:012d}.png", "height": h, "width": w})
        with torch.no_grad():
            out = reference([torch.from_numpy(pixels).permute(2, 0, 1).float() / 255])[0]
        for k, (box, label, score, mask) in enumerate(zip(out["boxes"], out["labels"], out["scores"], out["masks"])):
            rle = mask_utils.encode(np.asfortranarray((mask[0] >= 0.5).numpy().astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            x1, y1, x2, y2 = box.tolist()
            result = {"image_id": image_id, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                      "score": float(score), "segmentation": rle}
            results.append(result)
            if k % 2 == 0 and min(x2 - x1, y2 - y1) >= 4 and mask_utils.area(rle) >= 20:  # well-posed objects
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                    "bbox": result["bbox"], "area": float(mask_utils.area(rle)), "iscrowd": 0,
                                    "segmentation": rle})
    assert len(annotations) >= 3
    categories = sorted({a["category_id"] for a in annotations})
    gt_file = root / "annotations" / "instances_val2017.json"
    gt_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                   "categories": [{"id": c, "name": f"c{c}"} for c in categories]}))
    expected = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        for iou_type in ("bbox", "segm"):
            kept = [r for r in results if r["category_id"] in categories]
            coco_eval = COCOeval(gt, gt.loadRes(kept), iouType=iou_type)
            coco_eval.evaluate(), coco_eval.accumulate(), coco_eval.summarize()
            expected.update({f"{iou_type}/{n}": float(v) for n, v in zip(COCO_METRIC_NAMES, coco_eval.stats)})
    monkeypatch.setenv("SEGKIT_COCO", str(root))
    out_file = tmp_path / "metrics.json"
    # One image per batch, as the reference ran: a batch pads images to a common size.
    assert main(["eval", str(ckpt), *TEST_OVERRIDES, "data.num_workers=0", "data.batch_size=1", "--out", str(out_file)]) == 0
    metrics = json.loads(out_file.read_text())
    assert expected["bbox/AP"] > 0.1 and expected["segm/AP"] > 0.1
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=2e-3), name
