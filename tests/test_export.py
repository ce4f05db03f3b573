"""segkit.export and `segkit export`: TorchScript and ONNX files of detectors (boxes, masks, PANet) and
segmentors whose outputs match the PyTorch model's on other images than the one traced."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

import segkit
from segkit.checkpoint import CLASSES_KEY, CONFIG_KEY
from segkit.cli import main
from segkit.export import ExportMismatch, check_export, export_model, load_exported
from test_predict_semseg import SEG_CONFIG as PREDICT_SEG_CONFIG

pytest.importorskip("onnxruntime")

CLASSES = ["circle", "square", "triangle"]
PANET = [
    "model.neck.type=PAFPN",
    "model.roi_head.box_head={type: AFPTwoFCHead, fc_dim: 32}",
    "model.roi_head.mask_head={type: PANetMaskHead, num_convs: 3, conv_dim: 8, fused: true}",
    "model.roi_head.score_threshold=0.0",
]
# the untrained EncNet of the predict tests, inferring with sliding windows
SEG_CONFIG = PREDICT_SEG_CONFIG.rstrip() + "\n  test_cfg: {mode: slide, crop_size: [48, 48], stride: [32, 32]}\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


def _untrained_ckpt(root: Path, name: str, config_text: str, overrides: list[str]) -> Path:
    cfg_path = root / f"{name}.yaml"
    cfg_path.write_text(config_text)
    cfg = segkit.load_config(cfg_path, overrides)
    torch.manual_seed(0)
    model = segkit.build_model(cfg)
    for module in model.modules():  # random BatchNorm statistics make an untrained model's outputs vary
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
            module.running_mean.uniform_(-0.5, 0.5)
    path = root / f"{name}.ckpt"
    torch.save({"state_dict": model.state_dict(), CONFIG_KEY: json.loads(json.dumps(cfg)), CLASSES_KEY: CLASSES},
               path)
    return path


def _val_images(ckpt: Path, count: int = 6) -> list[torch.Tensor]:
    from segkit.registry import DATASETS

    cfg = segkit.config_from_checkpoint(ckpt)
    dataset = DATASETS.build(cfg["data"]["val"], path="data.val")
    return [dataset[i][0] for i in range(count)]


@pytest.mark.parametrize("fmt, suffix", [("torchscript", ".pt"), ("onnx", ".onnx")])
def test_trained_mask_rcnn_exports_and_matches_pytorch_on_other_images(trained_mask_ckpt, root, fmt, suffix):
    model = segkit.load_model(trained_mask_ckpt).eval()
    images = _val_images(trained_mask_ckpt)
    with torch.no_grad():
        counts = [len(model([image])[0]["boxes"]) for image in images]
    assert len(set(counts)) > 1, counts  # the graph must follow each image's number of detections
    out = root / f"mask{suffix}"
    description = export_model(model, out, fmt, images[counts.index(max(counts))], class_names=CLASSES)
    assert description["outputs"] == ["boxes", "labels", "scores", "masks"]
    report = check_export(out, model, images)
    assert report["images"] == 6 and report["detections"] == sum(counts) and report["max_abs_diff"] <= 1e-4

    exported, stored = load_exported(out)
    assert stored["class_names"] == CLASSES and stored["input"]["shape"] == [3, 64, 64] and stored["format"] == fmt
    boxes, labels, scores, masks = exported(images[0])
    assert boxes.shape == (counts[0], 4) and masks.shape == (counts[0], 1, 64, 64)
    assert labels.dtype == torch.int64 and scores.dtype == torch.float32


def test_an_image_with_no_detection_gives_empty_outputs(trained_mask_ckpt, root):
    model = segkit.load_model(trained_mask_ckpt).eval()
    images = _val_images(trained_mask_ckpt, 2)
    out = root / "mask_empty.pt"
    export_model(model, out, "torchscript", images[0])
    blank = torch.zeros(3, 64, 64)
    with torch.no_grad():
        expected = model([blank])[0]
    exported, _ = load_exported(out)
    boxes, labels, scores, masks = exported(blank)
    assert boxes.shape[0] == labels.shape[0] == scores.shape[0] == masks.shape[0] == len(expected["boxes"])


def test_torchscript_refuses_an_image_of_another_size(trained_mask_ckpt, root):
    model = segkit.load_model(trained_mask_ckpt).eval()
    out = root / "mask_size.pt"
    export_model(model, out, "torchscript", _val_images(trained_mask_ckpt, 1)[0])
    exported, _ = load_exported(out)
    with pytest.raises(RuntimeError, match="expanded size"):
        exported(torch.rand(3, 80, 64))


@pytest.mark.parametrize("fmt, suffix", [("torchscript", ".pt"), ("onnx", ".onnx")])
def test_panet_with_every_part_exports(root, fmt, suffix):
    from tests.conftest import TINY_CONFIG

    text = textwrap.dedent(TINY_CONFIG.format(root=root / "data", work_dir=root / "work_panet"))
    ckpt = _untrained_ckpt(root, "panet", text, PANET)
    model = segkit.load_model(ckpt).eval()
    images = _val_images(ckpt, 3)
    out = root / f"panet{suffix}"
    export_model(model, out, fmt, images[0])
    report = check_export(out, model, images)
    assert report["detections"] > 0 and report["max_abs_diff"] <= 1e-4


RETINANET = """
model:
  type: OneStageDetector
  backbone: {{type: ResNet, depth: 18, base_channels: 8, out_indices: [1, 2, 3]}}
  neck: {{type: FPN, in_features: [c3, c4, c5], out_channels: 16, extra_block: p6p7}}
  head: {{type: RetinaNetHead, num_classes: 3, num_convs: 1, anchor_sizes: [[16], [32], [64], [128], [256]]}}
  score_threshold: 0.0
  detections_per_image: 1000
data:
  val: {{type: Shapes, split: val, num_images: 8, image_size: 64, root: "{root}", progress: false}}
"""


@pytest.mark.parametrize("fmt, suffix", [("torchscript", ".pt"), ("onnx", ".onnx")])
def test_retinanet_exports_and_matches_pytorch_on_other_images(root, fmt, suffix):
    ckpt = _untrained_ckpt(root, "retinanet", RETINANET.format(root=root / "data"), [])
    stored = torch.load(ckpt, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for name in ("weight", "bias"):  # spread the untrained scores (all near 0.01), so near-ties do not decide the order
        value = stored["state_dict"][f"head.cls_logits.{name}"]
        value.copy_(value * 10 if name == "weight" else torch.rand(value.shape, generator=generator) * -4)
    torch.save(stored, ckpt)
    model = segkit.load_model(ckpt).eval()
    images = _val_images(ckpt, 3)
    with torch.no_grad():
        counts = [len(model([image])[0]["boxes"]) for image in images]
    assert len(set(counts)) > 1, counts  # what NMS keeps differs from image to image
    out = root / f"retinanet{suffix}"
    assert export_model(model, out, fmt, images[0])["outputs"] == ["boxes", "labels", "scores"]
    report = check_export(out, model, images)
    assert report["detections"] == sum(counts) and report["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("fmt, suffix", [("torchscript", ".pt"), ("onnx", ".onnx")])
def test_segmentor_with_sliding_windows_exports(root, fmt, suffix):
    ckpt = _untrained_ckpt(root, "seg", SEG_CONFIG, [])
    model = segkit.load_model(ckpt).eval()
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 72, 88, generator=gen) for _ in range(3)]
    out = root / f"seg{suffix}"
    description = export_model(model, out, fmt, images[0])
    assert description["outputs"] == ["sem_seg"] and description["task"] == "semantic_segmentation"
    report = check_export(out, model, images)
    assert report["detections"] is None and report["max_abs_diff"] <= 1e-4
    exported, _ = load_exported(out)
    (scores,) = exported(images[1])
    assert scores.shape == (4, 72, 88)


def test_check_fails_when_the_file_is_another_model(root):
    ckpt = _untrained_ckpt(root, "seg_a", SEG_CONFIG, [])
    model = segkit.load_model(ckpt).eval()
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = root / "seg_a.pt"
    export_model(model, out, "torchscript", image)
    other = segkit.load_model(ckpt).eval()
    with torch.no_grad():
        other.decode_head.classifier.bias[0] += 1.0  # class scores are a softmax: shift one class
    with pytest.raises(ExportMismatch, match="'sem_seg' differs"):
        check_export(out, other, [image])


def test_cli_exports_and_checks_on_the_validation_images(trained_mask_ckpt, root, capsys):
    out = root / "cli" / "model.onnx"
    assert main(["export", str(trained_mask_ckpt), "--format", "onnx", "--out", str(out), "--num-images", "4"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "checked on 4 image(s)" in printed and "input 3x64x64" in printed
    assert not [p.name for p in out.parent.iterdir() if p.name != "model.onnx"]  # no temporary file left


def test_cli_user_errors_exit_2_with_one_paragraph(trained_mask_ckpt, root, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", str(root / "missing.ckpt"), "--out", str(root / "x.pt")])
    assert exc.value.code == 2 and "missing.ckpt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["export", str(trained_mask_ckpt), "model.roi_head.scor_threshold=0.5", "--out", str(root / "x.pt")])
    err = " ".join(capsys.readouterr().err.split())
    assert exc.value.code == 2 and "scor_threshold" in err and "score_threshold" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        main(["export", str(trained_mask_ckpt), "--out", str(root / "x.pt"), "--images", str(root / "nothing-*.png")])
    assert exc.value.code == 2
    assert not (root / "x.pt").exists()
