"""Scoring predictions that already exist, without a model (``segkit score``).

* :func:`score_coco`: a COCO ground-truth JSON and a COCO results JSON (``bbox`` or ``segm``): the
  12 numbers of ``COCOeval`` over every image of the ground truth, as pycocotools computes them.
* :func:`score_voc`: a VOC year folder and the split's detections, as the official per-class text
  files (``comp4_det_test_<class>.txt``: ``<image> <score> <xmin> <ymin> <xmax> <ymax>`` per line,
  VOC's 1-based pixel indices) or as a COCO results JSON whose ``image_id`` is the image's VOC
  name or its id in ``segkit convert voc2coco``'s output, and whose ``category_id`` is the class's
  1-based index.
* :func:`score_semseg`: a folder of ground-truth label maps and a folder of predicted label maps,
  matched by file stem.

Every function returns the metrics under the names training and ``segkit eval`` use, and raises
:class:`~segkit.errors.UserError` naming the file and the record for malformed input.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from segkit.config_types import is_finite_number
from segkit.errors import UserError

__all__ = ["score_coco", "score_voc", "score_semseg", "read_coco_results", "read_voc_det_files",
           "guess_voc_method"]

_LABEL_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")


class ScoreError(UserError):
    """A ground-truth or prediction file that cannot be scored."""


# ---------------------------------------------------------------------- COCO
def read_coco_results(path: str, *, iou_type: str, image_ids: Sequence[Any] | None = None,
                      category_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Read and check a COCO results JSON: a list of ``{image_id, category_id, score, bbox | segmentation}``.

    ``bbox`` is ``[x, y, w, h]`` of finite numbers with ``w, h >= 0``; ``segmentation`` a
    compressed or uncompressed RLE ``{"size": [h, w], "counts": ...}``. When ``image_ids`` /
    ``category_ids`` are given, every record must use one of them.

    Raises:
        ScoreError: naming the file and the index of the first bad record.
    """
    if not os.path.isfile(path):
        raise ScoreError(f"results file '{path}' does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ScoreError(f"results file '{path}' is not valid JSON: {exc}.") from None
    if not isinstance(records, list):
        raise ScoreError(f"results file '{path}' must hold a JSON list of detections "
                         f"({{image_id, category_id, score, {'bbox' if iou_type == 'bbox' else 'segmentation'}}}), "
                         f"got a {type(records).__name__}.")
    key = "bbox" if iou_type == "bbox" else "segmentation"
    images = None if image_ids is None else set(image_ids)
    cats = None if category_ids is None else set(category_ids)
    for index, record in enumerate(records):
        where = f"results file '{path}', record {index}"
        if not isinstance(record, dict):
            raise ScoreError(f"{where} is a {type(record).__name__}, not an object.")
        missing = [k for k in ("image_id", "category_id", "score", key) if k not in record]
        if missing:
            raise ScoreError(f"{where} has no {', '.join(repr(k) for k in missing)} (keys: {sorted(record)}); a "
                             f"{iou_type} result needs image_id, category_id, score and {key}.")
        if not is_finite_number(record["score"]):
            raise ScoreError(f"{where}: score {record['score']!r} is not a finite number.")
        if images is not None and record["image_id"] not in images:
            raise ScoreError(f"{where}: image_id {record['image_id']!r} is not an image of the ground truth.")
        if cats is not None and record["category_id"] not in cats:
            raise ScoreError(f"{where}: category_id {record['category_id']!r} is not a category of the ground "
                             f"truth ({sorted(cats)[:20]}).")
        if key == "bbox":
            box = record["bbox"]
            if not (isinstance(box, list) and len(box) == 4 and all(is_finite_number(v) for v in box)
                    and box[2] >= 0 and box[3] >= 0):
                raise ScoreError(f"{where}: bbox {box!r} is not [x, y, width, height] with finite numbers and "
                                 f"non-negative width and height.")
        else:
            rle = record["segmentation"]
            if not (isinstance(rle, dict) and isinstance(rle.get("size"), list) and len(rle["size"]) == 2
                    and isinstance(rle.get("counts"), (str, list))):
                raise ScoreError(f"{where}: segmentation must be an RLE {{'size': [height, width], 'counts': ...}} "
                                 f"(polygons are not a result format); got {str(rle)[:80]}.")
    return records


def score_coco(gt_file: str, results_file: str, *, iou_type: str = "bbox", per_class: bool = False,
               backend: str = "pycocotools") -> dict[str, float]:
    """COCO ``bbox`` or ``segm`` metrics of a results file against a ground-truth file.

    All images of the ground truth are scored (pycocotools' default), so an image without results
    counts its objects as missed. The numbers are pycocotools' own; ``backend="faster_coco_eval"``
    gives the same up to the order of floating-point sums (about 1e-15), several times faster.

    Raises:
        ScoreError / DatasetError: a missing or malformed file (named with the bad record).
    """
    from segkit.data.coco import _read_coco
    from segkit.evaluation.coco import evaluate_coco_results

    if iou_type not in ("bbox", "segm"):
        raise ScoreError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}.")
    coco = _read_coco(gt_file)
    results = read_coco_results(results_file, iou_type=iou_type, image_ids=list(coco.imgs),
                                category_ids=list(coco.cats))
    if iou_type == "segm":
        for index, record in enumerate(results):
            info = coco.imgs[record["image_id"]]
            size = [info.get("height"), info.get("width")]
            if list(record["segmentation"]["size"]) != size:
                raise ScoreError(f"results file '{results_file}', record {index}: the mask is "
                                 f"{record['segmentation']['size']} (HxW) but image {record['image_id']} is {size}.")
    names = {int(c): str(coco.cats[c].get("name", c)) for c in sorted(coco.cats)} if per_class else None
    return evaluate_coco_results(coco, results, iou_type=iou_type, class_names=names, backend=backend)


# ---------------------------------------------------------------------- VOC
def guess_voc_method(gt_root: str) -> str:
    """``"11points"`` for a VOC2007 folder (the VOC2007 test protocol), ``"area"`` otherwise."""
    return "11points" if "2007" in os.path.basename(os.path.normpath(os.path.abspath(gt_root))) else "area"


def read_voc_det_files(folder: str, split: str, classes: Sequence[str], known: Mapping[str, int]
                       ) -> tuple[dict[int, dict[str, list[Any]]], list[str]]:
    """Detections from per-class files ``<folder>/comp*_det_<split>_<class>.txt``.

    Returns:
        ``({image id: {"boxes", "scores", "labels"}}, [classes without a file])``; boxes are
        converted from VOC's 1-based inclusive indices to segkit's continuous coordinates.

    Raises:
        ScoreError: no file for any class, two files for one class, or a malformed line (the
            message names the file and the line).
    """
    if not os.path.isdir(folder):
        raise ScoreError(f"prediction folder '{folder}' does not exist.")
    detections: dict[int, dict[str, list[Any]]] = {}
    missing: list[str] = []
    found_any = False
    for label, name in enumerate(classes, start=1):
        files = sorted(glob.glob(os.path.join(glob.escape(folder), f"comp*_det_{glob.escape(split)}_{glob.escape(name)}.txt")))
        if len(files) > 1:
            raise ScoreError(f"'{folder}' has several detection files for class {name!r} and split {split!r}: "
                             f"{', '.join(os.path.basename(f) for f in files)}; keep one.")
        if not files:
            missing.append(name)
            continue
        found_any = True
        with open(files[0], encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                fields = line.split()
                if not fields:
                    continue
                where = f"'{files[0]}', line {number}"
                if len(fields) != 6:
                    raise ScoreError(f"{where} has {len(fields)} fields; a detection line is "
                                     f"'<image> <score> <xmin> <ymin> <xmax> <ymax>'.")
                if fields[0] not in known:
                    raise ScoreError(f"{where}: image {fields[0]!r} is not in the '{split}' split of the ground truth.")
                try:
                    score, xmin, ymin, xmax, ymax = (float(v) for v in fields[1:])
                except ValueError:
                    raise ScoreError(f"{where}: {' '.join(fields[1:])!r} are not five numbers.") from None
                if not all(math.isfinite(v) for v in (score, xmin, ymin, xmax, ymax)):
                    raise ScoreError(f"{where} holds a value that is not finite.")
                entry = detections.setdefault(known[fields[0]], {"boxes": [], "scores": [], "labels": []})
                entry["boxes"].append([xmin - 1, ymin - 1, xmax, ymax])
                entry["scores"].append(score)
                entry["labels"].append(label)
    if not found_any:
        have = sorted(os.path.basename(f) for f in glob.glob(os.path.join(glob.escape(folder), "*.txt")))[:8]
        raise ScoreError(f"'{folder}' has no detection file comp*_det_{split}_<class>.txt for any class "
                         f"(files there: {', '.join(have) or 'none'}); check --split and the class names.")
    return detections, missing


def score_voc(gt_root: str, pred: str, *, split: str = "test", classes: Sequence[str] | None = None,
              method: str | None = None, iou_thrs: Sequence[float] = (0.5,), plus_one: bool = False,
              use_difficult: bool = False) -> tuple[dict[str, float], list[str]]:
    """VOC AP of detections (per-class files in a folder, or a COCO results JSON) against a VOC split.

    Args:
        gt_root: the VOC year folder (``Annotations/``, ``ImageSets/Main/``, ``JPEGImages/``).
        pred: a folder of per-class detection files, or a COCO results JSON.
        split: the image list of the ground truth.
        classes: class names (default: VOC's 20).
        method: ``"area"`` or ``"11points"``; ``None``: :func:`guess_voc_method`.
        iou_thrs, plus_one: see :func:`~segkit.evaluation.voc.evaluate_voc`.
        use_difficult: count difficult objects as normal ones (the devkit never does).

    Returns:
        the metrics and the classes that had no detection file.
    """
    from segkit.data.voc import VOC_DETECTION_CLASSES, voc_to_coco
    from segkit.evaluation.voc import _coco_ground_truth, evaluate_voc

    classes = tuple(classes or VOC_DETECTION_CLASSES)
    method = method or guess_voc_method(gt_root)
    data = voc_to_coco(gt_root, split, classes, use_difficult=True)
    from segkit.data.coco import _read_coco_dict

    coco = _read_coco_dict(data, os.path.join(gt_root, "Annotations"))
    ground_truth = _coco_ground_truth(coco, {k: k for k in range(1, len(classes) + 1)})
    if use_difficult:
        for entry in ground_truth.values():
            entry["difficult"] = np.zeros_like(entry["difficult"])
    known = {str(img["voc_id"]): int(img["id"]) for img in data["images"]}
    missing: list[str] = []
    if os.path.isdir(pred):
        detections, missing = read_voc_det_files(pred, split, classes, known)
    else:
        records = read_coco_results(pred, iou_type="bbox", image_ids=[*known, *known.values()],
                                    category_ids=list(range(1, len(classes) + 1)))
        detections = {}
        for record in records:
            image = known.get(record["image_id"], record["image_id"]) if isinstance(record["image_id"], str) \
                else int(record["image_id"])
            x, y, w, h = (float(v) for v in record["bbox"])
            entry = detections.setdefault(image, {"boxes": [], "scores": [], "labels": []})
            entry["boxes"].append([x, y, x + w, y + h])
            entry["scores"].append(float(record["score"]))
            entry["labels"].append(int(record["category_id"]))
    metrics = evaluate_voc(ground_truth, detections, classes, iou_thrs=iou_thrs, method=method, plus_one=plus_one)
    return metrics, missing


# ---------------------------------------------------------------------- semantic segmentation
def _label_files(folder: str, what: str) -> dict[str, str]:
    if not os.path.isdir(folder):
        raise ScoreError(f"{what} folder '{folder}' does not exist.")
    files: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, suffix = os.path.splitext(name)
        if suffix.lower() not in _LABEL_SUFFIXES:
            continue
        if stem in files:
            raise ScoreError(f"{what} folder '{folder}' has two label maps named {stem!r} "
                             f"({os.path.basename(files[stem])}, {name}); keep one.")
        files[stem] = os.path.join(folder, name)
    if not files:
        raise ScoreError(f"{what} folder '{folder}' has no label map ({', '.join(_LABEL_SUFFIXES)} files).")
    return files


def score_semseg(gt_dir: str, pred_dir: str, *, num_classes: int, ignore_index: int = 255,
                 reduce_zero_label: bool = False, class_names: Sequence[str] | None = None,
                 progress: bool | None = None) -> dict[str, float]:
    """mIoU and the other metrics of :mod:`segkit.evaluation.semseg` of predicted label maps.

    Every ground-truth label map needs a prediction with the same stem and size (extra predictions
    are an error too, as they usually mean the wrong folder). Predictions hold class indices
    ``0..K-1``; ground truth class indices or ``ignore_index`` (``reduce_zero_label``: raw 0 is
    ignored and raw ``v`` is class ``v - 1``, as for ADE20K).

    Raises:
        ScoreError: missing, extra or mismatched files, or values outside the classes.
    """
    import torch
    from tqdm import tqdm

    from segkit.data.semseg import read_label_map
    from segkit.evaluation.semseg import confusion_matrix, segmentation_metrics

    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ScoreError(f"num_classes must be a positive integer, got {num_classes!r}.")
    gt_files, pred_files = _label_files(gt_dir, "ground-truth"), _label_files(pred_dir, "prediction")
    absent = sorted(set(gt_files) - set(pred_files))
    extra = sorted(set(pred_files) - set(gt_files))
    if absent or extra:
        parts = []
        if absent:
            parts.append(f"{len(absent)} ground-truth label map(s) have no prediction ({', '.join(absent[:5])})")
        if extra:
            parts.append(f"{len(extra)} prediction(s) have no ground truth ({', '.join(extra[:5])})")
        raise ScoreError(f"'{pred_dir}' does not match '{gt_dir}': {'; '.join(parts)}. Files are matched by stem.")
    total = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    show = len(gt_files) >= 200 if progress is None else progress
    for stem in tqdm(sorted(gt_files), desc="scoring label maps", unit="img", disable=not show):
        gt = read_label_map(gt_files[stem]).astype(np.int64)
        pred = read_label_map(pred_files[stem]).astype(np.int64)
        if gt.shape != pred.shape:
            raise ScoreError(f"prediction '{pred_files[stem]}' is {pred.shape[0]}x{pred.shape[1]} (HxW) but its "
                             f"ground truth '{gt_files[stem]}' is {gt.shape[0]}x{gt.shape[1]}.")
        if reduce_zero_label:
            gt = np.where(gt == 0, ignore_index, gt - 1)
            gt[gt == ignore_index - 1] = ignore_index
        bad_gt = (gt != ignore_index) & ((gt < 0) | (gt >= num_classes))
        if bad_gt.any():
            raise ScoreError(f"ground truth '{gt_files[stem]}' holds values {sorted(set(np.unique(gt[bad_gt]).tolist()))[:10]}"
                             f" that are neither classes 0..{num_classes - 1} nor the ignore value {ignore_index}; "
                             f"check --num-classes, --ignore-index and --reduce-zero-label.")
        bad_pred = (gt != ignore_index) & ((pred < 0) | (pred >= num_classes))
        if bad_pred.any():
            raise ScoreError(f"prediction '{pred_files[stem]}' holds values {sorted(set(np.unique(pred[bad_pred]).tolist()))[:10]}"
                             f" outside the classes 0..{num_classes - 1}; check --num-classes.")
        total += confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), num_classes, ignore_index)
    return segmentation_metrics(total, class_names)



def read_class_names(spec: str | None) -> list[str] | None:
    """Class names from a file (one per line) or a comma-separated list; ``None`` stays ``None``."""
    if spec is None:
        return None
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = [name.strip() for name in re.split(r",", spec) if name.strip()]
    if not names:
        raise ScoreError(f"--classes {spec!r} names no class; give a file with one name per line or 'a,b,c'.")
    return names
