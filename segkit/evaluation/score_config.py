"""Scoring predictions against the ground truth of a config's data split (``segkit score --config``).

``segkit eval CKPT --results PATH`` writes what the evaluation predicted; scoring ``PATH`` here with
the same config (the one the checkpoint carries, with the same overrides) and split gives the
numbers ``segkit eval`` printed, exactly: the same images (those of the split, so an image without
detections counts its objects as missed), ground truth, evaluator settings (``evaluation.iou_types``,
``per_class``, ``backend``) and class names.

* COCO (``CocoEvaluator``): ``PATH`` is a COCO results JSON whose ``image_id`` / ``category_id`` are
  the dataset's; each iou type of the config (or ``task``) is scored, masks without their boxes.
* Semantic segmentation (``SemSegEvaluator``): ``PATH`` is a folder of label maps
  ``<image file stem>.png`` in the dataset's raw label values; they are mapped to class indices as
  the dataset maps its own label files (``reduce_zero_label``, ``label_map``) and compared with them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from segkit.errors import UserError

__all__ = ["score_config", "evaluator_type"]


def evaluator_type(cfg: Mapping[str, Any]) -> str:
    """The evaluator ``type`` a config evaluates with (``evaluation.type``, else the model's default)."""
    from segkit.models.base import check_model_class
    from segkit.registry import MODELS

    evaluation = cfg.get("evaluation") or {}
    if evaluation.get("type"):
        return str(evaluation["type"])
    return check_model_class(MODELS.get(str(cfg["model"]["type"]), key="model.type")).default_evaluator


def score_config(cfg: Mapping[str, Any], pred: str, *, split: str = "val", task: str | None = None,
                 per_class: bool = False, backend: str | None = None) -> dict[str, float]:
    """Score ``pred`` against the ground truth of ``cfg``'s ``data.<split>``, as ``segkit eval`` scores.

    Args:
        cfg: a merged config (e.g. the one a checkpoint carries).
        pred: a COCO results JSON or a folder of label maps (see the module docstring).
        split: ``"val"`` or ``"test"`` (as ``segkit eval --split``).
        task: ``"bbox"``, ``"segm"`` or ``"semseg"``; default: what the config evaluates.
        per_class: add per-class numbers even if the config's evaluation does not ask for them.
        backend: the COCO backend; default the config's ``evaluation.backend`` (else ``"auto"``).

    Raises:
        UserError: a config without that split, an evaluator that has no results format, or
            results that do not fit the ground truth (naming the file).
    """
    from segkit.engine.datamodule import build_datamodule

    evaluation = dict(cfg.get("evaluation") or {})
    kind = evaluator_type(cfg)
    datamodule = build_datamodule(cfg)
    if datamodule.split_cfgs.get(split) is None:
        raise UserError(f"the config has no data.{split} to take the ground truth from; use --split val or --gt.")
    dataset = datamodule.build_dataset(split)
    per_class = per_class or bool(evaluation.get("per_class", kind == "SemSegEvaluator"))
    if kind == "CocoEvaluator" and task in (None, "bbox", "segm"):
        iou_types = [task] if task else list(_as_list(evaluation.get("iou_types", ["bbox"])))
        return _score_coco_dataset(dataset, pred, iou_types=iou_types, per_class=per_class,
                                   backend=backend or str(evaluation.get("backend", "auto")))
    if kind == "SemSegEvaluator" and task in (None, "semseg"):
        return _score_semseg_dataset(dataset, pred, per_class=per_class)
    wanted = f"--task {task} with " if task else ""
    raise UserError(f"segkit score --config scores COCO (CocoEvaluator) and semantic (SemSegEvaluator) evaluations; "
                    f"{wanted}this config evaluates with {kind}. Score with --gt and --task instead.")


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _score_coco_dataset(dataset: Any, pred: str, *, iou_types: list[str], per_class: bool,
                        backend: str) -> dict[str, float]:
    from segkit.data.coco import check_ground_truth_masks
    from segkit.evaluation.coco import evaluate_coco_results
    from segkit.evaluation.score import check_scored_ground_truth, mask_results, read_coco_results

    coco = dataset.coco
    source = str(getattr(dataset, "ann_file", "the dataset's ground truth"))
    names = None
    if per_class:
        names = {cat: str(dataset.classes[label - 1]) for label, cat in sorted(dataset.label_to_cat_id.items())
                 if cat in coco.cats}
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        check_scored_ground_truth(coco, iou_type, source)
        sizes = None
        if iou_type == "segm":
            check_ground_truth_masks(coco, source)
            sizes = {image_id: (info["height"], info["width"]) for image_id, info in coco.imgs.items()}
        records = read_coco_results(pred, iou_type=iou_type, image_ids=list(coco.imgs), category_ids=list(coco.cats),
                                    image_sizes=sizes)
        metrics.update(evaluate_coco_results(coco, mask_results(records, iou_type), iou_type=iou_type,
                                             image_ids=list(dataset.image_ids), class_names=names, backend=backend))
    return metrics


def _score_semseg_dataset(dataset: Any, pred_dir: str, *, per_class: bool) -> dict[str, float]:
    from segkit.data.semseg import read_label_map
    from segkit.evaluation.score import ScoreError, label_files, accumulate_pairs, check_label_pair
    from segkit.evaluation.semseg import label_map_name, segmentation_metrics

    num_classes, ignore_index = int(dataset.num_classes), int(dataset.ignore_index)
    files = label_files(pred_dir, "prediction")
    names = [label_map_name(os.path.relpath(dataset.image_path(i), dataset.img_dir)) for i in range(len(dataset))]
    absent = [n for n in names if n not in files]
    if absent:
        raise ScoreError(f"{len(absent)} image(s) of the split have no label map in '{pred_dir}' "
                         f"({', '.join(absent[:5])}); label maps are named after the image files' stems.")
    total = np.zeros(num_classes * num_classes, dtype=np.int64)
    for index, name in enumerate(names):
        gt = dataset.load_label(index).astype(np.int64)
        pred = dataset.class_indices(read_label_map(files[name]).astype(np.int64))
        check_label_pair(gt, pred, gt_file=dataset.label_path(index), pred_file=files[name], num_classes=num_classes,
                         ignore_index=ignore_index)
        accumulate_pairs(total, gt, pred, num_classes, ignore_index)
    return segmentation_metrics(total.reshape(num_classes, num_classes), list(dataset.classes), per_class=per_class)

