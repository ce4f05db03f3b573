"""Terminal rendering of metric dictionaries (COCO tables, per-class APs, segmentation IoU tables, other metrics)."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

__all__ = ["COCO_METRIC_NAMES", "SEMSEG_METRIC_NAMES", "format_metrics_table"]

# The 12 standard COCO numbers, in pycocotools' order; metric keys are "<iou type>/<name>".
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# Semantic segmentation's summary numbers, printed on one row (see segkit.evaluation.semseg).
SEMSEG_METRIC_NAMES = ("aAcc", "mIoU", "mAcc", "fwIoU", "mIoU_all", "pixAcc")


def format_metrics_table(metrics: Mapping[str, float]) -> str:
    """Render metrics for a terminal.

    COCO numbers become one row per iou type under the 12 column names, per-class APs a
    ``class  AP`` listing (three pairs a line) per iou type, segmentation's per-class
    ``IoU-<class>`` / ``Acc-<class>`` a ``class  IoU  Acc`` table with its summary numbers on one row
    below, and any other metric one ``name  value`` line. Values print with 3 decimals, as
    pycocotools prints them.

    Example:
        >>> print(format_metrics_table({"bbox/AP": 0.5, "mIoU": 0.7}))
    """
    rows: dict[str, dict[str, float]] = {}
    per_class: dict[str, list[tuple[str, float]]] = {}
    others: list[tuple[str, float]] = []
    seg_classes: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        prefix, sep, name = key.partition("/")
        if key.startswith(("IoU-", "Acc-")):
            seg_classes.setdefault(key[4:], {})[key[:3]] = value
        elif key in SEMSEG_METRIC_NAMES:
            continue
        elif sep and name in COCO_METRIC_NAMES:
            rows.setdefault(prefix, {})[name] = value
        elif sep and name.startswith("AP-"):
            per_class.setdefault(prefix, []).append((name[3:], value))
        else:
            others.append((key, value))
    blocks: list[str] = []
    if rows:
        table = [["", *COCO_METRIC_NAMES]]
        table += [[prefix, *(_format_value(values.get(n)) for n in COCO_METRIC_NAMES)] for prefix, values in rows.items()]
        blocks.append(_align(table))
    for prefix, items in per_class.items():
        pairs = [[name, _format_value(value)] for name, value in items]
        table = [["class", "AP"] * min(3, len(pairs))]
        table += [sum(pairs[i:i + 3], []) for i in range(0, len(pairs), 3)]
        blocks.append(f"{prefix} AP per class\n{_align(table, text_columns={0, 2, 4})}")
    if seg_classes:
        table = [["class", "IoU", "Acc"]]
        table += [[name, _format_value(v.get("IoU")), _format_value(v.get("Acc"))] for name, v in seg_classes.items()]
        blocks.append(_align(table))
    summary = [name for name in SEMSEG_METRIC_NAMES if name in metrics]
    if summary:
        blocks.append(_align([summary, [_format_value(metrics[name]) for name in summary]], text_columns=()))
    if others:
        blocks.append(_align([[key, _format_value(value)] for key, value in others], text_columns={0}))
    return "\n\n".join(blocks)


def _format_value(value: float | None) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else f"{value:.3f}"


def _align(table: list[list[str]], *, text_columns: Collection[int] = (0,)) -> str:
    width = max(len(row) for row in table)
    table = [row + [""] * (width - len(row)) for row in table]
    widths = [max(len(row[i]) for row in table) for i in range(width)]
    lines = [
        "  ".join(cell.ljust(w) if i in text_columns else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in table
    ]
    return "\n".join(line.rstrip() for line in lines)
