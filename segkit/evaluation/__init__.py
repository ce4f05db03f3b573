"""Evaluators and the helpers that run them across processes.

Names are imported on first use, so ``import segkit.evaluation`` stays cheap and does not load
pycocotools until a COCO name is asked for.

Example:
    >>> from segkit.evaluation import CocoEvaluator, format_metrics_table
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Evaluator",
    "CocoEvaluator",
    "COCO_METRIC_NAMES",
    "SemSegEvaluator",
    "VOCEvaluator",
    "evaluate_voc",
    "voc_ap",
    "confusion_matrix",
    "segmentation_metrics",
    "encode_masks",
    "evaluate_coco_results",
    "format_metrics_table",
    "all_gather_objects",
    "broadcast_object",
    "evaluate_distributed",
]

_LOCATIONS = {
    "Evaluator": "segkit.evaluation.base",
    "CocoEvaluator": "segkit.evaluation.coco",
    "SemSegEvaluator": "segkit.evaluation.semseg",
    "VOCEvaluator": "segkit.evaluation.voc",
    "evaluate_voc": "segkit.evaluation.voc",
    "voc_ap": "segkit.evaluation.voc",
    "confusion_matrix": "segkit.evaluation.semseg",
    "segmentation_metrics": "segkit.evaluation.semseg",
    "COCO_METRIC_NAMES": "segkit.evaluation.table",
    "encode_masks": "segkit.evaluation.coco",
    "evaluate_coco_results": "segkit.evaluation.coco",
    "format_metrics_table": "segkit.evaluation.table",
    "all_gather_objects": "segkit.evaluation.distributed",
    "broadcast_object": "segkit.evaluation.distributed",
    "evaluate_distributed": "segkit.evaluation.distributed",
}


def __getattr__(name: str) -> Any:
    module = _LOCATIONS.get(name)
    if module is None:
        raise AttributeError(f"module 'segkit.evaluation' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
