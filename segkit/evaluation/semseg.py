"""Semantic-segmentation metrics from a confusion matrix: mIoU, pixel and class accuracy.

Metric names (fractions in [0, 1], as every segkit metric):

* ``aAcc``: pixel accuracy over the pixels that are not ignored;
* ``mIoU``, ``mAcc``: mean of the per-class IoU / accuracy over the classes for which it is defined
  (MMSegmentation's convention): a class absent from both the ground truth and the predictions has
  no IoU, a class absent from the ground truth no accuracy;
* ``fwIoU``: IoU weighted by each class's share of the ground-truth pixels;
* ``mIoU_all`` and ``pixAcc``: PyTorch-Encoding's convention, in which the EncNet paper reports its
  numbers: ``mean_k TP_k / (union_k + eps)`` over **all** K classes (an absent class counts as 0)
  and ``TP / (labelled pixels + eps)``, with ``eps = np.spacing(1)``;
* ``IoU-<class>``, ``Acc-<class>`` per class (NaN where undefined), with ``per_class=True``.

Distributed evaluation: each image's confusion matrix is kept by ``image_id`` (only its non-zero
entries, moved to the CPU), so the distributed sampler's padding duplicates collapse when the
processes' states are merged and the numbers equal a single-process evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segkit.registry import EVALUATORS

__all__ = ["SemSegEvaluator", "confusion_matrix", "segmentation_metrics"]


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """Count (ground truth, prediction) pairs over the pixels whose target is not ``ignore_index``.

    Args:
        pred: integer Tensor of predicted class indices, any shape.
        target: integer Tensor of the same shape, class indices or ``ignore_index``.
        num_classes: K.
        ignore_index: target value of pixels that are not scored.

    Returns:
        int64 Tensor[K, K] on the inputs' device; rows are ground truth, columns predictions.

    Raises:
        ValueError: shapes differ, or a value is outside ``0..K-1`` (and, in the target, is not
            ``ignore_index``); the message lists the offending values.

    Example:
        >>> confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 255]), 2)
        tensor([[1, 0],
                [0, 1]])
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from the label shape {tuple(target.shape)}")
    keep = target != ignore_index
    target = target[keep].long()
    pred = pred[keep].long()
    for name, values in (("label", target), ("prediction", pred)):
        bad = (values < 0) | (values >= num_classes)
        if bool(bad.any()):
            found = torch.unique(values[bad])[:10].tolist()
            raise ValueError(f"{name} values {found} are outside the {num_classes} classes 0..{num_classes - 1}"
                             + (f" and are not the ignore value {ignore_index}" if name == "label" else ""))
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def segmentation_metrics(confusion: torch.Tensor | np.ndarray, class_names: Sequence[str] | None = None,
                         *, per_class: bool = True) -> dict[str, float]:
    """The metrics of the module docstring from a confusion matrix (rows ground truth).

    Args:
        confusion: Tensor or array [K, K] of counts.
        class_names: K names for the per-class keys (default ``"0"``..``"K-1"``).
        per_class: include ``IoU-<class>`` and ``Acc-<class>``.

    Returns:
        ``{"aAcc", "mIoU", "mAcc", "fwIoU", "mIoU_all", "pixAcc", ...}``; NaN where nothing is defined
        (no labelled pixel at all).
    """
    cm = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion, dtype=np.float64)
    num_classes = cm.shape[0]
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a {num_classes}-class confusion matrix")
    tp, gt, pred = np.diag(cm), cm.sum(1), cm.sum(0)
    union = gt + pred - tp
    total = cm.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    eps = np.spacing(1)
    metrics = {
        "aAcc": float(tp.sum() / total) if total > 0 else math.nan,
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "fwIoU": float(np.nansum(gt / total * iou)) if total > 0 else math.nan,
        "mIoU_all": float(np.mean(tp / (union + eps))),
        "pixAcc": float(tp.sum() / (total + eps)),
    }
    if per_class:
        metrics.update({f"IoU-{n}": float(v) for n, v in zip(names, iou)})
        metrics.update({f"Acc-{n}": float(v) for n, v in zip(names, acc)})
    return metrics


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


@EVALUATORS.register()
class SemSegEvaluator:
    """mIoU, pixel and class accuracy of ``sem_seg`` predictions against the dataset's label maps.

    Args:
        dataset: the evaluated dataset; gives ``num_classes``, ``classes`` and ``ignore_index``.
        num_classes: K, when the dataset does not say (or to override it).
        ignore_index: label value that is not scored (default: the dataset's, else 255).
        per_class: also report ``IoU-<class>`` and ``Acc-<class>``.

    Example:
        >>> evaluator = SemSegEvaluator(dataset=ShapesSegmentation(split="val", num_images=4))
        >>> evaluator.process(targets, model(images))  # per batch
        >>> evaluator.evaluate()["mIoU"]
    """

    def __init__(self, *, dataset: Any, num_classes: int | None = None, ignore_index: int | None = None,
                 per_class: bool = True) -> None:
        num_classes = num_classes if num_classes is not None else getattr(dataset, "num_classes", None)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"SemSegEvaluator needs num_classes (a positive int) from the dataset or the config, "
                             f"got {num_classes!r}")
        self.num_classes = num_classes
        if ignore_index is None:
            ignore_index = getattr(dataset, "ignore_index", 255)
        self.ignore_index = int(ignore_index)
        classes = getattr(dataset, "classes", None)
        self.class_names = [str(c) for c in classes] if classes is not None and len(classes) == num_classes else None
        self.per_class = bool(per_class)
        self._images: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def reset(self) -> None:
        """Forget every processed image."""
        self._images = {}

    def process(self, targets: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Score a batch: ``targets[i]["sem_seg"]`` (int64 Tensor[H, W]) and ``image_id`` against
        ``outputs[i]["sem_seg"]`` (float Tensor[K, H', W'] scores; resized to H x W if they differ)."""
        for index, (target, output) in enumerate(zip(targets, outputs)):
            scores = output["sem_seg"]
            if scores.dim() != 3 or scores.shape[0] != self.num_classes:
                raise ValueError(f"output {index}: sem_seg must be Tensor[K={self.num_classes}, H, W] scores, "
                                 f"got shape {tuple(scores.shape)}")
            label = torch.as_tensor(target["sem_seg"]).to(scores.device)
            if tuple(scores.shape[-2:]) != tuple(label.shape[-2:]):
                scores = F.interpolate(scores[None].float(), size=tuple(label.shape[-2:]), mode="bilinear",
                                       align_corners=False)[0]
            cm = confusion_matrix(scores.argmax(0), label, self.num_classes, self.ignore_index).flatten()
            nonzero = torch.nonzero(cm).squeeze(1)
            image_id = int(target.get("image_id", len(self._images)))
            self._images[image_id] = (nonzero.to(torch.int32).cpu().numpy(), cm[nonzero].cpu().numpy())

    def state(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Picklable per-image confusion entries, keyed by image id."""
        return dict(self._images)

    def merge(self, states: Sequence[Mapping[int, tuple[np.ndarray, np.ndarray]]]) -> None:
        """Take the images of every process's :meth:`state`; an image seen twice counts once."""
        merged: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for state in states:
            merged.update(state)
        self._images = merged

    @property
    def confusion(self) -> np.ndarray:
        """The summed confusion matrix int64 [K, K] (rows ground truth) of the processed images."""
        flat = np.zeros(self.num_classes * self.num_classes, dtype=np.int64)
        for index, counts in self._images.values():
            np.add.at(flat, index, counts)
        return flat.reshape(self.num_classes, self.num_classes)

    def evaluate(self) -> dict[str, float]:
        """The metrics of the processed images (see the module docstring)."""
        return segmentation_metrics(self.confusion, self.class_names, per_class=self.per_class)

    def __repr__(self) -> str:
        return f"SemSegEvaluator(num_classes={self.num_classes}, ignore_index={self.ignore_index}, images={len(self._images)})"

