"""segkit.Predictor and `segkit predict` on a semantic segmentor: class scores at each image's size,
label maps written as PNG, pictures with the classes coloured and a legend. The model is untrained
(random weights), so every test is fast; the values are compared with the model's own outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import segkit
from segkit.checkpoint import CLASSES_KEY, CONFIG_KEY
from segkit.cli import main
from segkit.predict import label_map, save_label_map

CLASSES = ["background", "circle", "square", "triangle"]
SEG_CONFIG = """
model:
  type: EncoderDecoder
  backbone: {type: ResNet, depth: 18, base_channels: 8}
  neck: {type: FPN, in_features: [c2, c3, c4, c5], out_channels: 16}
  decode_head: {type: EncHead, in_features: p3, channels: 16, num_codes: 4, num_classes: 4}
"""


def _save_checkpoint(root: Path, classes: list[str] | None = CLASSES) -> Path:
    cfg_path = root / "seg.yaml"
    cfg_path.write_text(SEG_CONFIG)
    cfg = segkit.load_config(cfg_path)
    torch.manual_seed(0)
    model = segkit.build_model(cfg)
    # BatchNorm running statistics of an untrained model are (0, 1); random ones make the classes vary
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
            module.running_mean.uniform_(-0.5, 0.5)
    ckpt = {"state_dict": model.state_dict(), CONFIG_KEY: json.loads(json.dumps(cfg))}
    if classes is not None:
        ckpt[CLASSES_KEY] = classes
    path = root / ("seg.ckpt" if classes is not None else "seg_unnamed.ckpt")
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("predict_semseg")


@pytest.fixture(scope="module")
def seg_ckpt(root: Path) -> Path:
    return _save_checkpoint(root)


@pytest.fixture(scope="module")
def images(root: Path) -> list[Path]:
    folder = root / "images"
    folder.mkdir()
    paths = []
    for index, (height, width) in enumerate([(48, 64), (70, 40)]):
        rng = np.random.default_rng(index)
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        array[height // 4: height // 2, width // 4: width // 2] = 255
        paths.append(folder / f"img{index}.png")
        Image.fromarray(array).save(paths[-1])
    return paths


def test_predictor_returns_class_scores_at_each_image_size_for_every_input_form(seg_ckpt: Path, images: list[Path]):
    predictor = segkit.Predictor(seg_ckpt)
    assert predictor.is_segmentor and predictor.class_names == CLASSES
    assert [predictor.class_name(c) for c in (0, 3, 4)] == ["background", "triangle", "class_4"]
    outputs = predictor(images)
    for path, output in zip(images, outputs):
        array = np.asarray(Image.open(path))
        assert set(output) == {"sem_seg"}
        assert tuple(output["sem_seg"].shape) == (4, *array.shape[:2])
        for same in (predictor(str(path)), predictor(array), predictor(Image.open(path))):
            torch.testing.assert_close(same["sem_seg"], output["sem_seg"])
    labels = label_map(outputs[0])
    assert labels.dtype == torch.int64 and tuple(labels.shape) == (48, 64)
    assert len(labels.unique()) > 1  # the drawing test below needs more than one class


def test_predictor_applies_the_config_test_cfg(seg_ckpt: Path, images: list[Path]):
    whole = segkit.Predictor(seg_ckpt)(images[0])["sem_seg"]
    flipped = segkit.Predictor(seg_ckpt, overrides=["model.test_cfg.flip=true"])(images[0])["sem_seg"]
    model = segkit.Predictor(seg_ckpt).model
    image = torch.from_numpy(np.array(Image.open(images[0]))).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        mirrored = model([image.flip(-1)])[0]["sem_seg"].flip(-1)
    torch.testing.assert_close(flipped, (whole + mirrored) / 2, atol=1e-5, rtol=1e-4)


def test_default_class_names_of_a_segmentor_count_from_zero(root: Path):
    predictor = segkit.Predictor(_save_checkpoint(root, classes=None))
    assert predictor.class_names == ["class_0", "class_1", "class_2", "class_3"]


def test_label_map_refuses_a_detector_output():
    with pytest.raises(ValueError, match="needs a segmentor's output with 'sem_seg'.*got an output with"):
        label_map({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "scores": torch.zeros(0)})


@pytest.mark.parametrize("top", [3, 300], ids=["8-bit", "16-bit"])
def test_label_maps_are_saved_losslessly(tmp_path: Path, top: int):
    labels = torch.randint(0, top + 1, (20, 30))
    labels[0, 0] = top
    path = tmp_path / "labels.png"
    save_label_map(labels, str(path))
    with Image.open(path) as picture:
        assert picture.mode == ("L" if top <= 255 else "I;16")
        np.testing.assert_array_equal(np.asarray(picture), labels.numpy())


def test_cli_writes_pictures_and_label_maps_equal_to_the_predictor(
        seg_ckpt: Path, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "out"
    assert main(["predict", str(seg_ckpt), *map(str, images), "--out", str(out), "--device", "cpu"]) == 0
    assert f"label maps (PNG, pixel = class index) in {out / 'labels'}" in capsys.readouterr().out
    assert not (out / "predictions.json").exists()
    expected = segkit.Predictor(seg_ckpt)(images)
    for path, output in zip(images, expected):
        original = np.asarray(Image.open(path))
        with Image.open(out / "labels" / path.name) as saved:
            np.testing.assert_array_equal(np.asarray(saved), label_map(output).numpy())
        picture = np.asarray(Image.open(out / path.name))
        assert picture.shape == original.shape
        assert (picture != original).any(axis=2).mean() > 0.5  # coloured by class
        legend = picture[:10, :20].astype(int)
        assert (legend >= 240).all(axis=2).mean() > 0.3  # the white legend panel in the top-left corner


def test_cli_keeps_equal_stems_apart_and_never_overwrites_an_input(seg_ckpt: Path, images: list[Path], tmp_path: Path):
    out = tmp_path / "out"
    for folder, source in ((tmp_path / "a", images[0]), (tmp_path / "b", images[1]), (out / "labels", images[0])):
        folder.mkdir(parents=True)
        shutil.copy(source, folder / "same.png")
    inside = (out / "labels" / "same.png").read_bytes()
    inputs = [tmp_path / "a", tmp_path / "b", out / "labels" / "same.png"]
    assert main(["predict", str(seg_ckpt), *map(str, inputs), "--out", str(out), "--device", "cpu"]) == 0
    names = ["same_1.png", "same_2.png", "same_3.png"]  # same.png: the label map would overwrite an input
    assert sorted(p.name for p in out.glob("*.png")) == names
    assert (out / "labels" / "same.png").read_bytes() == inside
    for name, source in zip(names, (images[0], images[1], images[0])):
        with Image.open(out / name) as picture, Image.open(out / "labels" / name) as labels:
            assert picture.size == labels.size == Image.open(source).size and labels.mode == "L"


def test_cli_with_a_missing_input_exits_2(seg_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(seg_ckpt), str(tmp_path / "none.png"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "none.png" in err and "Traceback" not in err


def test_an_image_result_does_not_depend_on_the_other_images_of_the_batch(seg_ckpt: Path, images: list[Path]):
    predictor = segkit.Predictor(seg_ckpt, batch_size=3)
    alone = predictor(images[0])["sem_seg"]
    together = predictor([images[1], images[0], images[0]])
    torch.testing.assert_close(together[1]["sem_seg"], alone)
    torch.testing.assert_close(together[2]["sem_seg"], alone)
