"""Class weights for a segmentation loss from the training labels: median-frequency balancing.

Eigen and Fergus (2015), as SegNet trains on CamVid: the frequency of class c is the number of its
pixels divided by the number of labelled pixels of the images where c occurs, and its weight is the
median of the frequencies divided by that frequency. Rare classes get weights above 1, the most
common below. A class that occurs in no image gets weight 0 (there is nothing to weight).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from segkit.errors import DatasetError
from segkit.ops.seg_losses import MEDIAN_FREQUENCY

__all__ = ["class_pixel_counts", "median_frequency_weights", "resolve_class_weights", "uses_median_frequency",
           "without_median_frequency"]


def class_pixel_counts(dataset: Any, *, progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of each class, and labelled pixels of the images where each class occurs, over ``dataset``.

    Args:
        dataset: a label-map dataset (``load_label(i)``, ``num_classes``, ``ignore_index``), e.g. a
            :class:`~segkit.data.semseg.SemSegFolder`; the label maps are read before any transform.
        progress: show a progress bar (``None``: only on a terminal).

    Returns:
        Two int64 arrays ``[K]``: ``class_pixels`` and ``image_pixels``.

    Raises:
        DatasetError: the dataset has no label maps.
    """
    if not callable(getattr(dataset, "load_label", None)):
        raise DatasetError(f"{type(dataset).__name__} has no label maps (load_label); class weights are computed "
                           f"from a semantic-segmentation dataset's labels")
    num_classes = int(dataset.num_classes)
    ignore_index = int(getattr(dataset, "ignore_index", 255))
    class_pixels = np.zeros(num_classes, dtype=np.int64)
    image_pixels = np.zeros(num_classes, dtype=np.int64)
    disable = None if progress is None else not progress  # None: tqdm shows the bar only on a terminal
    for index in tqdm(range(len(dataset)), desc="class frequencies", unit="img", disable=disable, leave=False):
        labels = np.asarray(dataset.load_label(index)).ravel()
        labels = labels[(labels != ignore_index) & (labels >= 0) & (labels < num_classes)]
        counts = np.bincount(labels.astype(np.int64), minlength=num_classes)
        class_pixels += counts
        image_pixels[counts > 0] += labels.size
    return class_pixels, image_pixels


def median_frequency_weights(class_pixels: np.ndarray, image_pixels: np.ndarray) -> list[float]:
    """Median-frequency weights ``median(f) / f_c`` with ``f_c = class_pixels[c] / image_pixels[c]``; the
    median is over the classes that occur, and a class that does not occur gets 0.

    Example:
        >>> median_frequency_weights(np.array([90, 10]), np.array([100, 100]))
        [0.5555555555555556, 5.0]
    """
    class_pixels = np.asarray(class_pixels, dtype=np.float64)
    image_pixels = np.asarray(image_pixels, dtype=np.float64)
    present = class_pixels > 0
    if not present.any():
        raise DatasetError("no labelled pixel in the dataset: class weights cannot be computed")
    frequency = np.zeros_like(class_pixels)
    frequency[present] = class_pixels[present] / image_pixels[present]
    median = float(np.median(frequency[present]))
    return [float(median / f) if f > 0 else 0.0 for f in frequency]


def uses_median_frequency(model_cfg: Any) -> bool:
    """Whether some ``loss:`` term of a model config asks for ``class_weight: median_frequency``."""
    return bool(_median_frequency_terms(model_cfg))


def resolve_class_weights(cfg: Mapping[str, Any], dataset: Any, *, progress: bool | None = None) -> Mapping[str, Any]:
    """``cfg`` (a copy) with every ``class_weight: median_frequency`` under ``model`` replaced by the weights
    of ``dataset`` (the training set); ``cfg`` itself when none asks for them."""
    if not uses_median_frequency(cfg.get("model")):
        return cfg
    resolved = copy.deepcopy(cfg)
    weights = median_frequency_weights(*class_pixel_counts(dataset, progress=progress))
    for term in _median_frequency_terms(resolved.get("model")):
        term["class_weight"] = list(weights)
    return resolved


def without_median_frequency(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    """``cfg`` (a copy) with every ``class_weight: median_frequency`` removed (the terms unweighted): for timing
    a model when its training labels cannot be read; ``cfg`` itself when none asks for them."""
    if not uses_median_frequency(cfg.get("model")):
        return cfg
    resolved = copy.deepcopy(cfg)
    for term in _median_frequency_terms(resolved.get("model")):
        del term["class_weight"]
    return resolved


def _median_frequency_terms(node: Any, depth: int = 0) -> list[dict[str, Any]]:
    """The ``loss:`` term mappings under ``node`` whose ``class_weight`` is ``median_frequency``."""
    found: list[dict[str, Any]] = []
    if depth > 32:  # configs are shallow; bound the walk over hostile input
        return found
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "loss":
                for term in value if isinstance(value, list) else [value]:
                    if isinstance(term, dict) and term.get("class_weight") == MEDIAN_FREQUENCY:
                        found.append(term)
            else:
                found += _median_frequency_terms(value, depth + 1)
    elif isinstance(node, list):
        for value in node:
            found += _median_frequency_terms(value, depth + 1)
    return found
