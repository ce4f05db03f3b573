"""``COCOeval`` run quietly on COCO results, with pycocotools or faster-coco-eval (the same numbers).

Backends: ``"pycocotools"``; ``"faster_coco_eval"``, the C++ reimplementation of ``COCOeval`` in the
optional ``faster-coco-eval`` package (``pip install 'segkit-cv[fast-eval]'``), which gives the same 12
numbers and per-class precision arrays several times faster; ``"auto"`` uses faster-coco-eval when it
is installed and pycocotools otherwise. :class:`segkit.evaluation.coco.CocoEvaluator` and
``segkit score`` both score through :func:`evaluate_coco_results`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segkit.evaluation.table import COCO_METRIC_NAMES

__all__ = ["BACKENDS", "Backend", "evaluate_coco_results", "resolve_backend"]

#: ``evaluation.backend`` values; see the module docstring.
BACKENDS = ("auto", "pycocotools", "faster_coco_eval")
Backend = Literal["auto", "pycocotools", "faster_coco_eval"]


def evaluate_coco_results(
    coco_gt: COCO,
    results: Sequence[Mapping[str, Any]],
    *,
    iou_type: str = "bbox",
    image_ids: Sequence[int] | None = None,
    class_names: Mapping[int, str] | None = None,
    backend: str = "auto",
    mask_areas: Sequence[float] | None = None,
) -> dict[str, float]:
    """Run ``COCOeval`` quietly on COCO results and name its numbers.

    Args:
        coco_gt: ground truth.
        results: COCO results (``image_id``, ``category_id``, ``score`` and ``bbox`` xywh or
            ``segmentation`` RLE); may be empty. The dicts are copied, not modified.
        iou_type: ``"bbox"`` or ``"segm"``.
        image_ids: images to score (default: every image of ``coco_gt``).
        class_names: ``{category_id: name}``; when given, ``<iou type>/AP-<name>`` is added for each
            category: the mean of ``precision`` over IoU thresholds and recall points at area
            ``all`` and the largest ``maxDets``, ignoring ``-1`` entries; ``nan`` for a category
            with no ground truth in these images.
        backend: ``"auto"``, ``"pycocotools"`` or ``"faster_coco_eval"`` (see the module docstring).
        mask_areas: for ``"segm"``, the pixel count of each result's mask, in order, when the caller
            already has them (:class:`CocoEvaluator` counts them where the masks are encoded); the
            faster-coco-eval backend then needs not decode every mask once more to count it.
            pycocotools always counts them itself.

    Returns:
        ``{"<iou type>/AP": ..., ...}``: the 12 numbers of ``COCOeval.summarize()``.
    """
    if mask_areas is not None and len(mask_areas) != len(results):
        raise ValueError(f"mask_areas has {len(mask_areas)} values for {len(results)} results; give one per result.")
    if resolve_backend(backend) == "faster_coco_eval":
        coco_eval = _faster_coco_eval(coco_gt, results, iou_type=iou_type, image_ids=image_ids, mask_areas=mask_areas)
    else:
        coco_eval = _pycocotools_eval(coco_gt, results, iou_type=iou_type, image_ids=image_ids)
    metrics = {f"{iou_type}/{name}": float(value) for name, value in zip(COCO_METRIC_NAMES, coco_eval.stats)}
    if class_names:
        metrics.update(_per_class_ap(coco_eval, class_names, prefix=iou_type))
    return metrics


def resolve_backend(backend: str) -> str:
    """The COCO evaluation backend to use for ``backend`` (``"auto"`` resolved to what is installed).

    Raises:
        ValueError: for a name not in :data:`BACKENDS`.
    """
    if backend not in BACKENDS:
        choices = ", ".join(map(repr, BACKENDS))
        raise ValueError(f"evaluation.backend must be one of {choices}, got {backend!r}")
    installed = importlib.util.find_spec("faster_coco_eval") is not None
    if backend == "faster_coco_eval" and not installed:
        warnings.warn("evaluation.backend 'faster_coco_eval' is not installed (pip install 'segkit-cv[fast-eval]'); "
                      "scoring with pycocotools, which gives the same numbers more slowly", stacklevel=2)
    if backend == "pycocotools" or not installed:
        return "pycocotools"
    return "faster_coco_eval"


def _pycocotools_eval(coco_gt: COCO, results: Sequence[Mapping[str, Any]], *, iou_type: str,
                      image_ids: Sequence[int] | None) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):  # segkit prints its own table
        if results:
            detections = coco_gt.loadRes([dict(r) for r in results])
        else:  # loadRes cannot take an empty list
            detections = COCO()
            detections.dataset = {"images": list(coco_gt.dataset["images"]),
                                  "categories": list(coco_gt.dataset["categories"]), "annotations": []}
            detections.createIndex()
        coco_eval = COCOeval(coco_gt, detections, iouType=iou_type)
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(int(i) for i in image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


# faster-coco-eval's copy of each pycocotools ground truth, made once per ground-truth object.
_FASTER_GT: weakref.WeakKeyDictionary[COCO, Any] = weakref.WeakKeyDictionary()


def _faster_coco_eval(coco_gt: COCO, results: Sequence[Mapping[str, Any]], *, iou_type: str,
                      image_ids: Sequence[int] | None, mask_areas: Sequence[float] | None = None) -> Any:
    import faster_coco_eval

    gt = _FASTER_GT.get(coco_gt)
    if gt is None:
        # a deep copy: faster-coco-eval may annotate the dicts it indexes
        gt = _FASTER_GT[coco_gt] = faster_coco_eval.COCO(coco_gt.dataset, use_deepcopy=True)
    detections = _faster_results(gt, results, iou_type, mask_areas)
    coco_eval = faster_coco_eval.COCOeval_faster(gt, detections, iouType=iou_type, print_function=_ignore)
    if image_ids is not None:
        coco_eval.params.imgIds = sorted(int(i) for i in image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def _faster_results(gt: Any, results: Sequence[Mapping[str, Any]], iou_type: str,
                    mask_areas: Sequence[float] | None = None) -> Any:
    """The results as a faster-coco-eval ``COCO``, with the fields its evaluation reads.

    ``loadRes`` builds them in a Python loop (a polygon per box, one mask decode per RLE), which
    takes longer than the evaluation itself. Here box results get ``area = w * h``; mask results
    their mask's pixel count (``mask_areas`` when given, else counted in one call), and no box,
    which mask scoring does not read; every result ``iscrowd = 0`` and ``id`` from 1, as
    ``loadRes`` assigns them.
    """
    from faster_coco_eval.core import mask as faster_mask

    unknown = {int(r["image_id"]) for r in results} - set(gt.imgs)
    if unknown:
        raise ValueError(f"results refer to image ids {sorted(unknown)[:5]} that are not in the ground truth")
    key = "bbox" if iou_type == "bbox" else "segmentation"
    if iou_type == "bbox":
        boxes = np.asarray([r["bbox"] for r in results], dtype=np.float64).reshape(-1, 4)
        areas = (boxes[:, 2] * boxes[:, 3]).tolist()
    elif mask_areas is not None:
        areas = [float(a) for a in mask_areas]
    else:
        areas = faster_mask.area([r["segmentation"] for r in results]).tolist() if results else []
    annotations = [
        {"id": index, "image_id": r["image_id"], "category_id": r["category_id"], key: r[key], "score": r["score"],
         "area": area, "iscrowd": 0}
        for index, (r, area) in enumerate(zip(results, areas), start=1)
    ]
    detections = type(gt)()
    detections.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                          "annotations": annotations}
    detections.createIndex()
    return detections


def _ignore(*args: Any, **kwargs: Any) -> None:
    """A print function that prints nothing (faster-coco-eval reports through one)."""


def _per_class_ap(coco_eval: COCOeval, class_names: Mapping[int, str], *, prefix: str) -> dict[str, float]:
    params = coco_eval.params
    precision = coco_eval.eval["precision"]  # [T IoUs, R recalls, K categories, A areas, M maxDets]
    area = params.areaRngLbl.index("all")
    index = {cat_id: k for k, cat_id in enumerate(params.catIds)}
    out: dict[str, float] = {}
    for cat_id, name in class_names.items():
        values = precision[:, :, index[cat_id], area, -1] if cat_id in index else np.empty(0)
        values = values[values > -1]
        out[f"{prefix}/AP-{name}"] = float(values.mean()) if values.size else math.nan
    return out
