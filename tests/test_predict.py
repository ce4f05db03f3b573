"""segkit.Predictor, segkit.visualize and `segkit predict`: images in, contract dicts, pictures and
COCO results out. Models are untrained (random weights, score threshold 0) so every test is fast."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

import segkit
from segkit.checkpoint import CLASSES_KEY, CONFIG_KEY
from segkit.cli import main
from segkit.data.coco import DatasetError
from segkit.predict import as_image_tensor
from segkit.visualize import class_colors, draw_detections

CLASSES = ["circle", "square", "triangle"]
MASK_HEAD = "model.roi_head.mask_head={type: MaskRCNNHead, num_convs: 1, conv_dim: 8}"


def _save_checkpoint(root: Path, name: str, overrides: list[str], classes: list[str] | None = CLASSES) -> Path:
    from tests.conftest import TINY_CONFIG

    cfg_path = root / f"{name}.yaml"
    cfg_path.write_text(TINY_CONFIG.format(root=root / "data", work_dir=root / "work"))
    cfg = segkit.load_config(cfg_path, ["model.roi_head.score_threshold=0.0", *overrides])
    torch.manual_seed(0)
    model = segkit.build_model(cfg)
    ckpt = {"state_dict": model.state_dict(), CONFIG_KEY: json.loads(json.dumps(cfg))}
    if classes is not None:
        ckpt[CLASSES_KEY] = classes
    path = root / f"{name}.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("predict")


@pytest.fixture(scope="module")
def box_ckpt(root: Path) -> Path:
    return _save_checkpoint(root, "boxes", [])


@pytest.fixture(scope="module")
def mask_ckpt(root: Path) -> Path:
    return _save_checkpoint(root, "masks", [MASK_HEAD])


def _image(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 40, dtype=np.uint8)
    y, x = rng.integers(4, height // 2), rng.integers(4, width // 2)
    image[y:y + height // 3, x:x + width // 3] = rng.integers(120, 255, size=3, dtype=np.uint8)
    return image


@pytest.fixture(scope="module")
def image_dir(root: Path) -> Path:
    folder = root / "images"
    folder.mkdir()
    for i, (h, w) in enumerate([(64, 64), (48, 80), (72, 56)]):
        Image.fromarray(_image(h, w, i)).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _assert_contract(output: dict, size: tuple[int, int], *, masks: bool) -> None:
    n = len(output["boxes"])
    assert output["boxes"].shape == (n, 4) and output["boxes"].dtype == torch.float32
    assert output["labels"].dtype == torch.int64 and output["scores"].shape == (n,)
    assert all(t.device.type == "cpu" for t in output.values())
    assert n > 0 and int(output["labels"].min()) >= 1 and int(output["labels"].max()) <= len(CLASSES)
    if masks:
        assert output["masks"].shape == (n, 1, *size) and output["masks"].dtype == torch.float32
        assert 0.0 <= float(output["masks"].min()) and float(output["masks"].max()) <= 1.0
    else:
        assert "masks" not in output


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- Predictor
def test_predictor_gives_the_same_contract_dict_for_path_array_pil_and_tensor(box_ckpt: Path, image_dir: Path):
    predictor = segkit.Predictor(box_ckpt)
    path = image_dir / "img1.png"
    array = np.array(Image.open(path).convert("RGB"))
    by_path = predictor(path)
    _assert_contract(by_path, (48, 80), masks=False)
    _assert_same(by_path, predictor(str(path)))
    _assert_same(by_path, predictor(array))
    _assert_same(by_path, predictor(Image.open(path)))
    _assert_same(by_path, predictor(torch.from_numpy(array).permute(2, 0, 1).float() / 255))
    assert predictor.class_names == CLASSES and not predictor.model.training


def test_list_input_runs_in_batches_of_batch_size(box_ckpt: Path, image_dir: Path):
    predictor = segkit.Predictor(box_ckpt, batch_size=2)
    batches: list[int] = []
    predictor.model.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    paths = sorted(image_dir.glob("*.png"))
    outputs = predictor(paths)
    assert batches == [2, 1] and isinstance(outputs, list) and len(outputs) == 3
    # Padding to a common size changes an untrained model's output a little, so compare batch by batch.
    tensors = [as_image_tensor(p) for p in paths]
    with torch.no_grad():
        reference = predictor.model(tensors[:2]) + predictor.model(tensors[2:])
    for output, expected in zip(outputs, reference):
        _assert_same(output, expected)
    assert predictor([]) == []


def test_score_threshold_keeps_detections_at_or_above_it_with_their_masks(mask_ckpt: Path, image_dir: Path):
    path = image_dir / "img0.png"
    everything = segkit.Predictor(mask_ckpt)(path)
    threshold = float(everything["scores"].median())
    filtered = segkit.Predictor(mask_ckpt, score_threshold=threshold)(path)
    keep = everything["scores"] >= threshold
    assert 0 < len(filtered["scores"]) < len(everything["scores"])
    for key in ("boxes", "labels", "scores", "masks"):
        torch.testing.assert_close(filtered[key], everything[key][keep])


def test_mask_model_returns_masks_pasted_at_each_image_size(mask_ckpt: Path, image_dir: Path):
    predictor = segkit.Predictor(mask_ckpt, batch_size=3)
    outputs = predictor.predict_many([image_dir / "img1.png", _image(72, 56, 2)])
    _assert_contract(outputs[0], (48, 80), masks=True)
    _assert_contract(outputs[1], (72, 56), masks=True)
    assert predictor.mask_threshold == 0.5


def test_class_names_fall_back_to_numbered_names_without_building_the_dataset(root: Path):
    ckpt = _save_checkpoint(root, "nameless", ["data.val.root=/nonexistent/never/built"], classes=None)
    predictor = segkit.Predictor(ckpt)
    assert predictor.class_names == ["class_1", "class_2", "class_3"]
    assert predictor.class_name(7) == "class_7"


def test_category_ids_of_the_stored_config_map_labels(box_ckpt: Path):
    cfg = segkit.config_from_checkpoint(box_ckpt)
    cfg["data"]["val"]["category_ids"] = [10, 20, 30]
    predictor = segkit.Predictor(box_ckpt, config=cfg)
    assert [predictor.category_id(label) for label in (1, 2, 3)] == [10, 20, 30]
    assert segkit.Predictor(box_ckpt).category_id(2) == 2
    overridden = segkit.Predictor(box_ckpt, config=cfg, overrides=["data.val.category_ids=[7, 8, 9]"])
    assert overridden.category_id(1) == 7 and cfg["data"]["val"]["category_ids"] == [10, 20, 30]


@pytest.mark.parametrize("name", ["missing.png", "broken.png"])
def test_unreadable_image_path_raises_dataset_error_naming_the_file(box_ckpt: Path, tmp_path: Path, name: str):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=name):
        segkit.Predictor(box_ckpt)(tmp_path / name)


# ------------------------------------------------------------------------------- drawing
def test_draw_detections_colours_box_outline_and_label_but_not_far_outside():
    image = np.full((100, 120, 3), 128, dtype=np.uint8)
    output = {"boxes": torch.tensor([[40.0, 50.0, 90.0, 90.0]]), "labels": torch.tensor([2]),
              "scores": torch.tensor([0.9])}
    drawn = draw_detections(image, output, CLASSES)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    np.testing.assert_array_equal(drawn[70, 40], class_colors([2])[0])  # left edge of the box
    assert (drawn[40:50, 40:80] != 128).any()  # the label above the box
    np.testing.assert_array_equal(drawn[95:, :], image[95:, :])
    np.testing.assert_array_equal(drawn[:, :30], image[:, :30])
    np.testing.assert_array_equal(draw_detections(image, output, CLASSES, score_threshold=0.95), image)


def test_draw_detections_tints_mask_pixels_translucently():
    image = np.full((60, 60, 3), 200, dtype=np.uint8)
    masks = torch.zeros(1, 1, 60, 60)
    masks[0, 0, 25:35, 25:35] = 0.9
    output = {"boxes": torch.tensor([[20.0, 20.0, 40.0, 40.0]]), "labels": torch.tensor([1]),
              "scores": torch.tensor([0.8]), "masks": masks}
    drawn = draw_detections(image, output, CLASSES, alpha=0.5)
    expected = np.round(200 * 0.5 + class_colors([1])[0].astype(np.float32) * 0.5).astype(np.uint8)
    np.testing.assert_array_equal(drawn[30, 30], expected)
    np.testing.assert_array_equal(drawn[22:24, 22:24].reshape(-1, 3), np.full((4, 3), 200, dtype=np.uint8))
    np.testing.assert_array_equal(drawn[45:, :], image[45:, :])


def test_class_colours_are_fixed_and_distinct():
    colors = class_colors(np.arange(1, 21))
    assert len({tuple(c) for c in colors}) == 20
    np.testing.assert_array_equal(class_colors([5]), class_colors([5]))


# ------------------------------------------------------------------------------- CLI
def test_cli_writes_a_picture_per_image_and_coco_results_equal_to_the_predictor(
        mask_ckpt: Path, image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "out"
    paths = [image_dir / "img0.png", image_dir / "img1.png"]
    assert main(["predict", str(mask_ckpt), *map(str, paths), "--out", str(out), "--score-thr", "0.2",
                 "--device", "cpu", "--batch-size", "2"]) == 0
    assert "predicted 2 image(s)" in capsys.readouterr().out
    for path in paths:
        assert Image.open(out / f"{path.stem}.png").size == Image.open(path).size
    results = json.loads((out / "predictions.json").read_text())
    expected = segkit.Predictor(mask_ckpt, score_threshold=0.2)(paths)
    for image_id, (path, output) in enumerate(zip(paths, expected)):
        entries = [r for r in results if r["image_id"] == image_id]
        assert {r["file_name"] for r in entries} == {str(path)}
        boxes = torch.tensor([r["bbox"] for r in entries]).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        torch.testing.assert_close(boxes, output["boxes"])
        assert [r["label"] for r in entries] == output["labels"].tolist() == [r["category_id"] for r in entries]
        assert [r["category_name"] for r in entries] == [CLASSES[i - 1] for i in output["labels"].tolist()]
        decoded = mask_utils.decode([r["segmentation"] for r in entries])
        np.testing.assert_array_equal(decoded.transpose(2, 0, 1), (output["masks"][:, 0] >= 0.5).numpy())


def test_cli_takes_folders_and_glob_patterns_and_keeps_equal_stems_apart(
        box_ckpt: Path, image_dir: Path, tmp_path: Path):
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(_image(32, 40, 9)).save(other / "img0.jpg")
    out = tmp_path / "out"
    assert main(["predict", str(box_ckpt), str(image_dir), str(other / "*.jpg"), "--out", str(out),
                 "--score-thr", "0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["img0.png", "img0_1.png", "img1.png", "img2.png",
                                                     "predictions.json"]
    assert Image.open(out / "img0_1.png").size == (40, 32)
    files = {r["file_name"] for r in json.loads((out / "predictions.json").read_text())}
    assert files <= {*(str(image_dir / f"img{i}.png") for i in range(3)), str(other / "img0.jpg")}


def test_cli_with_config_and_checkpoint_and_override(box_ckpt: Path, image_dir: Path, tmp_path: Path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(dict(segkit.config_from_checkpoint(box_ckpt))))
    out = tmp_path / "out"
    assert main(["predict", str(cfg), str(box_ckpt), str(image_dir / "img2.png"),
                 "model.roi_head.detections_per_image=2", "--out", str(out), "--score-thr", "0"]) == 0
    assert len(json.loads((out / "predictions.json").read_text())) == 2


@pytest.mark.parametrize("make_args, message", [
    (lambda ck, d: [str(ck), str(d / "nope.png")], "nope.png"),
    (lambda ck, d: [str(ck), str(d / "*.gif")], "matches no image"),
    (lambda ck, d: [str(ck), str(d / "empty")], "holds no image"),
    (lambda ck, d: [str(d / "cfg.yaml"), str(d / "x.png")], "needs a checkpoint"),
    (lambda ck, d: [str(d / "missing.ckpt"), str(d / "x.png")], "does not exist"),
])
def test_cli_bad_inputs_exit_2_with_a_clear_message(box_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    make_args, message: str):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["predict", *make_args(box_ckpt, tmp_path), "--out", str(tmp_path / "out")])
    err = " ".join(capsys.readouterr().err.split())
    assert info.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "predictions.json").exists()


def test_draw_semantic_colours_each_pixel_by_its_arg_max_class():
    from segkit.visualize import draw_semantic

    image = np.full((80, 100, 3), 100, dtype=np.uint8)
    scores = torch.zeros(3, 80, 100)
    scores[2, 40:] = 1.0  # bottom half: class 2, top half: class 0
    drawn = draw_semantic(image, scores, ["background", "sky", "road"], alpha=0.5)
    for (y, x), label in (((60, 50), 2), ((30, 80), 0)):
        expected = np.round(100 * 0.5 + class_colors([label])[0].astype(np.float32) * 0.5)
        np.testing.assert_array_equal(drawn[y, x], expected.astype(np.uint8))
    assert (drawn[:12, :12] != drawn[30, 80]).any()  # the legend


def test_find_images_expands_folders_and_patterns_sorted_without_duplicates(image_dir: Path):
    from segkit.predict import find_images

    pngs = [str(image_dir / f"img{i}.png") for i in range(3)]
    assert find_images([image_dir]) == pngs
    assert find_images([str(image_dir.parent / "imag*")]) == pngs  # a pattern matching a folder
    assert find_images([pngs[2], str(image_dir / "*.png")]) == [pngs[2], pngs[0], pngs[1]]
