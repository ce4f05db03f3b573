"""Pascal VOC detection AP: the VOC2007 11-point and the VOC2010+ all-point (area) definitions.

Detections of one class are ranked by score over the whole test set (equal scores keep the order
in which they were given, as the MATLAB devkit's stable sort does). Each detection is compared
with the ground-truth boxes of its class in its image, ``difficult`` ones included, and takes the
one it overlaps most:

* IoU above the threshold (strictly, as in the devkit) with a ``difficult`` box: ignored, neither a
  true nor a false positive;
* above the threshold with a box not yet taken: a true positive, and the box is taken;
* above the threshold with a box already taken (a duplicate), or not above it: a false positive.

Recall counts the boxes that are not ``difficult``. AP is then the area under the precision
envelope (``"area"``, VOC2010 and later) or the mean over recall 0, 0.1, ..., 1 of the best
precision at that recall or above (``"11points"``, VOC2007 test). A class without any
non-difficult box has no AP: it is reported as ``-1`` and left out of the mean, as COCO reports
categories without ground truth.

Pixel convention: segkit's boxes are continuous coordinates, and VOC's 1-based inclusive pixel
indices ``xmin..xmax`` become ``[xmin - 1, xmax]`` when a VOC file is read, so the default IoU
(``plus_one=False``, width ``x2 - x1``) equals the devkit's on VOC data. ``plus_one=True`` uses
the devkit's own formula (width ``x2 - x1 + 1``) on the boxes as given, for boxes kept in VOC's
integer pixel indices, as older frameworks do.

Metric names: ``voc/mAP`` (mean over classes, and over IoU thresholds when several are given),
``voc/mAP<t>`` per threshold when several are given (``voc/mAP75`` for 0.75), and
``voc/AP-<class>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from segkit.errors import ConfigError
from segkit.evaluation.coco import CocoEvaluator
from segkit.registry import EVALUATORS

__all__ = ["VOCEvaluator", "VOC_AP_METHODS", "voc_ap", "evaluate_voc", "ClassResult"]

#: ``method`` values of :func:`voc_ap`.
VOC_AP_METHODS = ("area", "11points")


def voc_ap(recall: np.ndarray, precision: np.ndarray, *, method: str = "area") -> float:
    """AP from a precision/recall curve (detections in ranked order).

    Args:
        recall, precision: cumulative recall and precision after each ranked detection.
        method: ``"area"`` (VOC2010+: area under the precision envelope, which makes precision
            non-increasing in recall) or ``"11points"`` (VOC2007: mean of the best precision at
            recall >= t for t = 0, 0.1, ..., 1, 0 where recall never reaches t).

    Example:
        >>> voc_ap(np.array([0.5, 1.0]), np.array([1.0, 0.5]))
        0.75
    """
    recall = np.asarray(recall, dtype=np.float64).reshape(-1)
    precision = np.asarray(precision, dtype=np.float64).reshape(-1)
    if method == "11points":
        total = 0.0
        for k in range(11):
            # k * 0.1 as the devkits compute it (0:0.1:1 in MATLAB, np.arange in Python), so 0.3 is
            # 0.30000000000000004 there too and a recall of exactly 0.3 does not reach it.
            reached = precision[recall >= k * 0.1]
            total += float(reached.max()) if reached.size else 0.0
        return total / 11.0
    if method != "area":
        raise ValueError(f"method must be one of {VOC_AP_METHODS}, got {method!r}")
    rec = np.concatenate(([0.0], recall, [1.0]))
    prec = np.concatenate(([0.0], precision, [0.0]))
    envelope = np.maximum.accumulate(prec[::-1])[::-1]
    steps = np.flatnonzero(rec[1:] != rec[:-1])
    return float(np.sum((rec[steps + 1] - rec[steps]) * envelope[steps + 1]))


@dataclass
class ClassResult:
    """The ranked outcome of one class's detections at one IoU threshold."""

    num_gt: int                 #: boxes that are not difficult
    tp: np.ndarray              #: bool [D], ranked detections that are true positives
    fp: np.ndarray              #: bool [D], false positives (ignored detections are neither)
    scores: np.ndarray          #: float [D], the ranked scores

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative ``(recall, precision)`` after each ranked detection that counts."""
        counted = self.tp | self.fp
        tp = np.cumsum(self.tp[counted])
        fp = np.cumsum(self.fp[counted])
        recall = tp / max(self.num_gt, 1)
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        return recall, precision

    def ap(self, method: str = "area") -> float:
        """AP under ``method``; ``-1`` if the class has no box that is not difficult."""
        if self.num_gt == 0:
            return -1.0
        return voc_ap(*self.curve(), method=method)


def _iou(box: np.ndarray, boxes: np.ndarray, plus_one: bool) -> np.ndarray:
    extra = 1.0 if plus_one else 0.0
    iw = np.maximum(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]) + extra, 0.0)
    ih = np.maximum(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]) + extra, 0.0)
    inter = iw * ih
    area = (box[2] - box[0] + extra) * (box[3] - box[1] + extra)
    areas = (boxes[:, 2] - boxes[:, 0] + extra) * (boxes[:, 3] - boxes[:, 1] + extra)
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_class(
    detections: Sequence[tuple[Any, float, Sequence[float]]],
    ground_truth: Mapping[Any, tuple[np.ndarray, np.ndarray]],
    *,
    iou_thr: float = 0.5,
    plus_one: bool = False,
) -> ClassResult:
    """Rank one class's detections and mark true and false positives (see the module docstring).

    Args:
        detections: ``(image key, score, [x1, y1, x2, y2])`` for every detection of the class.
        ground_truth: ``{image key: (boxes float [N, 4] xyxy, difficult bool [N])}`` of the class
            for every evaluated image (an image without boxes of the class may be left out).
        iou_thr: a detection matches a box whose IoU with it is above this.
        plus_one: the devkit's ``+1`` in widths and heights (see the module docstring).
    """
    scores = np.array([float(d[1]) for d in detections], dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    taken = {key: np.zeros(len(boxes), dtype=bool) for key, (boxes, _) in ground_truth.items()}
    tp = np.zeros(len(order), dtype=bool)
    fp = np.zeros(len(order), dtype=bool)
    for rank, index in enumerate(order):
        key, _, box = detections[index]
        gt = ground_truth.get(key)
        if gt is None or len(gt[0]) == 0:
            fp[rank] = True
            continue
        boxes, difficult = gt
        overlaps = _iou(np.asarray(box, dtype=np.float64), boxes, plus_one)
        best = int(np.argmax(overlaps))
        if overlaps[best] > iou_thr:
            if difficult[best]:
                continue
            if not taken[key][best]:
                tp[rank] = True
                taken[key][best] = True
            else:
                fp[rank] = True
        else:
            fp[rank] = True
    num_gt = int(sum(int((~np.asarray(d, dtype=bool)).sum()) for _, d in ground_truth.values()))
    return ClassResult(num_gt=num_gt, tp=tp, fp=fp, scores=scores[order])


def evaluate_voc(
    ground_truth: Mapping[Any, Mapping[str, Any]],
    detections: Mapping[Any, Mapping[str, Any]],
    class_names: Sequence[str],
    *,
    iou_thrs: Sequence[float] = (0.5,),
    method: str = "area",
    plus_one: bool = False,
) -> dict[str, float]:
    """VOC AP per class and its mean, under the names of the module docstring.

    Args:
        ground_truth: ``{image key: {"boxes": [N, 4] xyxy, "labels": [N] in 1..K, "difficult": [N]}}``
            for every image of the test set (``difficult`` may be left out: none is).
        detections: ``{image key: {"boxes": [D, 4], "scores": [D], "labels": [D]}}``; an image left
            out has no detection.
        class_names: ``class_names[label - 1]`` names label ``label``.
        iou_thrs: IoU thresholds; the mean is also taken over them.
        method: ``"area"`` or ``"11points"`` (see :func:`voc_ap`).
        plus_one: the devkit's ``+1`` pixel convention (see the module docstring).

    Raises:
        ValueError: a detection on an image that is not in ``ground_truth``, a label outside
            ``1..K``, or an unknown ``method``.

    Example:
        >>> gt = {"img1": {"boxes": [[0, 0, 10, 10]], "labels": [1]}}
        >>> dets = {"img1": {"boxes": [[0, 0, 10, 10]], "scores": [0.9], "labels": [1]}}
        >>> evaluate_voc(gt, dets, ["cat"])["voc/mAP"]
        1.0
    """
    if method not in VOC_AP_METHODS:
        raise ValueError(f"method must be one of {VOC_AP_METHODS}, got {method!r}")
    num_classes = len(class_names)
    per_class_gt: list[dict[Any, tuple[np.ndarray, np.ndarray]]] = [{} for _ in range(num_classes)]
    for key, gt in ground_truth.items():
        boxes = np.asarray(gt.get("boxes", []), dtype=np.float64).reshape(-1, 4)
        labels = _labels(gt.get("labels", []), num_classes, key, "ground truth")
        difficult = np.asarray(gt.get("difficult", np.zeros(len(labels))), dtype=bool).reshape(-1)
        if not len(boxes) == len(labels) == len(difficult):
            raise ValueError(f"the ground truth of image {key!r} has {len(boxes)} boxes, {len(labels)} labels and "
                             f"{len(difficult)} difficult flags; each box needs one of each.")
        for label in np.unique(labels):
            keep = labels == label
            per_class_gt[label - 1][key] = (boxes[keep], difficult[keep])
    per_class_dets: list[list[tuple[Any, float, np.ndarray]]] = [[] for _ in range(num_classes)]
    for key, det in detections.items():
        if key not in ground_truth:
            raise ValueError(f"there are detections for image {key!r}, which is not in the ground truth; "
                             f"score predictions against the same image set.")
        boxes = np.asarray(det.get("boxes", []), dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(det.get("scores", []), dtype=np.float64).reshape(-1)
        labels = _labels(det.get("labels", []), num_classes, key, "detections")
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"the detections of image {key!r} have {len(boxes)} boxes, {len(scores)} scores and "
                             f"{len(labels)} labels; a detection needs one of each.")
        for box, score, label in zip(boxes, scores, labels):
            per_class_dets[label - 1].append((key, float(score), box))
    metrics: dict[str, float] = {}
    aps = np.full((len(iou_thrs), num_classes), -1.0)
    for t, thr in enumerate(iou_thrs):
        for c in range(num_classes):
            aps[t, c] = match_class(per_class_dets[c], per_class_gt[c], iou_thr=float(thr),
                                    plus_one=plus_one).ap(method)
    valid = aps[0] >= 0  # the same classes have ground truth at every threshold
    metrics["voc/mAP"] = float(aps[:, valid].mean()) if valid.any() else -1.0
    if len(iou_thrs) > 1:
        for t, thr in enumerate(iou_thrs):
            metrics[f"voc/mAP{round(float(thr) * 100)}"] = float(aps[t, valid].mean()) if valid.any() else -1.0
    for c, name in enumerate(class_names):
        metrics[f"voc/AP-{name}"] = float(aps[:, c].mean()) if valid[c] else -1.0
    return metrics


def _labels(values: Any, num_classes: int, key: Any, what: str) -> np.ndarray:
    labels = np.asarray(values, dtype=np.int64).reshape(-1)
    if labels.size and (labels.min() < 1 or labels.max() > num_classes):
        bad = int(labels[(labels < 1) | (labels > num_classes)][0])
        raise ValueError(f"the {what} of image {key!r} have label {bad}, but labels must be 1..{num_classes}.")
    return labels


@EVALUATORS.register()
class VOCEvaluator(CocoEvaluator):
    """Pascal VOC detection AP (see the module docstring) of a model's detections.

    Args:
        dataset: the evaluation dataset, as for :class:`~segkit.evaluation.CocoEvaluator`; an
            annotation with ``"difficult": 1`` (as :class:`~segkit.data.VOCDetection` and
            ``segkit convert voc2coco`` write) is difficult, and so is a crowd annotation of a
            COCO file.
        iou_thrs: IoU thresholds (default: VOC's 0.5).
        method: ``"area"`` (VOC2010+, default) or ``"11points"`` (VOC2007 test).
        plus_one: the devkit's ``+1`` pixel convention on segkit's boxes (off: see the module docstring).

    Example:
        evaluation: {type: VOCEvaluator, method: 11points, main_metric: voc/mAP}
    """

    def __init__(self, *, dataset: Any, iou_thrs: Sequence[float] | float = (0.5,),
                 method: Literal["area", "11points"] = "area", plus_one: bool = False) -> None:
        if method not in VOC_AP_METHODS:
            raise ConfigError(f"method must be 'area' (VOC2010+) or '11points' (VOC2007), got {method!r}",
                              key="method")
        thrs = [float(t) for t in (iou_thrs if isinstance(iou_thrs, Sequence) else [iou_thrs])]
        if not thrs or not all(0.0 <= t < 1.0 for t in thrs):
            raise ConfigError(f"iou_thrs must be a non-empty list of IoUs in [0, 1), got {iou_thrs!r}", key="iou_thrs")
        super().__init__(dataset=dataset, iou_types=("bbox",))
        self.iou_thrs = thrs
        self.method = method
        self.plus_one = bool(plus_one)
        self._ground_truth = coco_ground_truth(self.coco, self.label_to_cat_id)

    @classmethod
    def metric_names(cls, *, iou_thrs: Sequence[float] | float = (0.5,), **options: Any) -> list[str]:
        """The names :meth:`evaluate` reports with these options (``*`` stands for a class name)."""
        thrs = list(iou_thrs) if isinstance(iou_thrs, Sequence) else [iou_thrs]
        per_threshold = [f"voc/mAP{round(float(t) * 100)}" for t in thrs] if len(thrs) > 1 else []
        return ["voc/mAP", *per_threshold, "voc/AP-*"]

    def score(self) -> dict[str, float]:
        """The metrics of the processed images, ``{"voc/mAP": ..., "voc/AP-<class>": ...}``."""
        cat_to_label = {cat: label for label, cat in self.label_to_cat_id.items()}
        detections = {}
        for image_id, entry in self._images.items():
            boxes = np.asarray(entry["boxes"], dtype=np.float64).reshape(-1, 4).copy()
            boxes[:, 2:] += boxes[:, :2]
            labels = np.array([cat_to_label[int(c)] for c in entry["category_ids"]], dtype=np.int64)
            detections[image_id] = {"boxes": boxes, "scores": entry["scores"], "labels": labels}
        ground_truth = {i: self._ground_truth.get(i, _EMPTY_GT) for i in self._images}
        return evaluate_voc(ground_truth, detections, self.classes, iou_thrs=self.iou_thrs, method=self.method,
                            plus_one=self.plus_one)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(iou_thrs={self.iou_thrs}, method={self.method!r}, "
                f"plus_one={self.plus_one}, classes={len(self.classes)}, processed_images={len(self._images)})")


_EMPTY_GT: dict[str, Any] = {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64), "difficult": np.zeros(0, bool)}


def coco_ground_truth(coco: Any, label_to_cat_id: Mapping[int, int]) -> dict[int, dict[str, np.ndarray]]:
    """``{image id: {"boxes", "labels", "difficult"}}`` from a COCO object (difficult = flagged or crowd)."""
    cat_to_label = {int(cat): int(label) for label, cat in label_to_cat_id.items()}
    out: dict[int, dict[str, list[Any]]] = {int(i): {"boxes": [], "labels": [], "difficult": []} for i in coco.imgs}
    for ann in coco.dataset.get("annotations", []):
        label = cat_to_label.get(int(ann["category_id"]))
        if label is None:
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        entry = out[int(ann["image_id"])]
        entry["boxes"].append([x, y, x + w, y + h])
        entry["labels"].append(label)
        entry["difficult"].append(bool(ann.get("difficult", 0)) or bool(ann.get("iscrowd", 0)))
    return {
        i: {"boxes": np.asarray(v["boxes"], dtype=np.float64).reshape(-1, 4),
            "labels": np.asarray(v["labels"], dtype=np.int64), "difficult": np.asarray(v["difficult"], dtype=bool)}
        for i, v in out.items()
    }
