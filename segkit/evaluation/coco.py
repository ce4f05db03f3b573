"""COCO box and mask evaluation with pycocotools (or faster-coco-eval, giving the same numbers).

:class:`CocoEvaluator` turns model outputs into COCO results (boxes in xywh pixels of the original
image, masks as compressed RLE) per image, and scores them with ``COCOeval`` on the images it has
seen. Results are kept per image id, so the padding duplicates of a distributed sampler collapse
when the states of several processes are merged.

Backends (``backend``): ``"pycocotools"``; ``"faster_coco_eval"``, the C++ reimplementation of
``COCOeval`` in the optional ``faster-coco-eval`` package (``pip install 'segkit-cv[fast-eval]'``),
which gives the same 12 numbers and per-class precision arrays several times faster; ``"auto"``
(the default) uses faster-coco-eval when it is installed and pycocotools otherwise. Asking for
``faster_coco_eval`` without the package installed warns once and falls back to pycocotools.

Metric names are stable: ``bbox/AP``, ``bbox/AP50``, ``bbox/AP75``, ``bbox/APs``, ``bbox/APm``,
``bbox/APl``, ``bbox/AR1``, ``bbox/AR10``, ``bbox/AR100``, ``bbox/ARs``, ``bbox/ARm``, ``bbox/ARl``,
the same under ``segm/``, and ``bbox/AP-<class name>`` with ``per_class=True``. Values are
pycocotools' own, in ``[0, 1]``; like pycocotools, a number with no ground truth to score (for
example ``APs`` when no object is small) is ``-1``, while a per-class AP of a category with no
ground truth in the evaluated images is ``nan``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segkit.evaluation.base import Evaluator
from segkit.evaluation.cocoeval import BACKENDS, Backend, evaluate_coco_results, resolve_backend
from segkit.evaluation.table import COCO_METRIC_NAMES, format_metrics_table
from segkit.registry import EVALUATORS

__all__ = [
    "BACKENDS",
    "COCO_METRIC_NAMES",
    "IOU_TYPES",
    "MASK_THRESHOLD",
    "CocoEvaluator",
    "encode_masks",
    "evaluate_coco_results",
    "format_metrics_table",
    "resolve_backend",
]

#: The iou types :class:`CocoEvaluator` scores.
IOU_TYPES = ("bbox", "segm")
#: Default threshold: mask probabilities ``>= MASK_THRESHOLD`` (after resizing to the original
#: image) are foreground.
MASK_THRESHOLD = 0.5
IouType = Literal["bbox", "segm"]
# Instances resized together when masks are mapped back to the original size (bounds memory).
_RESIZE_CHUNK = 32


@EVALUATORS.register()
class CocoEvaluator(Evaluator):
    """COCO bbox/segm AP of detections, with pycocotools' ``COCOeval``.

    Args:
        dataset: the evaluation dataset; it must expose ``coco`` (a pycocotools ``COCO`` holding
            the ground truth), ``label_to_cat_id`` (``{label 1..K: category_id}``) and ``classes``
            (names, ``classes[label - 1]``).
        iou_types: any of ``"bbox"`` and ``"segm"``; ``"segm"`` needs outputs with ``masks``.
        per_class: also report ``<iou type>/AP-<class name>`` for every class.
        mask_threshold: probability from which a mask pixel is foreground; ``None`` uses the model's
            own (``model.mask_threshold``, set by the engine) or :data:`MASK_THRESHOLD`.
        backend: ``"auto"``, ``"pycocotools"`` or ``"faster_coco_eval"`` (see the module docstring).

    Only the images given to :meth:`process` are scored; an image without detections still counts
    (its objects are missed). If no image has any detection, the numbers are what ``COCOeval``
    gives for an empty result set: ``0.0`` where ground truth exists, ``-1`` where none does.

    Example:
        >>> evaluator = EVALUATORS.build({"type": "CocoEvaluator", "iou_types": ["bbox", "segm"]},
        ...                              path="evaluation", dataset=val_set)
        >>> for images, targets in loader:
        ...     evaluator.process(targets, model(images))
        >>> print(format_metrics_table(evaluator.evaluate()))
    """

    results_layout = "file"

    def __init__(self, *, dataset: Any, iou_types: Sequence[IouType] | IouType = ("bbox",), per_class: bool = False,
                 mask_threshold: float | None = None, backend: Backend = "auto") -> None:
        super().__init__()
        self.backend = resolve_backend(backend)
        self.coco: COCO = _dataset_coco(dataset)
        self.iou_types = _check_iou_types(iou_types, self.coco)
        if "segm" in self.iou_types:  # pycocotools rasterises the ground truth unchecked
            from segkit.data.coco import check_ground_truth_masks

            check_ground_truth_masks(self.coco, str(getattr(dataset, "ann_file", "the ground truth")))
        self.per_class = bool(per_class)
        if mask_threshold is not None and not 0.0 <= float(mask_threshold) <= 1.0:
            raise ValueError(f"mask_threshold is a probability in [0, 1], got {mask_threshold}")
        self.mask_threshold = MASK_THRESHOLD if mask_threshold is None else float(mask_threshold)
        self.classes = [str(name) for name in dataset.classes]
        self.label_to_cat_id = {int(k): int(v) for k, v in dict(dataset.label_to_cat_id).items()}
        self._label_lookup = _label_lookup(self.label_to_cat_id, self.coco)

    @classmethod
    def metric_names(cls, *, iou_types: Sequence[str] | str = ("bbox",), per_class: bool = False,
                     **options: Any) -> list[str]:
        """The names :meth:`evaluate` reports with these options (``*`` stands for a class name).

        Raises:
            ValueError: no iou type.
        """
        types = [iou_types] if isinstance(iou_types, str) else list(iou_types)
        if not types:
            raise ValueError(f"iou_types must be a non-empty list of {list(IOU_TYPES)}, got [].")
        return [f"{t}/{name}" for t in types for name in COCO_METRIC_NAMES] + (
            [f"{t}/AP-*" for t in types] if per_class else [])

    # ---------------------------------------------------------------- accumulation
    def process(self, targets: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        """Convert one batch of predictions to COCO results, stored by image id.

        Args:
            targets: one dict per image with ``image_id`` (int or 0-d tensor), ``orig_size``
                (int64 ``[2]``: height and width of the image file) and optionally ``image_size``
                (``[2]``: height and width of the image the model saw, when a transform resized it).
            outputs: one dict per image with ``boxes`` (float ``[N, 4]``, xyxy pixels of the image
                the model saw), ``scores`` (float ``[N]``), ``labels`` (int64 ``[N]``, ``1..K``)
                and, for ``"segm"``, ``masks`` (float ``[N, 1, H, W]`` probabilities or
                ``[N, H, W]`` binary, in pixels of the image the model saw).

        Boxes are scaled from ``image_size`` to ``orig_size``; without ``image_size`` the size of
        the masks, if any, is used, else the boxes are taken to be in original pixels already.
        Masks are resized bilinearly to ``orig_size`` and thresholded at ``mask_threshold``.
        An image id seen before keeps its first results.

        Raises:
            ValueError: mismatched lengths, an image id not in the ground truth, labels outside
                ``1..K``, or missing masks for ``"segm"``.
        """
        super().process(targets, outputs)

    def image_id(self, target: Mapping[str, Any]) -> int:
        """The target's ``image_id``, which must be an image of the ground truth."""
        image_id = super().image_id(target)
        if image_id not in self.coco.imgs:
            raise ValueError(f"image_id {image_id} is not an image of the evaluator's ground truth; evaluate with the "
                             f"dataset the images came from.")
        return image_id

    def image_result(self, image_id: int, target: Mapping[str, Any], output: Mapping[str, Any]) -> dict[str, Any]:
        """The image's detections as COCO results (category ids, xywh boxes in file pixels, RLE masks)."""
        if "orig_size" not in target:
            raise ValueError(
                f"the target of image {image_id} has no 'orig_size' (int64 [2], height and width of the "
                f"image file); evaluate with a segkit dataset or add it to the targets."
            )
        orig_hw = _hw(target["orig_size"])
        masks = output.get("masks")
        if "image_size" in target:
            image_hw = _hw(target["image_size"])
        elif masks is not None:
            image_hw = (int(masks.shape[-2]), int(masks.shape[-1]))
        else:
            image_hw = orig_hw
        boxes = _as_numpy(output["boxes"], np.float64).reshape(-1, 4)
        scores = _as_numpy(output["scores"], np.float64).reshape(-1)
        labels = _as_numpy(output["labels"], np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(
                f"the output of image {image_id} has {len(boxes)} boxes, {len(scores)} scores and "
                f"{len(labels)} labels; a detection needs one of each."
            )
        category_ids = self._category_ids(labels, image_id)
        known = category_ids >= 0
        entry: dict[str, Any] = {
            "boxes": _xyxy_to_xywh(boxes[known], scale=(orig_hw[0] / image_hw[0], orig_hw[1] / image_hw[1])),
            "scores": scores[known],
            "category_ids": category_ids[known],
        }
        if "segm" in self.iou_types:
            if masks is None:
                raise ValueError(
                    f"iou_types includes 'segm' but the output of image {image_id} has no 'masks'; "
                    f"use a model with a mask head or set evaluation.iou_types to ['bbox']."
                )
            if masks.shape[0] != len(boxes):
                raise ValueError(f"the output of image {image_id} has {masks.shape[0]} masks for {len(boxes)} boxes.")
            if not known.all():
                masks = masks[torch.as_tensor(known)] if isinstance(masks, torch.Tensor) else masks[known]
            binary = _binary_masks(masks, orig_hw, self.mask_threshold)
            entry["segmentations"] = encode_masks(binary)
            # counted here, in the process that made the masks, so scoring needs not decode them again
            entry["mask_areas"] = binary.flatten(1).sum(1, dtype=torch.float64).cpu().numpy()
        return entry

    def _category_ids(self, labels: np.ndarray, image_id: int) -> np.ndarray:
        num_classes = len(self._label_lookup) - 1
        if labels.size and (labels.min() < 1 or labels.max() > num_classes):
            bad = labels[(labels < 1) | (labels > num_classes)][0]
            raise ValueError(
                f"image {image_id} has a detection with label {int(bad)}, but labels must be 1..{num_classes} "
                f"(0 is background); check that the model's num_classes equals the dataset's {num_classes} classes."
            )
        return self._label_lookup[labels]

    # ---------------------------------------------------------------- processes
    def state_values(self) -> dict[str, Any]:
        """The iou types, which every process's evaluator must share."""
        return {"iou_types": list(self.iou_types)}

    # ---------------------------------------------------------------- scoring
    def results(self, iou_type: str = "bbox") -> list[dict[str, Any]]:
        """The COCO results JSON of the processed images (``json.dump``-able), sorted by image id.

        Boxes are ``[x, y, w, h]`` in original-image pixels; masks are compressed RLE with ``str``
        counts. Nothing is rounded.
        """
        if iou_type not in self.iou_types:
            raise ValueError(f"iou_type '{iou_type}' is not evaluated; this evaluator has iou_types {list(self.iou_types)}.")
        key = "bbox" if iou_type == "bbox" else "segmentation"
        out: list[dict[str, Any]] = []
        for image_id in sorted(self._images):
            entry = self._images[image_id]
            values = entry["boxes"].tolist() if iou_type == "bbox" else entry["segmentations"]
            out.extend(
                {"image_id": image_id, "category_id": cat, key: value, "score": score}
                for cat, value, score in zip(entry["category_ids"].tolist(), values, entry["scores"].tolist())
            )
        return out

    def mask_areas(self) -> list[float]:
        """The pixel count of each mask of :meth:`results` ``("segm")``, in the same order."""
        if "segm" not in self.iou_types:
            raise ValueError(f"this evaluator has no masks; its iou_types are {list(self.iou_types)}.")
        return [area for image_id in sorted(self._images) for area in self._images[image_id]["mask_areas"].tolist()]

    def score(self) -> dict[str, float]:
        """The metrics of the processed images, ``{"bbox/AP": ..., ...}`` (see the module docstring)."""
        class_names = None
        if self.per_class:
            class_names = {self.label_to_cat_id[label]: self.classes[label - 1] for label in sorted(self.label_to_cat_id)
                           if self.label_to_cat_id[label] in self.coco.cats}
        metrics: dict[str, float] = {}
        for iou_type in self.iou_types:
            metrics.update(
                evaluate_coco_results(
                    self.coco, self.results(iou_type), iou_type=iou_type, image_ids=self.image_ids,
                    class_names=class_names, backend=self.backend,
                    mask_areas=self.mask_areas() if iou_type == "segm" else None,
                )
            )
        return metrics

    # ---------------------------------------------------------------- exporting and reviewing
    def result_records(self) -> list[dict[str, Any]]:
        """One COCO result per kept detection, sorted by image id: ``image_id`` and ``category_id`` (the
        dataset's own ids), ``bbox`` (``[x, y, w, h]`` file pixels), ``score`` and, when masks are
        evaluated, ``segmentation`` (compressed RLE, ``str`` counts). Nothing is rounded, so
        ``segkit score`` of these records gives :meth:`evaluate`'s numbers exactly."""
        out: list[dict[str, Any]] = []
        for image_id in sorted(self._images):
            entry = self._images[image_id]
            masks = entry.get("segmentations") or [None] * len(entry["scores"])
            for cat, box, score, rle in zip(entry["category_ids"].tolist(), entry["boxes"].tolist(),
                                            entry["scores"].tolist(), masks):
                record = {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}
                if rle is not None:
                    record["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"]}
                out.append(record)
        return out

    def write_results(self, path: str) -> str:
        """Write :meth:`result_records` as a COCO results JSON to ``path`` (atomically)."""
        import json

        from segkit.fileio import atomic_write_text

        records = self.result_records()
        atomic_write_text(path, json.dumps(records))
        return (f"{len(records)} detection(s) of {len(self._images)} image(s) as COCO results "
                f"({' and '.join(self.iou_types)})")

    def image_scores(self) -> dict[int, float]:
        """F1 at IoU 0.5 of each image's detections (see :mod:`segkit.evaluation.review`); mask IoU
        when masks are evaluated, else box IoU."""
        from segkit.evaluation.review import SHOW_SCORE_THRESHOLD, detection_f1

        masks = "segm" in self.iou_types
        scores = {}
        for image_id, entry in self._images.items():
            shapes = entry["segmentations"] if masks else entry["boxes"].tolist()
            detections = [(c, s, g) for c, s, g in zip(entry["category_ids"].tolist(), entry["scores"].tolist(), shapes)
                          if s >= SHOW_SCORE_THRESHOLD]
            objects = [(a["category_id"], self.coco.annToRLE(a) if masks else a["bbox"], bool(a.get("iscrowd", 0)))
                       for a in self.coco.imgToAnns.get(image_id, [])]
            scores[image_id] = detection_f1(detections, objects)
        return scores

    def draw_image(self, image_id: int, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
        """The image file with its ground truth, and with the detections scoring at least
        :data:`~segkit.evaluation.review.SHOW_SCORE_THRESHOLD` (masks too when evaluated)."""
        from segkit.data.images import load_image
        from segkit.data.show import draw_target
        from segkit.evaluation.review import SHOW_SCORE_THRESHOLD, coco_ground_truth_output
        from segkit.visualize import draw_detections

        image = load_image(dataset.image_path(list(dataset.image_ids).index(image_id)), image_id=image_id)
        to_label = {cat: label for label, cat in self.label_to_cat_id.items()}
        masks = "segm" in self.iou_types
        truth = draw_target(image, coco_ground_truth_output(self.coco, image_id, to_label, with_masks=masks),
                            self.classes)
        entry = self._images[image_id]
        boxes = entry["boxes"].copy()
        boxes[:, 2:] += boxes[:, :2]
        output = {"boxes": boxes, "scores": entry["scores"],
                  "labels": np.asarray([to_label[c] for c in entry["category_ids"].tolist()], dtype=np.int64)}
        if masks:
            output["masks"] = (mask_utils.decode(entry["segmentations"]).transpose(2, 0, 1) if len(boxes)
                               else np.zeros((0, *image.shape[:2]), np.uint8))
        return truth, draw_detections(image, output, self.classes, score_threshold=SHOW_SCORE_THRESHOLD)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(iou_types={list(self.iou_types)}, per_class={self.per_class}, "
                f"backend={self.backend!r}, "
                f"classes={len(self.classes)}, processed_images={len(self._images)})")


def encode_masks(masks: torch.Tensor | np.ndarray) -> list[dict[str, Any]]:
    """Compressed COCO RLE of binary masks, encoded together.

    Args:
        masks (Tensor or ndarray ``[N, H, W]``, bool or uint8): binary masks.

    Returns:
        N dicts ``{"size": [H, W], "counts": str}`` (``str`` counts, so the results are JSON-ready;
        pycocotools accepts them as they are).
    """
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"encode_masks() expects masks of shape [N, H, W], got {tuple(masks.shape)}.")
    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


# -------------------------------------------------------------------- helpers
def _dataset_coco(dataset: Any) -> COCO:
    missing = [name for name in ("coco", "label_to_cat_id", "classes") if not hasattr(dataset, name)]
    if missing:
        raise ValueError(
            f"CocoEvaluator needs a dataset with 'coco', 'label_to_cat_id' and 'classes'; "
            f"{type(dataset).__name__} lacks {', '.join(repr(m) for m in missing)}. Evaluate a COCO-format "
            f"dataset (CocoDetection, Shapes) or use an evaluator that fits the dataset."
        )
    if not isinstance(dataset.coco, COCO):
        raise ValueError(f"dataset.coco must be a pycocotools COCO object, got {type(dataset.coco).__name__}.")
    return dataset.coco


def _check_iou_types(iou_types: Sequence[str] | str, coco: COCO) -> tuple[str, ...]:
    types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
    unknown = [t for t in types if t not in IOU_TYPES]
    if unknown or not types:
        raise ValueError(f"iou_types must be a non-empty list of {list(IOU_TYPES)}, got {list(types)}.")
    if "segm" in types and any("segmentation" not in ann for ann in coco.dataset.get("annotations", [])):
        raise ValueError(
            "iou_types includes 'segm' but some ground-truth annotations have no 'segmentation'; "
            "use iou_types: ['bbox'] for a box-only dataset."
        )
    return tuple(dict.fromkeys(types))


def _label_lookup(label_to_cat_id: Mapping[int, int], coco: COCO) -> np.ndarray:
    num_classes = len(label_to_cat_id)
    if sorted(label_to_cat_id) != list(range(1, num_classes + 1)):
        raise ValueError(f"dataset.label_to_cat_id must map labels 1..K to category ids, got keys {sorted(label_to_cat_id)}.")
    if not any(c in coco.cats for c in label_to_cat_id.values()):
        raise ValueError(
            f"none of the category ids of dataset.label_to_cat_id ({sorted(label_to_cat_id.values())[:10]}...) "
            f"is a category of the ground truth ({sorted(coco.cats)[:10]}...)."
        )
    # A label whose category the ground truth does not define (an unused id of a model's label space,
    # like torchvision's "N/A" COCO ids) maps to -1: its detections cannot match and are dropped.
    lookup = np.full(num_classes + 1, -1, dtype=np.int64)
    for label, cat_id in label_to_cat_id.items():
        if cat_id in coco.cats:
            lookup[label] = cat_id
    return lookup


def _hw(size: Any) -> tuple[int, int]:
    values = size.tolist() if hasattr(size, "tolist") else list(size)
    if len(values) != 2:
        raise ValueError(f"an image size must be (height, width), got {values}.")
    return int(values[0]), int(values[1])


def _as_numpy(values: Any, dtype: type) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = values.to(torch.float64 if dtype is np.float64 else torch.int64).numpy()
    return np.asarray(values, dtype=dtype)


def _xyxy_to_xywh(boxes: np.ndarray, *, scale: tuple[float, float]) -> np.ndarray:
    """``[N, 4]`` xyxy → xywh, scaled by ``(sy, sx)`` from the model's image to the original."""
    boxes = boxes.copy()
    if scale != (1.0, 1.0):
        boxes[:, 0::2] *= scale[1]
        boxes[:, 1::2] *= scale[0]
    boxes[:, 2:] -= boxes[:, :2]
    return boxes


def _binary_masks(masks: torch.Tensor | np.ndarray, orig_hw: tuple[int, int], threshold: float) -> torch.Tensor:
    """``[N, 1, H, W]`` or ``[N, H, W]`` masks → bool ``[N, H0, W0]`` at the original size."""
    masks = torch.as_tensor(masks).detach()
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"output masks must be [N, 1, H, W] or [N, H, W], got {tuple(masks.shape)}.")
    if tuple(masks.shape[-2:]) == orig_hw:
        return masks >= threshold if masks.dtype != torch.bool else masks
    chunks = [
        F.interpolate(chunk[:, None].float(), size=orig_hw, mode="bilinear", align_corners=False)[:, 0] >= threshold
        for chunk in masks.split(_RESIZE_CHUNK)
    ]
    return torch.cat(chunks) if chunks else masks.new_zeros((0, *orig_hw), dtype=torch.bool)
