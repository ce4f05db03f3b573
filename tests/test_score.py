"""`segkit score`: COCO numbers equal pycocotools', VOC equals the evaluator, semseg equals the training metric."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segkit.cli import main
from segkit.data.shapes import Shapes
from segkit.data.voc import ShapesVOC
from segkit.evaluation.table import COCO_METRIC_NAMES
from segkit.evaluation.voc import VOCEvaluator

FIXTURES = Path(__file__).parent / "fixtures" / "coco_eval"


def pycocotools_numbers(gt_file: Path, results_file: Path, iou_type: str) -> dict[str, float]:
    records = json.loads(results_file.read_text())
    if iou_type == "segm":  # mask results are scored without their boxes (areas from the masks), as Detectron2 does
        records = [{k: v for k, v in r.items() if k != "bbox"} for r in records]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        coco_eval = COCOeval(gt, gt.loadRes(records), iouType=iou_type)
        coco_eval.evaluate(), coco_eval.accumulate(), coco_eval.summarize()
    return {f"{iou_type}/{name}": float(v) for name, v in zip(COCO_METRIC_NAMES, coco_eval.stats)}


def score(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(["score", *args])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_bbox_fixture_equals_pycocotools(tmp_path: Path, capsys, backend: str):
    if backend == "faster_coco_eval":
        pytest.importorskip("faster_coco_eval")
    out = tmp_path / "m.json"
    code, printed, _ = score(["--task", "bbox", "--gt", str(FIXTURES / "instances.json"), "--pred",
                              str(FIXTURES / "detections.json"), "--backend", backend, "--out", str(out)], capsys)
    assert code == 0
    expected = pycocotools_numbers(FIXTURES / "instances.json", FIXTURES / "detections.json", "bbox")
    if backend == "pycocotools":
        assert json.loads(out.read_text()) == expected  # exactly, every one of the 12
    else:  # the same numbers up to the order of floating-point sums
        assert json.loads(out.read_text()) == pytest.approx(expected, abs=1e-12)
    assert "AP50" in printed and "bbox" in printed


@pytest.fixture(scope="module")
def shapes_results(tmp_path_factory) -> tuple[Path, Path]:
    """Shapes ground truth with masks, and mask + box results made from it: shifted, missed, invented."""
    root = tmp_path_factory.mktemp("shapes")
    ds = Shapes(split="val", num_images=15, image_size=64, root=str(root), progress=False)
    rng = np.random.default_rng(0)
    results = []
    for ann in ds.coco.dataset["annotations"]:
        if rng.random() < 0.15:
            continue  # missed
        info = ds.coco.imgs[ann["image_id"]]
        mask = ds.coco.annToMask(ann)
        shift = rng.integers(-3, 4, size=2)
        mask = np.roll(mask, tuple(shift), axis=(0, 1))
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("ascii")
        x, y, w, h = ann["bbox"]
        category = ann["category_id"] if rng.random() > 0.1 else 1 + (ann["category_id"] % 3)
        results.append({"image_id": ann["image_id"], "category_id": category, "score": round(float(rng.random()), 4),
                        "bbox": [x + float(shift[1]), y + float(shift[0]), w, h], "segmentation": rle})
        assert list(rle["size"]) == [info["height"], info["width"]]
    gt_file = Path(ds.ann_file)
    results_file = root / "results.json"
    results_file.write_text(json.dumps(results))
    return gt_file, results_file


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_generated_results_equal_pycocotools(shapes_results, tmp_path: Path, capsys, iou_type):
    gt_file, results_file = shapes_results
    out = tmp_path / "m.json"
    code, _, err = score(["--task", iou_type, "--gt", str(gt_file), "--pred", str(results_file), "--out", str(out),
                          "--per-class"], capsys)
    assert code == 0, err
    metrics = json.loads(out.read_text())
    expected = pycocotools_numbers(gt_file, results_file, iou_type)
    assert {k: metrics[k] for k in expected} == expected
    assert 0.05 < metrics[f"{iou_type}/AP"] < 0.95  # a non-degenerate comparison
    assert {f"{iou_type}/AP-{c}" for c in ("circle", "square", "triangle")} <= set(metrics)


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ('{"image_id": 1}', "must hold a JSON list"),
    ('[{"image_id": 11, "category_id": 3, "score": 0.5}]', "record 0 has no 'bbox'"),
    ('[{"image_id": 11, "category_id": 3, "score": 0.5, "bbox": [1, 2, 3]}]', r"record 0: bbox \[1, 2, 3\]"),
    ('[{"image_id": 999, "category_id": 3, "score": 0.5, "bbox": [1, 2, 3, 4]}]', "image_id 999 is not an image"),
    ('[{"image_id": 11, "category_id": 4, "score": 0.5, "bbox": [1, 2, 3, 4]}]', "category_id 4 is not a category"),
    ('[{"image_id": 11, "category_id": 3, "score": "high", "bbox": [1, 2, 3, 4]}]', "score 'high' is not a finite"),
])
def test_malformed_results_exit_2_naming_the_record(tmp_path: Path, capsys, content: str, message: str):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    code, _, err = score(["--task", "bbox", "--gt", str(FIXTURES / "instances.json"), "--pred", str(bad)], capsys)
    joined = " ".join(err.split())
    assert code == 2
    assert str(bad) in joined and re.search(message, joined), joined
    assert "Traceback" not in err


def test_segm_needs_rle_of_the_image_size(shapes_results, tmp_path: Path, capsys):
    gt_file, results_file = shapes_results
    records = json.loads(results_file.read_text())
    records[3]["segmentation"]["size"] = [10, 10]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    code, _, err = score(["--task", "segm", "--gt", str(gt_file), "--pred", str(bad)], capsys)
    assert code == 2 and "record 3" in err


# ---------------------------------------------------------------------- VOC
@pytest.fixture(scope="module")
def voc_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    ds = ShapesVOC(split="test", num_images=16, image_size=64, root=str(root), difficult_area=150, progress=False)
    rng = np.random.default_rng(1)
    evaluator = VOCEvaluator(dataset=ds, method="11points")
    comp4 = {name: [] for name in ds.classes}
    results = []
    for i in range(len(ds)):
        _, target = ds[i]
        boxes = target["boxes"].numpy() + rng.normal(0, 2.0, size=target["boxes"].shape)
        boxes = np.round(np.concatenate([boxes, [[5, 5, 20, 20]]]), 0)  # one invented box per image
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        labels = np.concatenate([target["labels"].numpy(), [1]])
        scores = np.round(rng.random(len(boxes)), 3)
        evaluator.process([target], [{"boxes": torch.tensor(boxes), "labels": torch.tensor(labels),
                                      "scores": torch.tensor(scores)}])
        voc_id = ds.coco.imgs[target["image_id"]]["voc_id"]
        for box, label, s in zip(boxes, labels, scores):
            x1, y1, x2, y2 = box
            # the devkit's files: 1-based inclusive pixel indices
            comp4[ds.classes[label - 1]].append(f"{voc_id} {s:.3f} {x1 + 1:.0f} {y1 + 1:.0f} {x2:.0f} {y2:.0f}")
            results.append({"image_id": voc_id if len(results) % 2 else target["image_id"], "category_id": int(label),
                            "score": float(s), "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]})
    det_dir = root / "dets"
    det_dir.mkdir()
    for name, lines in comp4.items():
        (det_dir / f"comp4_det_test_{name}.txt").write_text("\n".join(lines) + "\n")
    results_file = root / "results.json"
    results_file.write_text(json.dumps(results))
    return ds, evaluator.evaluate(), det_dir, results_file


def test_voc_detection_files_and_results_json_equal_the_evaluator(voc_case, tmp_path: Path, capsys):
    ds, expected, det_dir, results_file = voc_case
    classes = ",".join(ds.classes)
    assert 0.2 < expected["voc/mAP"] < 1.0
    for pred in (det_dir, results_file):
        out = tmp_path / "m.json"
        code, printed, err = score(["--task", "voc", "--gt", ds.voc_root, "--split", "test", "--pred", str(pred),
                                    "--classes", classes, "--method", "11points", "--out", str(out)], capsys)
        assert code == 0, err
        assert json.loads(out.read_text()) == pytest.approx(expected, abs=1e-12)
        assert "11points" in printed
    # area AP differs from the 11-point one on the same detections
    code, _, _ = score(["--task", "voc", "--gt", ds.voc_root, "--split", "test", "--pred", str(det_dir),
                        "--classes", classes, "--out", str(tmp_path / "a.json")], capsys)
    assert code == 0
    assert json.loads((tmp_path / "a.json").read_text())["voc/mAP"] != pytest.approx(expected["voc/mAP"], abs=1e-6)


def test_voc_scoring_errors(voc_case, tmp_path: Path, capsys):
    ds, _, det_dir, _ = voc_case
    classes = ",".join(ds.classes)
    bad = tmp_path / "dets"
    bad.mkdir()
    (bad / "comp4_det_test_circle.txt").write_text("000001 0.5 1 2 3\n")
    code, _, err = score(["--task", "voc", "--gt", ds.voc_root, "--pred", str(bad), "--classes", classes], capsys)
    assert code == 2 and "line 1 has 5 fields" in " ".join(err.split())
    (bad / "comp4_det_test_circle.txt").write_text("nosuchimage 0.5 1 2 3 4\n")
    code, _, err = score(["--task", "voc", "--gt", ds.voc_root, "--pred", str(bad), "--classes", classes], capsys)
    assert code == 2 and "'nosuchimage' is not in the 'test' split" in " ".join(err.split())
    code, _, err = score(["--task", "voc", "--gt", ds.voc_root, "--pred", str(det_dir), "--classes", classes,
                          "--split", "val"], capsys)
    assert code == 2 and "no split file" in " ".join(err.split())


def test_latin1_detection_file_exits_2_naming_the_line(voc_case, tmp_path: Path, capsys):
    ds, _, det_dir, _ = voc_case
    bad = tmp_path / "dets"
    bad.mkdir()
    first = next(iter(ds.coco.imgs.values()))["voc_id"]
    (bad / "comp4_det_test_circle.txt").write_bytes(f"{first} 0.5 1 2 3 4\n".encode() + b"caf\xe9 0.5 1 2 3 4\n")
    code, _, err = score(["--task", "voc", "--gt", ds.voc_root, "--pred", str(bad), "--classes", ",".join(ds.classes)],
                         capsys)
    joined = " ".join(err.split())
    assert code == 2 and "Traceback" not in err
    assert f"detection file '{bad / 'comp4_det_test_circle.txt'}' is not readable text" in joined
    assert "line 2 after 'caf'" in joined


# ---------------------------------------------------------------------- semantic segmentation
def test_semseg_score_equals_the_training_metric(tmp_path: Path, capsys):
    from segkit.data.semseg_formats import ShapesSegmentation
    from segkit.evaluation.semseg import SemSegEvaluator
    from segkit.predict import save_label_map

    ds = ShapesSegmentation(split="val", num_images=10, image_size=64, root=str(tmp_path / "data"), progress=False)
    evaluator = SemSegEvaluator(dataset=ds)
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(len(ds)):
        _, target = ds[i]
        label = target["sem_seg"].clone()
        label[:5, :5] = 255  # some ignored pixels
        noisy = torch.where(torch.from_numpy(rng.random(tuple(label.shape)) < 0.2),
                            torch.from_numpy(rng.integers(0, 4, size=tuple(label.shape))), target["sem_seg"])
        scores = torch.nn.functional.one_hot(noisy, 4).permute(2, 0, 1).float()
        evaluator.process([{**target, "sem_seg": label}], [{"sem_seg": scores}])
        stem = Path(ds.image_path(i)).stem
        save_label_map(noisy, str(pred_dir / f"{stem}.png"))
        save_label_map(label, str(gt_dir / f"{stem}.png"))
    expected = evaluator.evaluate()
    out = tmp_path / "m.json"
    code, printed, err = score(["--task", "semseg", "--gt", str(gt_dir), "--pred", str(pred_dir), "--num-classes", "4",
                                "--classes", ",".join(ds.classes), "--out", str(out)], capsys)
    assert code == 0, err
    got = json.loads(out.read_text())
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-12, nan_ok=True), key
    assert 0.5 < got["mIoU"] < 0.95 and "mIoU" in printed

    (pred_dir / f"{Path(ds.image_path(0)).stem}.png").unlink()
    code, _, err = score(["--task", "semseg", "--gt", str(gt_dir), "--pred", str(pred_dir), "--num-classes", "4"], capsys)
    assert code == 2 and "1 ground-truth label map(s) have no prediction" in " ".join(err.split())
    code, _, err = score(["--task", "semseg", "--gt", str(gt_dir), "--pred", str(pred_dir)], capsys)
    assert code == 2 and "--num-classes" in err
