"""segkit.cam and `segkit cam`: class activation maps of a backbone output for detectors and segmentors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import segkit
from segkit.cam import class_activation_map, default_layer, overlay_heatmap
from segkit.cli import main
from test_export import SEG_CONFIG, _untrained_ckpt, _val_images


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cam")


def _model(ckpt: Path, threshold: float = 0.0) -> torch.nn.Module:
    # a briefly trained model: keep every detection, so that each image has some to explain
    return segkit.load_model(ckpt, overrides=[f"model.roi_head.score_threshold={threshold}"]).eval()


def test_detection_map_is_a_normalised_picture_of_the_image(trained_mask_ckpt):
    model = _model(trained_mask_ckpt)
    for image in _val_images(trained_mask_ckpt, 3):
        cam = class_activation_map(model, image)
        assert cam.heatmap.shape == image.shape[-2:] and cam.heatmap.dtype == torch.float32
        assert cam.layer == "c3" and cam.target == 0 and cam.box is not None
        assert float(cam.heatmap.min()) >= 0.0 and float(cam.heatmap.max()) == pytest.approx(1.0)


def test_map_explains_the_detection_asked_for_and_leaves_no_gradient(trained_mask_ckpt):
    model = _model(trained_mask_ckpt)
    image = _val_images(trained_mask_ckpt, 1)[0]
    with torch.no_grad():
        detections = model([image])[0]
    second = class_activation_map(model, image, target=1)
    assert second.target == 1 and second.label == int(detections["labels"][1])
    assert second.box == pytest.approx(detections["boxes"][1].tolist())
    assert second.score == pytest.approx(float(detections["scores"][1]))
    assert all(p.grad is None for p in model.parameters())
    grad_cam = class_activation_map(model, image, target=1, method="gradcam", layer="c4")
    assert grad_cam.layer == "c4" and not torch.allclose(grad_cam.heatmap, second.heatmap)


def test_bad_requests_are_clear_errors(trained_mask_ckpt):
    model = _model(trained_mask_ckpt)
    image = _val_images(trained_mask_ckpt, 1)[0]
    with pytest.raises(ValueError, match="no feature map 'c9'; its feature maps are c2, c3, c4, c5"):
        class_activation_map(model, image, layer="c9")
    with pytest.raises(ValueError, match="detection 500 does not exist"):
        class_activation_map(model, image, target=500)
    with pytest.raises(ValueError, match="unknown method"):
        class_activation_map(model, image, method="saliency")
    with pytest.raises(ValueError, match="detects nothing"):
        class_activation_map(_model(trained_mask_ckpt, threshold=1.0), image)


def test_segmentor_map_for_a_class(root):
    ckpt = _untrained_ckpt(root, "seg", SEG_CONFIG, [])
    model = segkit.load_model(ckpt).eval()
    assert default_layer(model) == "c5"
    image = torch.rand(3, 72, 88, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        predicted = model([image])[0]["sem_seg"].argmax(0)
    cam = class_activation_map(model, image)  # sliding-window test_cfg is set aside for one pass
    counts = torch.bincount(predicted.flatten(), minlength=4)
    counts[0] = 0
    assert cam.box is None and cam.label == cam.target == int(counts.argmax())
    assert cam.heatmap.shape == (72, 88) and float(cam.heatmap.max()) == pytest.approx(1.0)
    assert model.test_cfg.mode == "slide"
    with pytest.raises(ValueError, match="class 7 is out of range"):
        class_activation_map(model, image, target=7)


def test_overlay_blends_the_colour_map():
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    heat = np.zeros((4, 5), dtype=np.float32)
    heat[0, 0] = 1.0
    out = overlay_heatmap(image, heat, alpha=1.0)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] > 100 and out[0, 0, 2] < 50  # hot: red
    assert out[3, 4, 2] > 100 and out[3, 4, 0] < 50  # cold: blue


def test_cli_draws_one_picture_per_image(trained_mask_ckpt, root, capsys):
    images = root / "images"
    images.mkdir()
    for i, image in enumerate(_val_images(trained_mask_ckpt, 2)):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(images / f"v{i}.png")
    out = root / "cam_out"
    assert main(["cam", str(trained_mask_ckpt), str(images), "model.roi_head.score_threshold=0.0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["v0.png", "v1.png"]
    assert "detection 0" in printed and "c3 ->" in printed
    assert Image.open(out / "v0.png").size == (64, 64)
    with pytest.raises(SystemExit) as exc:
        main(["cam", str(trained_mask_ckpt), str(images), "--out", str(out), "--layer", "p3"])
    assert exc.value.code == 2 and "--layer" in capsys.readouterr().err
