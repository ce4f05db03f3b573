"""Semantic-segmentation metrics from a confusion matrix: mIoU, pixel and class accuracy.

For a confusion matrix ``C`` (int64 ``[K, K]``, rows ground truth, columns prediction, ignored
pixels left out) let ``TP_k = C[k, k]``, ``GT_k`` its row sum, ``P_k`` its column sum,
``U_k = GT_k + P_k - TP_k`` and ``N`` the number of scored pixels. The metrics, all fractions in
``[0, 1]`` with stable names:

* ``aAcc`` = ``sum_k TP_k / N``: pixel accuracy.
* ``IoU-<class>`` = ``TP_k / U_k``, NaN for a class absent from both ground truth and prediction;
  ``Acc-<class>`` = ``TP_k / GT_k``, NaN for a class absent from the ground truth.
* ``mIoU``, ``mAcc``: means of the defined per-class values (MMSegmentation's convention): a class
  absent from ground truth and prediction does not count in ``mIoU``, a class absent from the ground
  truth does not count in ``mAcc``. A class only predicted has IoU 0 and counts.
* ``fwIoU`` = ``sum_k (GT_k / N) * IoU_k`` over the classes present in the ground truth.
* ``mIoU_all`` and ``pixAcc``: PyTorch-Encoding's convention, in which the EncNet paper reports its
  numbers. Its ``SegmentationMetric`` sums intersections ``TP_k`` and unions ``U_k`` over the whole
  evaluation set, then takes ``mean_k TP_k / (eps + U_k)`` over **all** K classes, so a class absent
  from both ground truth and prediction counts as 0; ``pixAcc = sum_k TP_k / (eps + N)``; with
  ``eps = np.spacing(1)`` (about 2.2e-16). Its labelled pixels are those that are not ignored, as here.

A number with nothing to average (no scored pixel) is NaN, except ``mIoU_all`` and ``pixAcc``,
which are 0 as in PyTorch-Encoding.

Distributed evaluation: :class:`SemSegEvaluator` keeps one confusion matrix per image, keyed by
``image_id``, computed on the device of the model's outputs. Only its non-zero entries are kept
(flat indices and counts, a handful per image even for 150 classes), so memory stays small for any
K. :meth:`~SemSegEvaluator.state` moves them to the CPU in one transfer; merging the states of all
processes keeps the first entry of each image id, so the images a distributed sampler repeats to pad
its shards count once and the numbers equal a single-process evaluation. The per-image matrices are
summed, exactly in int64, only in :meth:`~SemSegEvaluator.evaluate`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segkit.evaluation.base import Evaluator
from segkit.evaluation.table import SEMSEG_METRIC_NAMES as SEMSEG_SUMMARY_NAMES
from segkit.registry import EVALUATORS

__all__ = ["SEMSEG_SUMMARY_NAMES", "SemSegEvaluator", "confusion_matrix", "label_map_name", "segmentation_metrics"]

# Offending values listed in an error message, at most.
_MAX_LISTED = 10


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """Count (ground truth, prediction) pairs over the pixels whose target is not ``ignore_index``.

    Args:
        pred (Tensor[...], integer): predicted class indices ``0..K-1``, any shape. Values at
            ignored pixels are not read.
        target (Tensor[...], integer): same shape; class indices ``0..K-1`` or ``ignore_index``.
            Moved to ``pred``'s device if it is elsewhere.
        num_classes: K.
        ignore_index: target value of pixels that are not scored.

    Returns:
        Tensor[K, K], int64, on ``pred``'s device: ``[i, j]`` counts pixels of class ``i`` predicted
        as ``j``.

    Raises:
        ValueError: shapes differ, a tensor is not of an integer type, or a scored value is outside
            ``0..K-1``; the message lists the offending values.

    Example:
        >>> confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 255]), 2)
        tensor([[1, 0],
                [0, 1]])
    """
    _check_num_classes(num_classes)
    if pred.shape != target.shape:
        raise ValueError(f"the prediction has shape {tuple(pred.shape)} but the label map {tuple(target.shape)}; "
                         f"they must match pixel for pixel.")
    for name, values in (("prediction", pred), ("label", target)):
        if values.is_floating_point() or values.is_complex():
            raise ValueError(f"the {name} must hold integer class indices, got dtype {values.dtype}; "
                             f"take argmax over the class scores first.")
    target = target.to(pred.device).long()
    pred = pred.long()
    scored = target != ignore_index
    bad_target = scored & ((target < 0) | (target >= num_classes))
    bad_pred = scored & ((pred < 0) | (pred >= num_classes))
    if any(torch.stack([bad_target.any(), bad_pred.any()]).tolist()):  # one device sync for both checks
        _raise_out_of_range(pred, target, bad_pred, bad_target, num_classes, ignore_index)
    # Ignored pixels go to one extra bin that is dropped; no boolean indexing, so no sync here.
    flat = torch.where(scored, target * num_classes + pred, num_classes * num_classes)
    counts = torch.bincount(flat.reshape(-1), minlength=num_classes * num_classes + 1)
    return counts[: num_classes * num_classes].view(num_classes, num_classes)


def _raise_out_of_range(pred: torch.Tensor, target: torch.Tensor, bad_pred: torch.Tensor,
                        bad_target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    label = bool(bad_target.any())
    found = torch.unique(target[bad_target] if label else pred[bad_pred]).tolist()[:_MAX_LISTED]
    fix = (f" and are not the ignore value {ignore_index}; check the dataset's classes, label_map or ignore_index "
           f"(or the evaluator's num_classes)." if label else "; check that the model's num_classes equals the dataset's.")
    raise ValueError(f"{'label' if label else 'prediction'} values {found} are outside the {num_classes} classes "
                     f"0..{num_classes - 1}{fix}")


def segmentation_metrics(confusion: torch.Tensor | np.ndarray, class_names: Sequence[str] | None = None, *,
                         per_class: bool = True) -> dict[str, float]:
    """The metrics of the module docstring from a confusion matrix.

    Args:
        confusion (Tensor or ndarray ``[K, K]``, non-negative counts): rows ground truth, columns
            prediction, ignored pixels left out (as :func:`confusion_matrix` gives).
        class_names: K distinct names for the per-class keys (default ``"0"`` .. ``"K-1"``).
        per_class: include ``IoU-<class>`` and ``Acc-<class>``.

    Returns:
        ``{"aAcc", "mIoU", "mAcc", "fwIoU", "mIoU_all", "pixAcc"}`` as floats in ``[0, 1]`` (NaN
        where undefined), then ``IoU-<class>`` for every class and ``Acc-<class>`` for every class.

    Raises:
        ValueError: a matrix that is not square or has negative entries, or wrong class names.

    Example:
        >>> segmentation_metrics(np.array([[3, 1], [0, 0]]), ["road", "car"])["mIoU"]
        0.375
    """
    cm = confusion.detach().cpu().numpy() if isinstance(confusion, torch.Tensor) else np.asarray(confusion)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(f"a confusion matrix is [K, K] with K >= 1, got shape {tuple(cm.shape)}.")
    if (cm < 0).any():
        raise ValueError("a confusion matrix holds pixel counts, but this one has negative entries.")
    names = _class_names(class_names, cm.shape[0])
    cm = cm.astype(np.float64)
    tp, gt, pred = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    union = gt + pred - tp
    total = cm.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
        frequency = gt / total
    eps = np.spacing(1)
    metrics = {
        "aAcc": float(tp.sum() / total) if total > 0 else math.nan,
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "fwIoU": float(np.sum(frequency[gt > 0] * iou[gt > 0])) if total > 0 else math.nan,
        "mIoU_all": float(np.mean(tp / (eps + union))),
        "pixAcc": float(tp.sum() / (eps + total)),
    }
    if per_class:
        metrics.update({f"IoU-{name}": float(value) for name, value in zip(names, iou)})
        metrics.update({f"Acc-{name}": float(value) for name, value in zip(names, acc)})
    return metrics


@EVALUATORS.register()
class SemSegEvaluator(Evaluator):
    """mIoU, pixel and class accuracy of ``sem_seg`` scores against the dataset's label maps.

    Args:
        dataset: the evaluated dataset; gives ``num_classes`` (else ``len(classes)``), ``classes``
            (names for the per-class keys) and ``ignore_index`` when it has them.
        num_classes: K, for a dataset that does not say; must agree with ``dataset.classes``.
        ignore_index: label value that is not scored (default: the dataset's, else 255).
        per_class: also report ``IoU-<class>`` and ``Acc-<class>``.

    The metrics and the way per-image results survive distributed evaluation are described in the
    module docstring.

    Example:
        >>> evaluator = EVALUATORS.build({"type": "SemSegEvaluator"}, path="evaluation", dataset=val_set)
        >>> for images, targets in loader:
        ...     evaluator.process(targets, model(images))
        >>> print(format_metrics_table(evaluator.evaluate()))  # segkit.evaluation.table
    """

    state_keys = ("num_classes",)  # processes must agree on it
    results_layout = "folder"

    def __init__(self, *, dataset: Any, num_classes: int | None = None, ignore_index: int | None = None,
                 per_class: bool = True) -> None:
        super().__init__()
        self.num_classes, self.class_names = _dataset_classes(dataset, num_classes)
        if ignore_index is None:
            ignore_index = getattr(dataset, "ignore_index", None)
        ignore_index = 255 if ignore_index is None else ignore_index
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise ValueError(f"ignore_index must be an int (the label value of unscored pixels), got {ignore_index!r}.")
        self.ignore_index = int(ignore_index)
        self.per_class = bool(per_class)
        # Raw label value of each class index, for writing label maps in the dataset's own values.
        raw_values = getattr(dataset, "raw_label_values", None)
        self.raw_values: np.ndarray | None = raw_values() if callable(raw_values) else None
        # self._images: image id -> (flat indices int64 [M], counts int64 [M]) of the non-zero confusion
        # entries, and with keep_predictions (name, PNG bytes of the predicted class indices).

    @classmethod
    def metric_names(cls, *, per_class: bool = True, **options: Any) -> list[str]:
        """The names :meth:`evaluate` reports with these options (``*`` stands for a class name)."""
        return [*SEMSEG_SUMMARY_NAMES, *(["IoU-*", "Acc-*"] if per_class else [])]

    def process(self, targets: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        """Compute and keep the confusion matrix of each image of a batch.

        Args:
            targets: one dict per image with ``sem_seg`` (int64 Tensor[H, W], ``0..K-1`` or
                ``ignore_index``, the label map at the size of the image given to the model) and
                ``image_id`` (int or 0-d tensor).
            outputs: one dict per image with ``sem_seg`` (float Tensor[K, H', W'] class scores).
                Scores of another size than the label map are resized bilinearly to ``[H, W]``
                before the argmax over K.

        An image id seen before keeps its first result.

        Raises:
            ValueError: mismatched lengths, a missing key, scores that are not ``[K, H', W']``, or
                label / predicted values outside ``0..K-1`` (naming the image).
        """
        super().process(targets, outputs)

    def image_result(self, image_id: int, target: Mapping[str, Any],
                     output: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The non-zero entries of the image's confusion matrix: flat indices into ``[K * K]`` and counts."""
        scores = output.get("sem_seg")
        if not isinstance(scores, torch.Tensor) or scores.ndim != 3 or scores.shape[0] != self.num_classes:
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"the output of image {image_id} must have 'sem_seg' scores Tensor[K={self.num_classes}, "
                             f"H, W], got {shape}; check that the model's num_classes equals the dataset's.")
        if "sem_seg" not in target:
            raise ValueError(f"the target of image {image_id} has no 'sem_seg' label map (int64 [H, W]).")
        label = torch.as_tensor(target["sem_seg"], device=scores.device)
        if label.ndim != 2:
            raise ValueError(f"the 'sem_seg' label map of image {image_id} must be [H, W], got {tuple(label.shape)}.")
        if scores.shape[-2:] != label.shape:
            scores = scores if scores.is_floating_point() else scores.float()
            scores = F.interpolate(scores[None], size=tuple(label.shape), mode="bilinear", align_corners=False)[0]
        predicted = scores.argmax(0)
        try:
            flat = confusion_matrix(predicted, label, self.num_classes, self.ignore_index).reshape(-1)
        except ValueError as exc:
            raise ValueError(f"image {image_id}: {exc}") from exc
        index = flat.nonzero().squeeze(1)
        if not self.keep_predictions:
            return index, flat[index]
        from segkit.predict import label_map_png

        return index, flat[index], _label_map_name(target, image_id), label_map_png(predicted)

    # ---------------------------------------------------------------- processes
    def state(self) -> dict[str, Any]:
        """The per-image confusion entries, on the CPU and picklable, for :meth:`merge`.

        Returns:
            ``{"num_classes": K, "image_ids": list[int], "lengths": int64 ndarray [I],
            "indices": int64 ndarray [M], "counts": int64 ndarray [M]}``: image ``i``'s non-zero
            entries (flat indices into ``[K * K]``) are the ``lengths[i]`` entries after those of
            the images before it.
        """
        # Grouped by device (a stable sort), the order in which _concat_cpu lays out the entries.
        ids = sorted(self._images, key=lambda image_id: str(self._images[image_id][0].device))
        entries = [self._images[i] for i in ids]
        indices, counts = _concat_cpu([e[0] for e in entries]), _concat_cpu([e[1] for e in entries])
        state = {"num_classes": self.num_classes, "image_ids": ids,
                 "lengths": np.array([len(e[0]) for e in entries], dtype=np.int64),
                 "indices": indices.numpy(), "counts": counts.numpy()}
        if entries and all(len(e) == 4 for e in entries):
            state["predictions"] = [e[2:] for e in entries]  # (name, PNG bytes) per image
        return state

    def image_results_of(self, state: Mapping[str, Any]) -> list[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
        """The per-image confusion entries of a :meth:`state`."""
        if not {"image_ids", "lengths", "indices", "counts"} <= set(state):
            raise ValueError("merge() takes a list of SemSegEvaluator.state() dicts, e.g. from all_gather_objects().")
        lengths = [int(n) for n in state["lengths"]]
        indices = torch.as_tensor(np.asarray(state["indices"], dtype=np.int64)).split(lengths)
        counts = torch.as_tensor(np.asarray(state["counts"], dtype=np.int64)).split(lengths)
        extra = state.get("predictions") or [()] * len(lengths)
        return [(int(image_id), (index, count, *more))
                for image_id, index, count, more in zip(state["image_ids"], indices, counts, extra)]

    # ---------------------------------------------------------------- scoring
    @property
    def confusion(self) -> torch.Tensor:
        """int64 Tensor[K, K] on the CPU: the sum of the processed images' confusion matrices."""
        entries = list(self._images.values())
        flat = torch.zeros(self.num_classes * self.num_classes, dtype=torch.int64)
        flat.index_add_(0, _concat_cpu([e[0] for e in entries]), _concat_cpu([e[1] for e in entries]))
        return flat.view(self.num_classes, self.num_classes)

    def score(self) -> dict[str, float]:
        """The metrics of the processed images, ``{"mIoU": ..., ...}`` (see the module docstring)."""
        return segmentation_metrics(self.confusion, self.class_names, per_class=self.per_class)

    # ---------------------------------------------------------------- exporting and reviewing
    def _prediction(self, image_id: int) -> tuple[str, bytes]:
        entry = self._images[image_id]
        if len(entry) < 4:
            raise RuntimeError("the predicted label maps were not kept; set keep_predictions = True before process().")
        return entry[2], entry[3]

    def image_name(self, image_id: int) -> str:
        """The stem of the image's file (folders joined with ``_``) when predictions are kept."""
        entry = self._images.get(image_id, ())
        return entry[2] if len(entry) == 4 else str(image_id)

    def write_results(self, path: str) -> str:
        """Write the predicted label map of every processed image as ``path/<image file stem>.png``,
        in the dataset's raw label values (the inverse of its ``reduce_zero_label`` / ``label_map``),
        8-bit up to 255 and 16-bit above."""
        from segkit.fileio import atomic_open, make_folder
        from segkit.predict import label_map_png

        make_folder(path, what="the results folder")
        for image_id in sorted(self._images):
            name, data = self._prediction(image_id)
            if self.raw_values is not None:
                data = label_map_png(self.raw_values[_decode_png(data)])
            with atomic_open(os.path.join(path, f"{name}.png"), "wb") as f:
                f.write(data)
        values = "raw label values" if self.raw_values is not None else "class indices"
        return f"{len(self._images)} label map(s) (PNG, pixel = {values})"

    def image_scores(self) -> dict[int, float]:
        """The mIoU of each image alone (``nan`` for an image without a scored pixel)."""
        scores = {}
        k = self.num_classes
        for image_id, entry in self._images.items():
            flat = torch.zeros(k * k, dtype=torch.int64)
            flat.index_add_(0, entry[0].cpu(), entry[1].cpu())
            scores[image_id] = segmentation_metrics(flat.view(k, k), self.class_names, per_class=False)["mIoU"]
        return scores

    def draw_image(self, image_id: int, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
        """The image as the model saw it (``dataset[image_id]``) coloured by its label map, and by
        the predicted one."""
        from segkit.data.show import draw_target
        from segkit.visualize import draw_semantic

        image, target = dataset[image_id]
        predicted = _decode_png(self._prediction(image_id)[1])
        truth = draw_target(image, target, self.class_names, ignore_index=self.ignore_index)
        return truth, draw_semantic(image, predicted, self.class_names)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
                f"per_class={self.per_class}, processed_images={len(self._images)})")


# -------------------------------------------------------------------- helpers
def _label_map_name(target: Mapping[str, Any], image_id: int) -> str:
    name = target.get("file_name")
    return label_map_name(name) if isinstance(name, str) and name else str(image_id)


def label_map_name(file_name: str) -> str:
    """The name (without ``.png``) of an image's predicted label map: the stem of its ``file_name``
    relative to the dataset's image folder, folders joined with ``_``."""
    return os.path.splitext(file_name)[0].replace(os.sep, "_").replace("/", "_")


def _decode_png(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data))).astype(np.int64)


def _check_num_classes(num_classes: Any) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")


def _dataset_classes(dataset: Any, num_classes: int | None) -> tuple[int, list[str]]:
    """K and the class names, from the dataset and an optional override."""
    classes = getattr(dataset, "classes", None)
    if num_classes is None:
        num_classes = getattr(dataset, "num_classes", None)
    if num_classes is None and classes is not None:
        num_classes = len(classes)
    if num_classes is None:
        raise ValueError(f"SemSegEvaluator needs the number of classes: {type(dataset).__name__} has neither "
                         f"'num_classes' nor 'classes'; set evaluation.num_classes.")
    _check_num_classes(num_classes)
    if classes is not None and len(classes) != num_classes:
        raise ValueError(f"num_classes={num_classes} but the dataset has {len(classes)} classes {list(classes)[:5]}...; "
                         f"remove evaluation.num_classes or make it equal the dataset's.")
    return int(num_classes), _class_names(classes, int(num_classes))


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a {num_classes}-class confusion matrix.")
    if len(set(names)) != len(names):
        repeated = sorted({n for i, n in enumerate(names) if n in names[:i]})
        raise ValueError(f"class names must be distinct to name per-class metrics; repeated: {repeated}.")
    return names


def _concat_cpu(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One int64 CPU tensor from 1-D tensors on any devices, with one transfer per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_device.setdefault(tensor.device, []).append(tensor)
    parts = [torch.cat(group).cpu() for group in by_device.values()]
    return torch.cat(parts).long() if parts else torch.zeros(0, dtype=torch.int64)


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan
