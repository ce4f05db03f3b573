"""Per-image scores and pictures of an evaluation: what ``segkit eval --show`` draws.

The per-image score ranks the evaluated images from worst to best:

* detection (COCO boxes or masks): the **F1 score at IoU 0.5** of the detections scoring at least
  :data:`SHOW_SCORE_THRESHOLD` (the ones drawn), ``2 TP / (2 TP + FP + FN)``. Detections are
  matched per category, best score first, each to the unmatched ground-truth object it overlaps
  most (box IoU, or mask IoU when masks are evaluated), as COCO matches them. A detection on a crowd
  region is neither a true nor a false positive, and crowd regions need not be found. An image
  with no object and no detection scores 1.
* semantic segmentation: the image's **mIoU** (the mean IoU of the classes present in its ground
  truth or its prediction, ignored pixels left out); an image without a scored pixel is not ranked.

:func:`show_extremes` writes the ``count`` worst and ``count`` best images, each as the ground
truth (left) beside the prediction (right) on the same image.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHOW_SCORE_THRESHOLD", "detection_f1", "show_extremes", "side_by_side"]

#: Detections scoring below this are neither drawn nor counted in the per-image F1 (as ``segkit predict``).
SHOW_SCORE_THRESHOLD = 0.3
_GAP = 4
_BACKGROUND = (40, 40, 40)


def detection_f1(detections: Sequence[tuple[int, float, Any]], objects: Sequence[tuple[int, Any, bool]], *,
                 iou_threshold: float = 0.5) -> float:
    """F1 at ``iou_threshold`` of one image's detections against its ground truth.

    Args:
        detections: ``(category id, score, geometry)``; geometry a COCO ``[x, y, w, h]`` box or an RLE.
        objects: ``(category id, geometry, iscrowd)`` of the ground truth, geometry of the same kind.
        iou_threshold: the least IoU of a match.

    Returns:
        ``2 TP / (2 TP + FP + FN)`` in ``[0, 1]``; 1 with nothing to find and nothing found.
    """
    from pycocotools import mask as mask_utils

    order = sorted(range(len(detections)), key=lambda i: -detections[i][1])
    crowd = np.array([bool(o[2]) for o in objects], dtype=bool)
    found = int((~crowd).sum())
    if detections and objects:
        ious = np.asarray(mask_utils.iou([detections[i][2] for i in order], [o[1] for o in objects],
                                         crowd.astype(np.uint8).tolist()), dtype=np.float64).reshape(len(order), -1)
        same = np.array([[detections[i][0] == o[0] for o in objects] for i in order], dtype=bool)
        ious = np.where(same, ious, -1.0)
    else:
        ious = np.full((len(order), len(objects)), -1.0)
    taken = np.zeros(len(objects), dtype=bool)
    true_pos = false_pos = 0
    for row in ious:
        free = np.where(~crowd & ~taken & (row >= iou_threshold), row, -1.0)
        if free.size and free.max() >= iou_threshold:
            taken[int(free.argmax())] = True
            true_pos += 1
        elif not (crowd & (row >= iou_threshold)).any():
            false_pos += 1
    missed = found - true_pos
    total = 2 * true_pos + false_pos + missed
    return 1.0 if total == 0 else 2 * true_pos / total


def side_by_side(ground_truth: np.ndarray, prediction: np.ndarray, *, captions: Sequence[str] = ()) -> np.ndarray:
    """Two pictures of one size side by side (``_GAP`` pixels apart), with a caption strip below each."""
    from segkit.visualize import label_font

    height, width = ground_truth.shape[:2]
    font = label_font(height, width)
    strip = 0
    if captions:
        left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), "Ag", font=font)
        strip = bottom - top + 6
    sheet = Image.new("RGB", (2 * width + _GAP, height + strip), _BACKGROUND)
    for k, picture in enumerate((ground_truth, prediction)):
        sheet.paste(Image.fromarray(picture), (k * (width + _GAP), 0))
    draw = ImageDraw.Draw(sheet)
    for k, caption in enumerate(captions[:2]):
        draw.text((k * (width + _GAP) + 2, height + 2), caption, fill=(230, 230, 230), font=font)
    return np.asarray(sheet)


def show_extremes(evaluator: Any, dataset: Any, out_dir: str, *, count: int) -> list[str]:
    """Draw the ``count`` worst and ``count`` best images by :meth:`~segkit.evaluation.base.Evaluator.image_scores`.

    Files: ``out_dir/worst_<rank>_<score>_<image>.png`` (rank 1 the worst) and
    ``out_dir/best_<rank>_<score>_<image>.png`` (rank 1 the best), where ``<image>`` is the image id
    (the file stem for label-map datasets); an image is drawn once, among the worst when the two
    groups would overlap.

    Returns:
        the paths written, worst first.
    """
    from segkit.fileio import atomic_open, make_folder

    scores = {i: s for i, s in evaluator.image_scores().items() if not math.isnan(s)}
    ranked = sorted(scores, key=lambda i: (scores[i], i))
    worst = ranked[:count]
    best = [i for i in reversed(ranked) if i not in set(worst)][:count]
    make_folder(out_dir, what="the --show folder")
    paths = []
    for group, ids in (("worst", worst), ("best", best)):
        for rank, image_id in enumerate(ids, start=1):
            truth, predicted = evaluator.draw_image(image_id, dataset)
            picture = side_by_side(truth, predicted, captions=("ground truth", f"prediction ({scores[image_id]:.3f})"))
            name = f"{group}_{rank:03d}_{scores[image_id]:.3f}_{_image_name(evaluator, image_id)}.png"
            path = os.path.join(out_dir, name)
            with atomic_open(path, "wb") as f:
                Image.fromarray(picture).save(f, format="PNG")
            paths.append(path)
    return paths


def _image_name(evaluator: Any, image_id: int) -> str:
    return re.sub(r"[^\w.-]+", "_", evaluator.image_name(image_id)) or str(image_id)


def coco_ground_truth_output(coco: Any, image_id: int, cat_id_to_label: Mapping[int, int], *,
                             with_masks: bool) -> dict[str, np.ndarray]:
    """One image's ground truth as a drawable target: ``boxes`` xyxy, ``labels`` 1..K, ``masks`` uint8."""
    anns = [a for a in coco.imgToAnns.get(image_id, []) if a["category_id"] in cat_id_to_label]
    boxes = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    target = {"boxes": boxes, "labels": np.asarray([cat_id_to_label[a["category_id"]] for a in anns], dtype=np.int64)}
    if with_masks:
        info = coco.imgs[image_id]
        masks = [coco.annToMask(a) for a in anns]
        target["masks"] = np.stack(masks) if masks else np.zeros((0, info["height"], info["width"]), np.uint8)
    return target
