"""Pascal VOC detection data: strict XML reading, the dataset, voc2coco / coco2voc, and VOC evaluation in training."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segkit.cli import main
from segkit.data.coco import CocoDataset, DatasetError
from segkit.data.voc import ShapesVOC, VOCDetection, coco_to_voc, parse_voc_xml
from segkit.errors import ConfigError
from segkit.evaluation.coco import CocoEvaluator
from segkit.evaluation.voc import VOCEvaluator


def obj(name: str, box: tuple[int, int, int, int], difficult: int | None = 0, truncated: int = 0) -> str:
    flag = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    x1, y1, x2, y2 = box
    return (f"<object><name>{name}</name><pose>Left</pose><truncated>{truncated}</truncated>{flag}"
            f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")


def write_voc(root: Path, images: dict[str, list[str]], *, split: str = "trainval", size: tuple[int, int] = (40, 30)) -> Path:
    """A VOC year folder: JPEG images of ``size`` (WxH), one XML per image (objects given as XML), a split file."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for voc_id, objects in images.items():
        Image.new("RGB", size, (90, 120, 150)).save(root / "JPEGImages" / f"{voc_id}.jpg")
        (root / "Annotations" / f"{voc_id}.xml").write_text(
            f"<annotation><folder>{root.name}</folder><filename>{voc_id}.jpg</filename>"
            f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{''.join(objects)}</annotation>")
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(images) + "\n")
    return root


@pytest.fixture()
def voc07(tmp_path: Path) -> Path:
    return write_voc(tmp_path / "VOC2007", {
        "000005": [obj("chair", (1, 1, 10, 20)), obj("dog", (5, 6, 40, 30), difficult=1, truncated=1)],
        "000007": [obj("car", (3, 4, 12, 15), difficult=None)],
        "000009": [],
    })


def test_xml_is_read_with_flags_and_one_based_boxes(voc07: Path):
    record = parse_voc_xml(str(voc07 / "Annotations" / "000005.xml"))
    assert record["filename"] == "000005.jpg" and (record["width"], record["height"]) == (40, 30)
    assert [o["name"] for o in record["objects"]] == ["chair", "dog"]
    assert record["objects"][1] | {} == {"name": "dog", "label": 12, "bbox": [5, 6, 40, 30], "difficult": 1, "truncated": 1}
    # a missing <difficult> means 0 (some VOC2012 files)
    assert parse_voc_xml(str(voc07 / "Annotations" / "000007.xml"))["objects"][0]["difficult"] == 0


def test_dataset_boxes_labels_and_difficult_objects(voc07: Path):
    ds = VOCDetection(root=str(voc07), split="trainval")
    assert len(ds) == 3 and ds.num_classes == 20
    image, target = ds[0]
    assert image.shape == (3, 30, 40)
    # VOC's 1..10 inclusive pixel indices cover [0, 10] in continuous coordinates
    assert target["boxes"].tolist() == [[0.0, 0.0, 10.0, 20.0]]
    assert target["labels"].tolist() == [ds.classes.index("chair") + 1]
    difficult = [a for a in ds.coco.dataset["annotations"] if a["difficult"]]
    assert len(difficult) == 1 and difficult[0]["iscrowd"] == 1 and difficult[0]["truncated"] == 1
    # with use_difficult the dog is a training target too
    with_difficult = VOCDetection(root=str(voc07), split="trainval", use_difficult=True)
    assert len(with_difficult[0][1]["labels"]) == 2
    assert len(VOCDetection(root=str(voc07), split="trainval", skip_empty=True)) == 2


def test_two_years_concatenate(voc07: Path, tmp_path: Path):
    voc12 = write_voc(tmp_path / "VOC2012", {"2008_000001": [obj("person", (2, 2, 8, 8))]}, split="train")
    ds = VOCDetection(root=[str(voc07), str(voc12)], split=["trainval", "train"])
    assert len(ds) == 4 and sorted(ds.image_ids) == [1, 2, 3, 4]
    assert ds[3][1]["labels"].tolist() == [ds.classes.index("person") + 1]
    assert ds.annotation_source(4).endswith("VOC2012/Annotations/2008_000001.xml")
    with pytest.raises(ConfigError, match="one per root"):
        VOCDetection(root=[str(voc07), str(voc12)], split=["trainval"])


@pytest.mark.parametrize("xml, message", [
    ("<annotation><filename>a.jpg</filename", "not well-formed XML"),
    ("<annotation><filename>a.jpg</filename>" + obj("dgo", (1, 1, 5, 5)) + "</annotation>", "class 'dgo'.*Did you mean 'dog'"),
    ("<annotation><filename>a.jpg</filename><object><name>dog</name></object></annotation>", "object 0 .dog. has no <bndbox>"),
    ("<annotation><filename>a.jpg</filename>" + obj("dog", (9, 1, 5, 5)) + "</annotation>", "is empty: xmin=9"),
    ("<annotation><filename>a.jpg</filename>" + obj("dog", (1, 1, 5, 5), difficult=2) + "</annotation>", "<difficult> is '2'"),
    ("<annotation><filename>a.jpg</filename>" + obj("dog", (1, 1, 5, 5)).replace("<xmax>5", "<xmax>five") + "</annotation>",
     "<xmax> is 'five', not a number"),
    ("<annotation><filename>a.jpg</filename><size><width>0</width><height>3</height></size></annotation>", "positive integers"),
    ("<annotation></annotation>", "has no <filename>"),
    ("<root/>", "has root element <root>"),
])
def test_malformed_xml_is_named(tmp_path: Path, xml: str, message: str):
    path = tmp_path / "a.xml"
    path.write_text(xml)
    with pytest.raises(DatasetError, match=message) as info:
        parse_voc_xml(str(path))
    assert str(path) in str(info.value)


def test_missing_split_annotation_and_unknown_classes(voc07: Path):
    with pytest.raises(ConfigError, match="available splits: trainval. Did you mean 'trainval'"):
        VOCDetection(root=str(voc07), split="trainvl")
    (voc07 / "Annotations" / "000009.xml").unlink()
    with pytest.raises(DatasetError, match="000009.xml' does not exist"):
        VOCDetection(root=str(voc07))
    (voc07 / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n000007\n")
    ds = VOCDetection(root=str(voc07), classes=["chair", "car"], unknown_classes="skip")
    assert ds.classes == ["chair", "car"] and len(ds.coco.dataset["annotations"]) == 2
    with pytest.raises(DatasetError, match="class 'dog'"):
        VOCDetection(root=str(voc07), classes=["chair", "car"])


def test_voc2coco_cli_writes_what_the_dataset_reads(voc07: Path, tmp_path: Path):
    out = tmp_path / "voc07.json"
    assert main(["convert", "voc2coco", str(voc07), "--split", "trainval", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["categories"]][:3] == ["aeroplane", "bicycle", "bird"]
    chair = data["annotations"][0]
    assert chair["bbox"] == [0, 0, 10, 20] and chair["area"] == 200 and chair["iscrowd"] == 0
    assert data["images"][0] == {"id": 1, "file_name": "000005.jpg", "voc_id": "000005", "width": 40, "height": 30}
    coco_ds = CocoDataset(ann_file=str(out), img_dir=str(voc07 / "JPEGImages"))
    voc_ds = VOCDetection(root=str(voc07))
    for i in range(len(voc_ds)):
        for key in ("boxes", "labels"):
            assert torch.equal(coco_ds[i][1][key], voc_ds[i][1][key])


def test_voc2coco_cli_errors_exit_2(voc07: Path, tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["convert", "voc2coco", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json")])
    assert info.value.code == 2
    assert "does not exist" in capsys.readouterr().err
    (voc07 / "Annotations" / "000005.xml").write_text("<annotation>")
    with pytest.raises(SystemExit) as info:
        main(["convert", "voc2coco", str(voc07), "--out", str(tmp_path / "x.json")])
    assert info.value.code == 2 and "000005.xml" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_coco2voc_round_trip_keeps_integer_boxes(tmp_path: Path):
    # Shapes boxes are whole pixels: COCO -> VOC -> COCO gives them back exactly
    voc = ShapesVOC(split="val", num_images=6, image_size=64, root=str(tmp_path / "data"), progress=False)
    from segkit.data.shapes import Shapes

    shapes = Shapes(split="val", num_images=6, image_size=64, root=str(tmp_path / "data"), progress=False)
    for i in range(len(shapes)):
        assert torch.equal(voc[i][1]["boxes"], shapes[i][1]["boxes"])
        assert torch.equal(voc[i][1]["labels"], shapes[i][1]["labels"])
    assert voc.classes == shapes.classes
    out = tmp_path / "again"
    ids = coco_to_voc(voc.coco.dataset, "", str(out), split="val")
    assert len(ids) == 6 and (out / "ImageSets" / "Main" / "val.txt").read_text().split() == ids


def test_shapes_voc_marks_small_shapes_difficult(tmp_path: Path):
    ds = ShapesVOC(split="val", num_images=10, image_size=64, root=str(tmp_path / "data"), difficult_area=150,
                   progress=False)
    anns = ds.coco.dataset["annotations"]
    small = [a for a in anns if a["bbox"][2] * a["bbox"][3] < 150]
    assert small and all(a["difficult"] == 1 and a["iscrowd"] == 1 for a in small)
    assert all(a["difficult"] == 0 for a in anns if a["bbox"][2] * a["bbox"][3] >= 150)


def test_voc_evaluator_equals_evaluate_voc_on_ground_truth_and_noise(tmp_path: Path):
    ds = ShapesVOC(split="val", num_images=12, image_size=64, root=str(tmp_path / "data"), difficult_area=150,
                   progress=False)
    rng = np.random.default_rng(0)
    evaluator, coco = VOCEvaluator(dataset=ds, method="11points"), CocoEvaluator(dataset=ds)
    for i in range(len(ds)):
        _, target = ds[i]
        boxes = target["boxes"] + torch.from_numpy(rng.normal(0, 2, size=tuple(target["boxes"].shape))).float()
        output = {"boxes": boxes, "labels": target["labels"], "scores": torch.from_numpy(rng.random(len(boxes))).float()}
        evaluator.process([target], [output])
        coco.process([target], [output])
    metrics = evaluator.evaluate()
    assert set(metrics) == {"voc/mAP", "voc/AP-circle", "voc/AP-square", "voc/AP-triangle"}
    assert 0.3 < metrics["voc/mAP"] < 1.0
    assert metrics["voc/mAP"] == pytest.approx(np.mean([metrics[f"voc/AP-{c}"] for c in ds.classes]))
    # state / merge (distributed evaluation) gives the same numbers
    merged = VOCEvaluator(dataset=ds, method="11points")
    merged.merge([evaluator.state(), evaluator.state()])
    assert merged.evaluate() == metrics


def test_training_with_voc_evaluation(tmp_path: Path):
    from segkit.config import load_config
    from segkit.engine.runner import evaluate, train
    from tests.conftest import TINY_CONFIG

    cfg_text = TINY_CONFIG.format(root=tmp_path / "data", work_dir=tmp_path / "work")
    cfg_text = cfg_text.replace("type: Shapes, split: train", "type: ShapesVOC, split: train")
    cfg_text = cfg_text.replace("type: Shapes, split: val", "type: ShapesVOC, split: val")
    cfg_text = cfg_text.replace("{type: CocoEvaluator, main_metric: bbox/AP}",
                                "{type: VOCEvaluator, method: 11points, main_metric: voc/mAP}")
    path = tmp_path / "voc.yaml"
    path.write_text(textwrap.dedent(cfg_text))
    cfg = load_config(str(path), ["trainer.max_epochs=2"])
    metrics = train(cfg)
    assert set(metrics) == {"voc/mAP", "voc/AP-circle", "voc/AP-square", "voc/AP-triangle"}
    saved = json.loads((tmp_path / "work" / "metrics.json").read_text())
    assert saved["voc/mAP"] == metrics["voc/mAP"]
    assert (tmp_path / "work" / "checkpoints" / "best.ckpt").is_file()
    # The numbers of the evaluation during training are those of the saved model evaluated on its own
    # (a tiny model's AP after a few steps is near 0 and varies with library versions; equality does not).
    again = evaluate(cfg, str(tmp_path / "work" / "checkpoints" / "last.ckpt"))
    assert again == pytest.approx(metrics, abs=1e-12)


def test_xml_without_size_takes_it_from_the_image(voc07: Path):
    xml = voc07 / "Annotations" / "000007.xml"
    xml.write_text(xml.read_text().replace("<size><width>40</width><height>30</height><depth>3</depth></size>", ""))
    assert parse_voc_xml(str(xml))["width"] is None
    ds = VOCDetection(root=str(voc07))
    image, target = ds[1]
    assert image.shape == (3, 30, 40) and target["orig_size"].tolist() == [30, 40]
