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
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from segkit.config_types import is_finite_number, is_integer
from segkit.errors import UserError
from segkit.textio import load_json, read_names, read_text

__all__ = ["score_coco", "score_voc", "score_semseg", "read_coco_results", "read_voc_det_files",
           "guess_voc_method", "mask_results", "check_label_pair", "accumulate_pairs", "check_scored_ground_truth",
           "label_files"]

_LABEL_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")


class ScoreError(UserError):
    """A ground-truth or prediction file that cannot be scored."""


# ---------------------------------------------------------------------- COCO
def read_coco_results(path: str, *, iou_type: str, image_ids: Sequence[Any] | None = None,
                      category_ids: Sequence[int] | None = None,
                      image_sizes: Mapping[Any, tuple[int, int]] | None = None) -> list[dict[str, Any]]:
    """Read and check a COCO results JSON: a list of ``{image_id, category_id, score, bbox | segmentation}``.

    ``image_id`` and ``category_id`` are integers (an integral float such as ``1.0`` is read as
    ``1``; a string ``image_id`` only where ``image_ids`` holds strings, as VOC names); ``score`` a
    finite number; ``bbox`` is ``[x, y, w, h]`` of finite numbers with ``w, h >= 0``;
    ``segmentation`` a compressed or uncompressed RLE ``{"size": [h, w], "counts": ...}``, whose
    run lengths must cover the mask exactly (an uncompressed one is compressed here, as
    pycocotools scores compressed RLE only). When ``image_ids`` / ``category_ids`` are given,
    every record must use one of them; with ``image_sizes`` (``{image id: (height, width)}``) a
    mask must have its image's size.

    Raises:
        ScoreError: naming the file and the index of the first bad record.
    """
    if not os.path.isfile(path):
        raise ScoreError(f"results file '{path}' does not exist.")
    records = load_json(path, error=ScoreError, what="results file")
    if not isinstance(records, list):
        raise ScoreError(f"results file '{path}' must hold a JSON list of detections "
                         f"({{image_id, category_id, score, {'bbox' if iou_type == 'bbox' else 'segmentation'}}}), "
                         f"got a {type(records).__name__}.")
    key = "bbox" if iou_type == "bbox" else "segmentation"
    images = None if image_ids is None else set(image_ids)
    cats = None if category_ids is None else set(category_ids)
    names_allowed = images is not None and any(isinstance(i, str) for i in images)
    for index, record in enumerate(records):
        where = f"results file '{path}', record {index}"
        if not isinstance(record, dict):
            raise ScoreError(f"{where} is a {type(record).__name__}, not an object.")
        missing = [k for k in ("image_id", "category_id", "score", key) if k not in record]
        if missing:
            raise ScoreError(f"{where} has no {', '.join(repr(k) for k in missing)} (keys: {sorted(record)}); a "
                             f"{iou_type} result needs image_id, category_id, score and {key}.")
        record["image_id"] = _record_id(record["image_id"], "image_id", where, names_allowed=names_allowed)
        record["category_id"] = _record_id(record["category_id"], "category_id", where, names_allowed=False)
        if not is_finite_number(record["score"]):
            raise ScoreError(f"{where}: score {_short(record['score'])} is not a finite number.")
        if images is not None and record["image_id"] not in images:
            raise ScoreError(f"{where}: image_id {record['image_id']!r} is not an image of the ground truth.")
        if cats is not None and record["category_id"] not in cats:
            raise ScoreError(f"{where}: category_id {record['category_id']!r} is not a category of the ground "
                             f"truth ({sorted(cats)[:20]}).")
        if key == "bbox":
            _check_result_box(record["bbox"], where)
        else:
            _check_result_mask(record, where, image_sizes)
            if "bbox" in record:  # checked, though mask scoring does not read it (see score_coco)
                _check_result_box(record["bbox"], where)
    if key == "segmentation":
        _check_compressed_masks(records, path)
    return records


def _check_result_box(box: Any, where: str) -> None:
    if not (isinstance(box, list) and len(box) == 4 and all(map(is_finite_number, box)) and box[2] >= 0
            and box[3] >= 0):
        raise ScoreError(f"{where}: bbox {_short(box)} is not [x, y, width, height] with finite numbers and "
                         f"non-negative width and height.")


def check_scored_ground_truth(coco: Any, iou_type: str, gt_file: str) -> None:
    """Every ground-truth annotation has what pycocotools reads to score it (else a KeyError deep inside it)."""
    needed = ("area", "iscrowd", "bbox") if iou_type == "bbox" else ("area", "iscrowd")
    for ann in coco.dataset["annotations"]:
        missing = [k for k in needed if ann.get(k) is None]
        if missing:
            raise ScoreError(f"annotation id {ann['id']} in '{gt_file}' has no {' or '.join(missing)}; COCO scoring "
                             f"reads each ground-truth object's {', '.join(needed)} (area: its size in pixels, for "
                             f"the small / medium / large numbers; iscrowd: 0 or 1). Add them to the file.")


def _record_id(value: Any, key: str, where: str, *, names_allowed: bool) -> Any:
    """A record's ``image_id`` / ``category_id`` as an int (or a name, where names are ids)."""
    if type(value) is int:  # the usual case, decided without an ABC check (files hold millions of records)
        return value
    if is_integer(value):
        return int(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)  # tools that write every number as a float: 3.0 is id 3
    if isinstance(value, str) and names_allowed:
        return value
    kind = "an integer" + (" or an image name" if names_allowed else "")
    raise ScoreError(f"{where}: {key} {_short(value)} is not {kind}; ids are the integers of the ground truth.")


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a record may hold a huge list)."""
    text = repr(value) if not isinstance(value, (list, dict)) or len(value) < 100 else \
        f"<a {type(value).__name__} of {len(value)} items>"
    return text if len(text) <= limit else text[:limit] + "..."


def _check_result_mask(record: dict[str, Any], where: str, image_sizes: Mapping[Any, tuple[int, int]] | None) -> None:
    """Check a result's RLE (compressed counts are checked for all records at once, afterwards);
    an uncompressed RLE is replaced by its compressed form."""
    from pycocotools import mask as mask_utils

    from segkit.data.coco_masks import rle_problem
    from segkit.data.images import MAX_IMAGE_PIXELS_ENV, max_image_pixels

    rle = record["segmentation"]
    if not (isinstance(rle, dict) and isinstance(rle.get("size"), list) and len(rle["size"]) == 2
            and all(is_integer(v) and v > 0 for v in rle["size"]) and isinstance(rle.get("counts"), (str, list))):
        raise ScoreError(f"{where}: segmentation must be an RLE {{'size': [height, width], 'counts': ...}} "
                         f"(polygons are not a result format); got {_short(rle)}.")
    height, width = (int(v) for v in rle["size"])
    limit = max_image_pixels()
    if limit is not None and height * width > limit:  # pycocotools counts runs in 32 bits
        raise ScoreError(f"{where}: the mask is {height}x{width} (HxW) = {height * width:,} pixels, more than segkit "
                         f"reads ({limit:,}; see {MAX_IMAGE_PIXELS_ENV}).")
    if image_sizes is not None:
        size = image_sizes.get(record["image_id"])
        if size is not None and (height, width) != tuple(size):
            raise ScoreError(f"{where}: the mask is {[height, width]} (HxW) but image {record['image_id']} is "
                             f"{list(size)}; encode masks at the size of their image.")
    if isinstance(rle["counts"], list):
        problem = rle_problem(rle, height, width)
        if problem is not None:
            raise ScoreError(f"{where} {problem}.")
        compressed = mask_utils.frPyObjects(rle, height, width)
        record["segmentation"] = {"size": [height, width], "counts": compressed["counts"].decode("ascii")}


def _check_compressed_masks(records: Sequence[Mapping[str, Any]], path: str) -> None:
    """Refuse the first compressed RLE whose counts are garbage, empty, or do not cover the mask."""
    from segkit.data.coco_masks import compressed_counts_problems

    counts = [r["segmentation"]["counts"] for r in records]
    pixels = [r["segmentation"]["size"][0] * r["segmentation"]["size"][1] for r in records]
    problems = compressed_counts_problems(counts, pixels)
    if problems:
        index = min(problems)
        more = f" ({len(problems) - 1} more record(s) have a bad mask.)" if len(problems) > 1 else ""
        raise ScoreError(f"results file '{path}', record {index} has an RLE 'segmentation' whose 'counts' "
                         f"{problems[index]}.{more} Encode masks with pycocotools.mask.encode (counts decoded "
                         f"to a string), or give run lengths as a list.")


def score_coco(gt_file: str, results_file: str, *, iou_type: str = "bbox", per_class: bool = False,
               backend: str = "pycocotools") -> dict[str, float]:
    """COCO ``bbox`` or ``segm`` metrics of a results file against a ground-truth file.

    All images of the ground truth are scored (pycocotools' default), so an image without results
    counts its objects as missed. The numbers are pycocotools' own; ``backend="faster_coco_eval"``
    gives the same up to the order of floating-point sums (about 1e-15), several times faster.

    For ``segm`` a record's ``bbox`` is dropped before scoring, as Detectron2 and MMDetection do: given
    a box, pycocotools takes a result's area (which decides its small / medium / large range) from
    the box instead of the mask, and the mask numbers would differ from those of the same masks
    scored without boxes (which is how training and ``segkit eval`` score them).

    Raises:
        ScoreError / DatasetError: a missing or malformed file (named with the bad record).
    """
    from segkit.data.coco import read_coco, check_ground_truth_masks
    from segkit.evaluation.coco import evaluate_coco_results

    if iou_type not in ("bbox", "segm"):
        raise ScoreError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}.")
    coco = read_coco(gt_file)
    check_scored_ground_truth(coco, iou_type, gt_file)
    sizes = None
    if iou_type == "segm":  # the ground truth's masks are rasterised: check them as training data is checked
        check_ground_truth_masks(coco, gt_file)
        sizes = {image_id: (info["height"], info["width"]) for image_id, info in coco.imgs.items()}
    results = read_coco_results(results_file, iou_type=iou_type, image_ids=list(coco.imgs),
                                category_ids=list(coco.cats), image_sizes=sizes)
    names = {int(c): str(coco.cats[c].get("name", c)) for c in sorted(coco.cats)} if per_class else None
    return evaluate_coco_results(coco, mask_results(results, iou_type), iou_type=iou_type, class_names=names,
                                 backend=backend)


def mask_results(results: list[dict[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """``results`` without their ``bbox`` for ``segm`` scoring (see :func:`score_coco`), unchanged otherwise."""
    if iou_type != "segm":
        return results
    return [{k: v for k, v in r.items() if k != "bbox"} for r in results]


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
        text = read_text(files[0], error=ScoreError, what="detection file")
        for number, line in enumerate(text.split("\n"), start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"'{files[0]}', line {number}"
            if len(fields) != 6:
                raise ScoreError(f"{where} has {len(fields)} fields; a detection line is "
                                 f"'<image> <score> <xmin> <ymin> <xmax> <ymax>'.")
            if fields[0] not in known:
                raise ScoreError(f"{where}: image {fields[0][:80]!r} is not in the '{split}' split of the ground "
                                 f"truth.")
            try:
                score, xmin, ymin, xmax, ymax = (float(v) for v in fields[1:])
            except ValueError:
                raise ScoreError(f"{where}: {' '.join(fields[1:])[:120]!r} are not five numbers.") from None
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
    from segkit.evaluation.voc import coco_ground_truth, evaluate_voc

    classes = tuple(classes or VOC_DETECTION_CLASSES)
    method = method or guess_voc_method(gt_root)
    data = voc_to_coco(gt_root, split, classes, use_difficult=True)
    from segkit.data.coco import read_coco_dict

    coco = read_coco_dict(data, os.path.join(gt_root, "Annotations"))
    ground_truth = coco_ground_truth(coco, {k: k for k in range(1, len(classes) + 1)})
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
def label_files(folder: str, what: str) -> dict[str, str]:
    """``{file stem: path}`` of the label maps in ``folder`` (ScoreError: none, two with one stem, no folder)."""
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
    from tqdm import tqdm

    from segkit.data.semseg import read_label_map
    from segkit.evaluation.semseg import segmentation_metrics

    _check_score_classes(num_classes, class_names)
    gt_files, pred_files = label_files(gt_dir, "ground-truth"), label_files(pred_dir, "prediction")
    absent = sorted(set(gt_files) - set(pred_files))
    extra = sorted(set(pred_files) - set(gt_files))
    if absent or extra:
        parts = []
        if absent:
            parts.append(f"{len(absent)} ground-truth label map(s) have no prediction ({', '.join(absent[:5])})")
        if extra:
            parts.append(f"{len(extra)} prediction(s) have no ground truth ({', '.join(extra[:5])})")
        raise ScoreError(f"'{pred_dir}' does not match '{gt_dir}': {'; '.join(parts)}. Files are matched by stem.")
    total = np.zeros(num_classes * num_classes, dtype=np.int64)
    show = len(gt_files) >= 200 if progress is None else progress
    for stem in tqdm(sorted(gt_files), desc="scoring label maps", unit="img", disable=not show):
        gt = read_label_map(gt_files[stem]).astype(np.int64)
        pred = read_label_map(pred_files[stem]).astype(np.int64)
        if reduce_zero_label and gt.shape == pred.shape:
            gt = np.where(gt == 0, ignore_index, gt - 1)
            gt[gt == ignore_index - 1] = ignore_index
        check_label_pair(gt, pred, gt_file=gt_files[stem], pred_file=pred_files[stem], num_classes=num_classes,
                         ignore_index=ignore_index)
        accumulate_pairs(total, gt, pred, num_classes, ignore_index)
    return segmentation_metrics(total.reshape(num_classes, num_classes), class_names)


def check_label_pair(gt: np.ndarray, pred: np.ndarray, *, gt_file: str, pred_file: str, num_classes: int,
                     ignore_index: int) -> None:
    """Refuse a prediction of another size than its ground truth, or values outside the classes.

    Args:
        gt, pred: class indices (``gt`` may hold ``ignore_index``), the files they came from for the message.

    Raises:
        ScoreError: naming the file.
    """
    if gt.shape != pred.shape:
        raise ScoreError(f"prediction '{pred_file}' is {pred.shape[0]}x{pred.shape[1]} (HxW) but its "
                         f"ground truth '{gt_file}' is {gt.shape[0]}x{gt.shape[1]}.")
    bad_gt = (gt != ignore_index) & ((gt < 0) | (gt >= num_classes))
    if bad_gt.any():
        raise ScoreError(f"ground truth '{gt_file}' holds values {sorted(set(np.unique(gt[bad_gt]).tolist()))[:10]}"
                         f" that are neither classes 0..{num_classes - 1} nor the ignore value {ignore_index}; "
                         f"check --num-classes, --ignore-index and --reduce-zero-label.")
    bad_pred = (gt != ignore_index) & ((pred < 0) | (pred >= num_classes))
    if bad_pred.any():
        raise ScoreError(f"prediction '{pred_file}' holds values {sorted(set(np.unique(pred[bad_pred]).tolist()))[:10]}"
                         f" outside the classes 0..{num_classes - 1}; check --num-classes.")


#: Most classes ``segkit score --task semseg`` scores. Its confusion matrix has K x K int64 cells
#: (4096 classes: 128 MiB, 16,384: 2 GiB), allocated before any file is read, so a typo such as
#: ``--num-classes 200000`` (320 GB) is refused instead of exhausting memory. Label maps are 8-bit
#: (up to 256 classes) or 16-bit, and the largest common benchmark (ADE20K-full) has 3,688 classes.
MAX_SCORE_CLASSES = 4096


def _check_score_classes(num_classes: Any, class_names: Sequence[str] | None) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ScoreError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if num_classes > MAX_SCORE_CLASSES:
        raise ScoreError(f"--num-classes {num_classes} is more than segkit scores ({MAX_SCORE_CLASSES}): the "
                         f"confusion matrix has num_classes^2 cells ({num_classes ** 2 * 8 / 2 ** 30:,.1f} GiB here). "
                         f"Check the number; it counts the classes of the label maps, background included when "
                         f"it is a class.")
    if class_names is not None:
        if len(class_names) != num_classes:
            raise ScoreError(f"--classes names {len(class_names)} classes but --num-classes is {num_classes}; give "
                             f"one name per class.")
        repeated = sorted({n for i, n in enumerate(class_names) if n in class_names[:i]})
        if repeated:
            raise ScoreError(f"--classes names {', '.join(map(repr, repeated[:5]))} more than once; each class needs "
                             f"its own name.")


def accumulate_pairs(total: np.ndarray, gt: np.ndarray, pred: np.ndarray, num_classes: int,
                      ignore_index: int) -> None:
    """Add the (ground truth, prediction) pairs of the scored pixels to the flat K*K counts ``total``.

    With many classes the pairs present are counted (``np.unique``) rather than binned into a
    fresh K*K array per image.
    """
    scored = gt != ignore_index
    pairs = (gt[scored] * num_classes + pred[scored]).ravel()
    if num_classes * num_classes <= 4 * pairs.size:
        total += np.bincount(pairs, minlength=num_classes * num_classes)
    else:
        values, counts = np.unique(pairs, return_counts=True)
        total[values] += counts



def read_class_names(spec: str | None) -> list[str] | None:
    """Class names from a file (one per line) or a comma-separated list; ``None`` stays ``None``."""
    if spec is None:
        return None
    if os.path.isfile(spec):
        names = read_names(spec, error=ScoreError, what="class file")
    else:
        names = [name.strip() for name in re.split(r",", spec) if name.strip()]
    if not names:
        raise ScoreError(f"--classes {spec!r} names no class; give a file with one name per line or 'a,b,c'.")
    return names
