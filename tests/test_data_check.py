"""`segkit data check` finds every broken record of a dataset; `segkit data show` draws transformed samples.

Broken copies of small generated Shapes splits (COCO, label maps, VOC XML) are made as in
tests/test_faults_data.py: each fault is planted in a known record, and the check must name it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from segkit.cli import main
from segkit.config import load_config
from segkit.data.check import SplitReport, check_config
from segkit.visualize import class_colors

SIZE = 64


@pytest.fixture(scope="module")
def shapes_val(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """12 generated Shapes images (64 px, with masks): the image folder and the COCO dict."""
    from segkit.data.shapes import Shapes

    shapes = Shapes(split="val", num_images=12, image_size=SIZE, root=str(tmp_path_factory.mktemp("cache")),
                    with_masks=True, progress=False)
    return Path(shapes.img_dir), json.loads(Path(shapes.ann_file).read_text())


def _copy(shapes_val: tuple[Path, dict], tmp_path: Path) -> tuple[Path, dict]:
    img_dir, data = shapes_val
    shutil.copytree(img_dir, tmp_path / "images")
    return tmp_path / "images", json.loads(json.dumps(data))


def _coco_config(tmp_path: Path, data: dict, img_dir: Path, *, with_masks: bool = True) -> Path:
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(data))
    config = tmp_path / "data.yaml"
    config.write_text(f"data:\n  val: {{type: CocoDataset, ann_file: '{ann_file}', img_dir: '{img_dir}', "
                      f"with_masks: {str(with_masks).lower()}}}\n")
    return config


def _first_annotation(data: dict, image_id: int) -> dict:
    return next(a for a in data["annotations"] if a["image_id"] == image_id)


def _ids(report: SplitReport, kind: str, *, annotations: bool = False) -> set[Any]:
    found = report.problems.get(kind, [])
    return {p.annotation if annotations else p.image_id for p in found}


def _check(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, SplitReport]:
    code = main(["data", "check", str(config)])
    out = " ".join(capsys.readouterr().out.split())  # records are wrapped at spaces
    [report] = check_config(load_config(config), progress=False)
    return code, out, report


def _plant_faults(data: dict, img_dir: Path) -> dict[str, Any]:
    """Break known records of the copy; returns what each fault's record is."""
    (img_dir / "000002.png").unlink()
    corrupt = img_dir / "000003.png"
    corrupt.write_bytes(corrupt.read_bytes()[:150])
    Image.open(img_dir / "000004.png").resize((56, 48)).save(img_dir / "000004.png")
    outside = _first_annotation(data, 5)
    outside["bbox"] = [40, 10, 40, 20]  # reaches x = 80 on a 64 px image
    zero = _first_annotation(data, 6)
    zero["bbox"][2] = 0
    mask = next(a for a in data["annotations"] if a["image_id"] >= 7 and a["bbox"][0] + a["bbox"][2] + 8 <= SIZE)
    mask["bbox"][0] += 8  # the box moves 8 px right of its (unchanged) mask
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 8]
    return {"outside": outside["id"], "zero": zero["id"], "mask": mask["id"]}


def test_check_finds_every_planted_fault_and_exits_1(shapes_val, tmp_path: Path, capsys):
    img_dir, data = _copy(shapes_val, tmp_path)
    faults = _plant_faults(data, img_dir)
    code, out, report = _check(_coco_config(tmp_path, data, img_dir), capsys)
    assert code == 1
    assert _ids(report, "missing_image") == {2} and _ids(report, "corrupt_image") == {3}
    assert _ids(report, "image_size") == {4}
    assert _ids(report, "box_outside", annotations=True) == {f"annotation id {faults['outside']}"}
    assert _ids(report, "degenerate_box", annotations=True) == {f"annotation id {faults['zero']}"}
    # the moved box disagrees with its mask, and so does the box stretched outside the image
    assert _ids(report, "mask_box_mismatch", annotations=True) == {f"annotation id {faults['mask']}",
                                                                   f"annotation id {faults['outside']}"}
    assert _ids(report, "empty_image") == {8}
    assert report.num_images == 12 and report.warnings == 1 and report.errors == 7
    assert "build_failed" not in report.problems and "unknown_category" not in report.problems
    assert "000002.png (image id 2): does not exist" in out and "000004.png (image id 4): is 48x56" in out
    assert f"image id 6, annotation id {faults['zero']}: has bbox" in out and "zero width" in out
    assert "7 error(s) and 1 warning(s) in 1 split(s)." in out


def test_clean_copy_exits_0(shapes_val, tmp_path: Path, capsys):
    img_dir, data = _copy(shapes_val, tmp_path)
    code, out, report = _check(_coco_config(tmp_path, data, img_dir), capsys)
    assert code == 0 and report.problems == {} and report.num_annotations == len(data["annotations"])
    assert "no problems found" in out and "0 error(s) and 0 warning(s)" in out


def test_unknown_category_fails_the_split_and_the_raw_file_is_still_scanned(shapes_val, tmp_path: Path, capsys):
    img_dir, data = _copy(shapes_val, tmp_path)
    (img_dir / "000002.png").unlink()
    stray = _first_annotation(data, 9)
    stray["category_id"] = 99
    code, out, report = _check(_coco_config(tmp_path, data, img_dir), capsys)
    assert code == 1
    [failure] = report.problems["build_failed"]
    assert f"annotation id {stray['id']} has category_id 99" in failure.message
    assert _ids(report, "unknown_category", annotations=True) == {f"annotation id {stray['id']}"}
    assert _ids(report, "missing_image") == {2}  # found although the dataset could not be built
    assert "cannot be built" in out


def _label_config(tmp_path: Path, img_dir: Path, ann_dir: Path) -> Path:
    config = tmp_path / "seg.yaml"
    config.write_text(f"data:\n  train: {{type: SemSegFolder, img_dir: '{img_dir}', ann_dir: '{ann_dir}', "
                      f"classes: [background, circle, square, triangle], img_suffix: .png}}\n")
    return config


def test_label_map_values_outside_the_classes_and_wrong_size_are_found(tmp_path: Path, capsys):
    from segkit.data.semseg_formats import ShapesSegmentation

    shapes = ShapesSegmentation(split="val", num_images=6, image_size=SIZE, root=str(tmp_path / "cache"),
                                progress=False)
    img_dir, ann_dir = tmp_path / "images", tmp_path / "labels"
    shutil.copytree(shapes.img_dir, img_dir)
    shutil.copytree(shapes.instances.label_dir, ann_dir)
    config = _label_config(tmp_path, img_dir, ann_dir)
    assert _check(config, capsys)[0] == 0
    label = np.asarray(Image.open(ann_dir / "000002.png")).copy()
    label[10:12, 10:12] = 7
    Image.fromarray(label).save(ann_dir / "000002.png")
    Image.open(ann_dir / "000005.png").resize((32, 32), Image.NEAREST).save(ann_dir / "000005.png")
    code, out, report = _check(config, capsys)
    assert code == 1 and report.num_images == 6 and report.errors == 2
    [values] = report.problems["label_values"]
    [size] = report.problems["label_size"]
    assert values.file == str(ann_dir / "000002.png") and "value(s) 7" in values.message
    assert size.file == str(ann_dir / "000005.png") and "is 32x32 (HxW)" in size.message
    assert "label-map values outside the classes: 1" in out and "000005.png (image id 4): is 32x32" in out


@pytest.fixture()
def voc_root(tmp_path: Path) -> Path:
    from segkit.data.voc import ShapesVOC

    shapes = ShapesVOC(split="val", num_images=6, image_size=SIZE, root=str(tmp_path / "cache"), progress=False)
    return Path(shutil.copytree(shapes.voc_root, tmp_path / "VOC"))


def _voc_config(tmp_path: Path, root: Path) -> Path:
    config = tmp_path / "voc.yaml"
    config.write_text(f"data:\n  val: {{type: VOCDetection, root: '{root}', split: val, "
                      f"classes: [circle, square, triangle]}}\n")
    return config


def test_malformed_voc_xml_fails_the_split_and_every_bad_file_is_named(voc_root: Path, tmp_path: Path, capsys):
    for voc_id in ("000003", "000005"):
        xml = voc_root / "Annotations" / f"{voc_id}.xml"
        xml.write_text(xml.read_text()[:120])
    code, out, report = _check(_voc_config(tmp_path, voc_root), capsys)
    assert code == 1
    assert "000003.xml" in report.problems["build_failed"][0].message
    assert {p.file for p in report.problems["bad_annotation_file"]} == {
        str(voc_root / "Annotations" / "000003.xml"), str(voc_root / "Annotations" / "000005.xml")}
    assert "not well-formed XML" in out


def test_voc_box_outside_names_the_xml_file_and_object(voc_root: Path, tmp_path: Path, capsys):
    xml = voc_root / "Annotations" / "000004.xml"
    text = xml.read_text()
    start = text.index("<xmax>", text.index("<object>", text.index("<object>") + 1))  # the second object
    end = text.index("</xmax>", start)
    xml.write_text(text[:start] + "<xmax>90" + text[end:])
    code, out, report = _check(_voc_config(tmp_path, voc_root), capsys)
    assert code == 1
    [problem] = report.problems["box_outside"]
    assert problem.file == str(xml) and problem.annotation.startswith("object 1 (")


def test_user_errors_of_the_command_exit_2(tmp_path: Path, shapes_val, capsys):
    with pytest.raises(SystemExit) as info:
        main(["data", "check", str(tmp_path / "missing.yaml")])
    assert info.value.code == 2 and "missing.yaml" in capsys.readouterr().err
    img_dir, data = _copy(shapes_val, tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["data", "check", str(_coco_config(tmp_path, data, img_dir)), "--split", "test"])
    err = " ".join(capsys.readouterr().err.split())
    assert info.value.code == 2 and "data.test" in err and "defines val" in err


# ------------------------------------------------------------------------------------ segkit data show
def _edge_match(picture: np.ndarray, box: np.ndarray, color: np.ndarray) -> dict[str, float]:
    """Per side of ``box``: the fraction of its pixels (the best line within 1 px of it) that have ``color``."""
    x0, y0, x1, y1 = box
    cols = np.arange(int(np.ceil(x0)) + 2, int(np.floor(x1)) - 1)
    rows = np.arange(int(np.ceil(y0)) + 2, int(np.floor(y1)) - 1)
    found = {}
    for side, value, horizontal in (("top", y0, True), ("bottom", y1, True), ("left", x0, False), ("right", x1, False)):
        lines = [k for k in range(int(round(value)) - 1, int(round(value)) + 2)
                 if 0 <= k < picture.shape[0 if horizontal else 1]]
        pixels = [picture[k, cols] if horizontal else picture[rows, k] for k in lines]
        found[side] = max([float((p == color).all(axis=1).mean()) for p in pixels if len(p)] or [0.0])
    return found


def test_show_draws_transformed_boxes_and_writes_a_grid(tmp_path: Path, capsys):
    from segkit.engine.datamodule import build_datamodule
    from segkit.predict import as_image_array

    config = tmp_path / "show.yaml"
    config.write_text(f"data:\n  train: {{type: Shapes, split: train, num_images: 8, image_size: {SIZE}, "
                      f"root: '{tmp_path / 'cache'}', with_masks: true, progress: false, transforms: "
                      f"[{{type: Resize, height: 80, width: 96}}, {{type: HorizontalFlip, p: 1.0}}]}}\n")
    out = tmp_path / "out"
    assert main(["data", "show", str(config), "--n", "4", "--out", str(out), "--grid"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 5 and "grid.png" in files
    dataset = build_datamodule(load_config(config)).build_dataset("train")
    for name in files:
        picture = np.asarray(Image.open(out / name).convert("RGB"))
        if name == "grid.png":
            assert 2 * 96 < picture.shape[1] < 3 * 96 and 2 * 80 < picture.shape[0] < 3 * 80  # 2 x 2 cells
            continue
        assert picture.shape == (80, 96, 3)
        image, target = dataset[dataset.image_ids.index(int(name[:-4]))]
        box, label = target["boxes"][-1].numpy(), int(target["labels"][-1])  # drawn last, so on top
        sides = _edge_match(picture, box, class_colors([label])[0])  # the label sits on the top side
        assert sides["top"] > 0.8 and sides["left"] > 0.8, (name, box, sides)
        assert (picture == as_image_array(image)).all(axis=2).mean() > 0.3  # the flipped, resized image


def test_show_colours_label_maps_after_the_transforms(tmp_path: Path):
    from segkit.data.show import show_samples
    from segkit.engine.datamodule import build_datamodule
    from segkit.predict import as_image_array

    size = 128  # the legend covers the top-left 60 px
    config = tmp_path / "seg.yaml"
    config.write_text(f"data:\n  train: {{type: ShapesSegmentation, split: train, num_images: 6, image_size: {size}, "
                      f"root: '{tmp_path / 'cache'}', progress: false, transforms: [{{type: HorizontalFlip, p: 1.0}}]}}"
                      f"\n")
    rendered = show_samples(load_config(config), split="train", num_samples=3, out_dir=str(tmp_path / "out"),
                            progress=False)
    assert len(rendered) == 3
    dataset = build_datamodule(load_config(config)).build_dataset("train")
    for sample in rendered:
        assert Path(sample.path).name == f"{sample.name}.png" and sample.name.isdigit()
        picture = np.asarray(Image.open(sample.path).convert("RGB")).astype(np.float64)
        image, target = dataset[sample.index]
        labels = target["sem_seg"].numpy()
        assert (labels == sample.target["sem_seg"].numpy()).all()
        expected = as_image_array(image) * 0.55 + class_colors(labels.reshape(-1)).reshape(size, size, 3) * 0.45
        corner = (slice(size // 2, None), slice(size // 2, None))  # away from the legend
        assert np.abs(picture[corner] - expected[corner]).max() <= 1.0


def test_dataset_types_without_known_records_are_checked_sample_by_sample():
    import torch

    from segkit.data.check import check_dataset
    from segkit.data.coco import DatasetError

    class Samples(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
            if index == 1:
                raise DatasetError("record 1 is broken")
            return torch.zeros(3, 4, 4), {}

    report = check_dataset(Samples(), SplitReport(split="val", dataset="Samples"), progress=False)
    assert report.num_images == 3 and report.errors == 1
    assert [(p.image_id, p.message) for p in report.problems["bad_sample"]] == [(1, "record 1 is broken")]


def test_a_model_num_classes_that_train_would_refuse_is_an_error(shapes_val, tmp_path: Path, capsys):
    img_dir, data = _copy(shapes_val, tmp_path)
    config = _coco_config(tmp_path, data, img_dir)
    config.write_text(config.read_text() + "model: {type: TwoStageDetector, roi_head: {type: StandardRoIHead, "
                                           "num_classes: 5}}\n")
    code, out, report = _check(config, capsys)
    assert code == 1 and [p.message for p in report.problems["num_classes"]] == [
        f"model.roi_head.num_classes=5 but data.val has {len(data['categories'])} categories "
        f"({', '.join(c['name'] for c in data['categories'])}); set model.roi_head.num_classes: "
        f"{len(data['categories'])}"]
    config.write_text(config.read_text().replace("num_classes: 5", f"num_classes: {len(data['categories'])}"))
    assert _check(config, capsys)[0] == 0
