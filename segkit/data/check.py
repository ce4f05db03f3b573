"""Dataset checks behind ``segkit data check``: every problem of every split, counted and named.

The checks read the user's records, not the transformed samples: the COCO dictionary
(``dataset.coco.dataset``; for VOC the one built from the XML files), the image files and, for
semantic segmentation, the label maps. Every image is decoded in full (with
:func:`~segkit.data.coco.load_image`, as training reads it), so a corrupt file is found; nothing
stops at the first problem.

Problem kinds (:data:`PROBLEM_KINDS`), each an error unless marked as a warning:

* ``build_failed``: the dataset cannot be built (the constructor raised; the message says why).
* ``bad_annotation_file``: a VOC XML file that cannot be read (every such file of the split).
* ``missing_image``, ``corrupt_image``: an image file that does not exist or cannot be decoded.
* ``image_size``: the decoded image's height and width differ from the annotation's.
* ``unknown_image``: an annotation whose ``image_id`` is not in ``images``.
* ``unknown_category``: an annotation whose category is not in ``categories`` (or not in the
  dataset's ``category_ids``).
* ``degenerate_box``: a ``bbox`` that is not four finite numbers, or has zero or negative width or
  height.
* ``box_outside``: a box reaching more than :data:`BOX_TOLERANCE` px outside its image.
* ``invalid_mask``: a malformed ``segmentation`` (checked as the dataset does with masks), or a
  missing one when the config asks for masks.
* ``mask_box_mismatch``: an instance mask whose tight box differs from the annotated box by more
  than :data:`MASK_BOX_TOLERANCE` px on a side, or overlaps it with an IoU below
  :data:`MASK_BOX_MIN_IOU` (an empty mask too). Only annotations that have a mask are checked.
* ``empty_image`` (warning): an image without any annotation (training splits with
  ``skip_empty`` leave such images out; evaluation counts them).
* ``corrupt_label``, ``label_values``, ``label_size``: a label map that cannot be read as an index
  image, that holds values which are neither a class nor the ignore value, or whose size differs
  from its image's.
* ``bad_sample``: for dataset types the checker does not know, a sample that raises when loaded.

A dataset whose constructor refuses its data (an unknown category, a bad mask, a malformed VOC XML
file) is reported as ``build_failed`` with the constructor's message; the check then goes on from
the raw files where it can: a config with ``ann_file`` and ``img_dir`` (COCO) is scanned from the
JSON file as above, a VOC config (``root``, ``split``) gets every unreadable XML file listed (its
images are checked once the XML files read).

Example:
    >>> reports = check_config(segkit.load_config("configs/quickstart_mask.yaml"), splits=["val"])
    >>> print(format_report(reports))
"""

from __future__ import annotations

import os
import textwrap
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from segkit.config import config_errors
from segkit.config_types import is_finite_number
from segkit.data.coco import CocoDataset
from segkit.data.coco_masks import mask_problem, to_rle
from segkit.data.images import load_image
from segkit.errors import ConfigError, DatasetError, UserError

__all__ = ["PROBLEM_KINDS", "Problem", "SplitReport", "check_config", "check_dataset", "format_report"]

ERROR, WARNING = "error", "warning"

#: ``kind: (severity, description)`` of every problem the checker reports, in report order.
PROBLEM_KINDS: dict[str, tuple[str, str]] = {
    "build_failed": (ERROR, "dataset cannot be built"),
    "num_classes": (ERROR, "the model's num_classes differs from the dataset's classes"),
    "bad_annotation_file": (ERROR, "unreadable annotation file"),
    "missing_image": (ERROR, "missing image file"),
    "corrupt_image": (ERROR, "corrupt or undecodable image"),
    "image_size": (ERROR, "image size differs from the annotation"),
    "unknown_image": (ERROR, "annotation of an unknown image"),
    "unknown_category": (ERROR, "annotation with an unknown category"),
    "degenerate_box": (ERROR, "malformed or degenerate box"),
    "box_outside": (ERROR, "box outside the image"),
    "invalid_mask": (ERROR, "missing or malformed mask"),
    "mask_box_mismatch": (ERROR, "mask disagrees with its box"),
    "corrupt_label": (ERROR, "unreadable label map"),
    "label_values": (ERROR, "label-map values outside the classes"),
    "label_size": (ERROR, "label map size differs from the image"),
    "bad_sample": (ERROR, "sample cannot be loaded"),
    "empty_image": (WARNING, "image without annotations"),
}
#: Pixels a box may reach outside its image before it counts as ``box_outside``.
BOX_TOLERANCE = 1.0
#: Pixels a side of a mask's tight box may differ from the annotated box's.
MASK_BOX_TOLERANCE = 4.0
#: Lowest IoU of a mask's tight box with the annotated box.
MASK_BOX_MIN_IOU = 0.5
_SHOW = 5
_SPLITS = ("train", "val", "test")


@dataclass
class Problem:
    """One offending record.

    Attributes:
        kind: a key of :data:`PROBLEM_KINDS`.
        file: the file holding the record (image, annotation JSON / XML, label map).
        message: what is wrong.
        image_id: the image id (COCO id; sample index for label-map datasets), if any.
        annotation: the annotation (``"annotation id 7"``, VOC ``"object 2 (dog)"``), if any.
    """

    kind: str
    file: str
    message: str
    image_id: Any = None
    annotation: str | None = None

    def describe(self, *, with_file: bool = True) -> str:
        """``file (image id 3, annotation id 7): message`` (without the file: ``image id 3, ...: message``)."""
        ids = [f"image id {self.image_id}"] if self.image_id is not None else []
        ids += [self.annotation] if self.annotation else []
        if with_file and self.file:
            where = self.file + (f" ({', '.join(ids)})" if ids else "")
        else:
            where = ", ".join(ids)
        return f"{where}: {self.message}" if where else self.message


@dataclass
class SplitReport:
    """What :func:`check_dataset` found in one split.

    Attributes:
        split: ``train``, ``val`` or ``test``.
        dataset: the dataset type.
        source: the annotation file or folder checked.
        num_images / num_annotations: counted in the records checked (``None``: unknown).
        annotation_unit: what ``num_annotations`` counts (``"annotations"``, ``"label maps"``).
        total_images: images of the split, when ``max_images`` checked fewer.
        problems: every problem found, by kind.
    """

    split: str
    dataset: str
    source: str = ""
    num_images: int | None = None
    num_annotations: int | None = None
    total_images: int | None = None
    annotation_unit: str = "annotations"
    problems: dict[str, list[Problem]] = field(default_factory=dict)

    def add(self, problem: Problem) -> None:
        self.problems.setdefault(problem.kind, []).append(problem)

    def count(self, severity: str) -> int:
        """Number of problems of ``severity`` (``"error"`` or ``"warning"``)."""
        return sum(len(found) for kind, found in self.problems.items() if PROBLEM_KINDS[kind][0] == severity)

    @property
    def errors(self) -> int:
        return self.count(ERROR)

    @property
    def warnings(self) -> int:
        return self.count(WARNING)


# ------------------------------------------------------------------------------------ entry points
def check_config(cfg: Mapping[str, Any], *, splits: Sequence[str] | None = None, max_images: int | None = None,
                 progress: bool | None = None) -> list[SplitReport]:
    """Check the datasets of ``cfg["data"]``.

    Args:
        cfg: a loaded config.
        splits: the splits to check; ``None``: every split the config defines.
        max_images: check only the first ``max_images`` images of each split.
        progress: progress bars (``None``: when writing to a terminal).

    Raises:
        ConfigError: the ``data`` section is malformed, defines no dataset, or lacks a requested split.
    """
    from segkit.engine.datamodule import build_datamodule

    if max_images is not None and max_images < 1:
        raise UserError(f"max_images must be at least 1, got {max_images}.")
    datamodule = build_datamodule(cfg)
    defined = [s for s in _SPLITS if datamodule.split_cfgs.get(s) is not None]
    if not defined:
        raise ConfigError("the config defines no dataset (data.train, data.val or data.test)", key="data")
    for split in splits or ():
        if split not in defined:
            raise ConfigError(f"the config defines no '{split}' dataset (data.{split}); it defines "
                              f"{', '.join(defined)}.", key=f"data.{split}")
    reports = []
    for split in splits or defined:
        split_cfg = datamodule.split_cfgs[split]
        report = SplitReport(split=split, dataset=str(split_cfg.get("type")))
        try:
            with warnings.catch_warnings(), config_errors(cfg):
                warnings.simplefilter("ignore")  # dropped boxes etc. are reported below, record by record
                dataset = datamodule.build_dataset(split)
        except (UserError, OSError) as exc:
            report.source = _config_source(split_cfg)
            report.add(Problem("build_failed", "", str(exc)))
            _check_unbuilt(report, split_cfg, max_images=max_images, progress=progress)
        else:
            _check_model_classes(cfg, dataset, split, report)
            check_dataset(dataset, report, max_images=max_images, progress=progress)
        reports.append(report)
    return reports


def check_dataset(dataset: Any, report: SplitReport, *, max_images: int | None = None,
                  progress: bool | None = None) -> SplitReport:
    """Add the problems of a built dataset to ``report`` (COCO family, label-map folders, or any other)."""
    from segkit.data.semseg import SemSegFolder
    from segkit.data.voc import VOCDetection

    if isinstance(dataset, CocoDataset):
        report.source = dataset.ann_file
        voc = isinstance(dataset, VOCDetection)
        _scan_coco(report, dataset.coco.dataset, img_dir=dataset.img_dir, category_ids=set(dataset.cat_id_to_label),
                   with_masks=dataset.with_masks, source=dataset.annotation_source,
                   name_annotation=_voc_object_name(dataset.classes) if voc else _coco_annotation_name,
                   max_images=max_images, progress=progress)
    elif isinstance(dataset, SemSegFolder):
        report.source = dataset.img_dir
        _scan_label_maps(report, dataset, max_images=max_images, progress=progress)
    else:
        _scan_samples(report, dataset, max_images=max_images, progress=progress)
    return report


def _check_model_classes(cfg: Mapping[str, Any], dataset: Any, split: str, report: SplitReport) -> None:
    """Report a ``num_classes`` in the config's model that differs from the dataset's classes (what
    ``segkit train`` would refuse)."""
    from segkit.engine.module import check_num_classes

    model = cfg.get("model")
    if not isinstance(model, Mapping):
        return
    try:
        check_num_classes(model, dataset, split=split)
    except ConfigError as exc:
        report.add(Problem("num_classes", getattr(cfg, "filename", "") or "", exc.message))


def _config_source(cfg: Mapping[str, Any]) -> str:
    for key in ("ann_file", "root", "img_dir"):
        if isinstance(cfg.get(key), str):
            return cfg[key]
    return ""


def _check_unbuilt(report: SplitReport, cfg: Mapping[str, Any], *, max_images: int | None,
                   progress: bool | None) -> None:
    """Go on from the raw files of a dataset whose constructor refused them (see the module docstring)."""
    from segkit.data.coco import read_coco
    from segkit.data.voc import VOCDetection
    from segkit.registry import DATASETS

    try:
        cls = DATASETS.get(str(cfg.get("type")))
    except ConfigError:
        return
    if isinstance(cls, type) and issubclass(cls, VOCDetection) and "root" in cfg and "ann_file" not in cfg:
        _scan_voc_files(report, cfg)
        return
    if not (isinstance(cls, type) and issubclass(cls, CocoDataset)
            and isinstance(cfg.get("ann_file"), str) and isinstance(cfg.get("img_dir"), str)):
        return
    try:
        data = read_coco(cfg["ann_file"]).dataset
    except DatasetError:
        return  # the JSON itself is unreadable: build_failed already says why
    category_ids = cfg.get("category_ids")
    known = ({int(c) for c in category_ids} if isinstance(category_ids, (list, tuple))
             and all(isinstance(c, int) for c in category_ids) else {c["id"] for c in data["categories"]})
    _scan_coco(report, data, img_dir=cfg["img_dir"], category_ids=known, with_masks=bool(cfg.get("with_masks")),
               source=lambda image_id: cfg["ann_file"], name_annotation=_coco_annotation_name,
               max_images=max_images, progress=progress)


def _scan_voc_files(report: SplitReport, cfg: Mapping[str, Any]) -> None:
    """Every unreadable XML file of a VOC split (each is a ``bad_annotation_file``)."""
    from segkit.data.voc import VOC_DETECTION_CLASSES, read_split_ids, parse_voc_xml

    roots = [cfg["root"]] if isinstance(cfg["root"], str) else list(cfg["root"])
    split = cfg.get("split", "trainval")
    splits = [split] * len(roots) if isinstance(split, str) else list(split)
    classes = cfg.get("classes", VOC_DETECTION_CLASSES)
    unknown = cfg.get("unknown_classes", "error")
    for root, name in zip(roots, splits):
        try:
            ids = read_split_ids(str(root), str(name))
        except UserError:
            return
        for voc_id in ids:
            path = os.path.join(str(root), "Annotations", f"{voc_id}.xml")
            try:
                parse_voc_xml(path, classes, unknown_classes=unknown)
            except DatasetError as exc:
                report.add(Problem("bad_annotation_file", path, _without_prefix(str(exc), path)))


# ------------------------------------------------------------------------------------ COCO records
def _coco_annotation_name(ann: Mapping[str, Any], position: int) -> str:
    return f"annotation id {ann.get('id')}"


def _voc_object_name(classes: Sequence[str]) -> Callable[[Mapping[str, Any], int], str]:
    def name(ann: Mapping[str, Any], position: int) -> str:
        label = ann.get("category_id")
        known = isinstance(label, int) and 1 <= label <= len(classes)
        return f"object {position}" + (f" ({classes[label - 1]})" if known else "")

    return name


def _scan_coco(report: SplitReport, data: Mapping[str, Any], *, img_dir: str, category_ids: set[Any],
               with_masks: bool, source: Callable[[Any], str],
               name_annotation: Callable[[Mapping[str, Any], int], str], max_images: int | None,
               progress: bool | None) -> None:
    """Check the images and annotations of a COCO instances dict."""
    images = list(data["images"])
    if max_images is not None and len(images) > max_images:
        report.total_images, images = len(images), images[:max_images]
    all_ids = {info["id"] for info in data["images"]}
    chosen = {info["id"] for info in images}
    annotations = [a for a in data["annotations"] if a.get("image_id") in chosen or a.get("image_id") not in all_ids]
    report.num_images, report.num_annotations = len(images), len(annotations)
    sizes = _check_images(report, images, img_dir, progress=progress)
    per_image: Counter[Any] = Counter()
    for ann in annotations:
        image_id = ann.get("image_id")
        name = name_annotation(ann, per_image[image_id])
        per_image[image_id] += 1
        where = dict(file=source(image_id) if image_id in all_ids else report.source, image_id=image_id,
                     annotation=name)
        if image_id not in all_ids:
            report.add(Problem("unknown_image", message=f"refers to image_id {image_id!r}, which is not in 'images'",
                               **where))
            continue
        if ann.get("category_id") not in category_ids:
            report.add(Problem("unknown_category", message=f"has category_id {ann.get('category_id')!r}, which is "
                               f"not one of the dataset's categories ({_show(sorted(category_ids, key=str))})",
                               **where))
        box = _check_box(report, ann, sizes[image_id], where)
        if with_masks or ann.get("segmentation"):
            _check_mask(report, ann, sizes[image_id], box, where)
    for info in images:
        if per_image[info["id"]] == 0:
            report.add(Problem("empty_image", _image_file(img_dir, info), "has no annotation", image_id=info["id"]))


def _image_file(img_dir: str, info: Mapping[str, Any]) -> str:
    return os.path.join(img_dir, str(info.get("file_name", "")))


def _check_images(report: SplitReport, images: Sequence[Mapping[str, Any]], img_dir: str, *,
                  progress: bool | None) -> dict[Any, tuple[int, int] | None]:
    """Decode every image; ``{image id: (height, width)}`` as annotated (else as decoded; ``None``: unknown)."""
    paths = [_image_file(img_dir, info) for info in images]
    sizes: dict[Any, tuple[int, int] | None] = {}
    results = _map_with_progress(_read_image, paths, progress=progress, desc=f"checking {report.split}")
    for info, path, (decoded, kind, message) in zip(images, paths, results):
        annotated = (info.get("height"), info.get("width"))
        known = all(isinstance(v, int) and v > 0 for v in annotated)
        if kind is not None:
            report.add(Problem(kind, path, message if info.get("file_name") else "the image has no 'file_name'",
                               image_id=info["id"]))
        elif known and decoded != annotated:
            report.add(Problem("image_size", path, f"is {decoded[0]}x{decoded[1]} (HxW) but the annotation says "
                               f"{annotated[0]}x{annotated[1]}", image_id=info["id"]))
        sizes[info["id"]] = annotated if known else decoded  # type: ignore[assignment]
    return sizes


def _read_image(path: str) -> tuple[tuple[int, int] | None, str | None, str | None]:
    """``(size, None, None)`` for a readable image, else ``(None, problem kind, message)``."""
    if not os.path.isfile(path):
        return None, "missing_image", "does not exist"
    try:
        height, width = load_image(path).shape[:2]
    except DatasetError as exc:
        cause = exc.__cause__
        return None, "corrupt_image", f"cannot be decoded ({cause})" if cause else _without_prefix(str(exc), path)
    return (height, width), None, None


def _check_box(report: SplitReport, ann: Mapping[str, Any], size: tuple[int, int] | None,
               where: dict[str, Any]) -> list[float] | None:
    """Report a malformed, degenerate or outside box; return ``[x, y, w, h]`` when it is a usable box."""
    bbox = ann.get("bbox")
    numbers = isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(is_finite_number(v) for v in bbox)
    if not numbers:
        report.add(Problem("degenerate_box", message=f"has bbox {bbox!r}; a box is four finite numbers "
                           f"[x, y, width, height]", **where))
        return None
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        which = " and ".join(f"{'zero' if v == 0 else 'negative'} {n}" for n, v in (("width", w), ("height", h))
                             if v <= 0)
        report.add(Problem("degenerate_box", message=f"has bbox {_fmt(bbox)} with {which}", **where))
        return None
    if size is not None:
        height, width = size
        t = BOX_TOLERANCE
        if x < -t or y < -t or x + w > width + t or y + h > height + t:
            report.add(Problem("box_outside", message=f"has bbox {_fmt(bbox)} (x {x:g}..{x + w:g}, "
                               f"y {y:g}..{y + h:g}), which reaches outside its {height}x{width} (HxW) image",
                               **where))
    return [x, y, w, h]


def _check_mask(report: SplitReport, ann: Mapping[str, Any], size: tuple[int, int] | None,
                box: list[float] | None, where: dict[str, Any]) -> None:
    """Report a malformed mask, or one whose tight box disagrees with ``box``."""
    if size is None:
        return
    problem = mask_problem(ann, *size)
    if problem is not None:
        report.add(Problem("invalid_mask", message=problem, **where))
        return
    rle = to_rle(ann["segmentation"], *size)  # checked above: bounded to rasterise, RLE runs cover the image
    if box is None:
        return
    tight = [float(v) for v in mask_utils.toBbox(rle)]
    if mask_utils.area(rle) == 0:
        report.add(Problem("mask_box_mismatch", message=f"has an empty mask but bbox {_fmt(box)}", **where))
        return
    edges = np.abs(np.array(_xyxy(tight)) - np.array(_xyxy(box)))
    iou = _iou(_xyxy(tight), _xyxy(box))
    if edges.max() > MASK_BOX_TOLERANCE or iou < MASK_BOX_MIN_IOU:
        report.add(Problem("mask_box_mismatch", message=f"has a mask whose tight box {_fmt(tight)} differs from its "
                           f"bbox {_fmt(box)} by up to {edges.max():g} px (IoU {iou:.2f})", **where))


def _xyxy(box: Sequence[float]) -> tuple[float, float, float, float]:
    x, y, w, h = box
    return x, y, x + w, y + h


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ------------------------------------------------------------------------------------ label maps
def _scan_label_maps(report: SplitReport, dataset: Any, *, max_images: int | None, progress: bool | None) -> None:
    """Check each image and label map of a :class:`~segkit.data.semseg.SemSegFolder`."""
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    if count < len(dataset):
        report.total_images = len(dataset)
    report.num_images = report.num_annotations = count
    report.annotation_unit = "label maps"
    check = lambda index: _label_map_problems(dataset, index)  # noqa: E731
    for problems in _map_with_progress(check, range(count), progress=progress, desc=f"checking {report.split}"):
        for problem in problems:
            report.add(problem)


def _label_map_problems(dataset: Any, index: int) -> list[Problem]:
    from segkit.data.semseg import read_label_map

    image_path, label_path = dataset.image_path(index), dataset.label_path(index)
    decoded, kind, message = _read_image(image_path)
    problems = [Problem(kind, image_path, message, image_id=index)] if kind else []
    try:
        raw_shape = read_label_map(label_path).shape
    except DatasetError as exc:
        return problems + [Problem("corrupt_label", label_path, _without_prefix(str(exc), label_path), image_id=index)]
    try:
        dataset.load_label(index)
    except DatasetError as exc:
        problems.append(Problem("label_values", label_path, _without_prefix(str(exc), label_path), image_id=index))
    if decoded is not None and tuple(raw_shape) != tuple(decoded):
        problems.append(Problem("label_size", label_path, f"is {raw_shape[0]}x{raw_shape[1]} (HxW) but its image "
                                f"'{image_path}' is {decoded[0]}x{decoded[1]}", image_id=index))
    return problems


# ------------------------------------------------------------------------------------ other datasets
def _scan_samples(report: SplitReport, dataset: Any, *, max_images: int | None, progress: bool | None) -> None:
    """Load every sample of a dataset type the checker does not know; report those that raise."""
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    if count < len(dataset):
        report.total_images = len(dataset)
    report.num_images = count
    report.source = str(getattr(dataset, "root", "") or getattr(dataset, "img_dir", "") or "")
    for index in tqdm(range(count), desc=f"checking {report.split}", unit="img", disable=_disabled(progress)):
        try:
            dataset[index]
        except (UserError, OSError, ValueError) as exc:
            report.add(Problem("bad_sample", "", str(exc), image_id=index))


# ------------------------------------------------------------------------------------ helpers
def _map_with_progress(function: Callable[[Any], Any], items: Iterable[Any], *, progress: bool | None,
                       desc: str) -> list[Any]:
    """``[function(item) ...]`` in order, decoded on a few threads (PIL and zlib release the GIL)."""
    items = list(items)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(tqdm(pool.map(function, items), total=len(items), desc=desc, unit="img",
                         disable=_disabled(progress)))


def _disabled(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def _without_prefix(message: str, path: str) -> str:
    """A library message about ``path`` without its leading "<what> '<path>' " (the record names the file)."""
    marker = f"'{path}' "
    at = message.find(marker)
    return message[at + len(marker):] if 0 <= at < 40 else message


def _fmt(box: Sequence[Any]) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in box) + "]"


def _show(items: Sequence[Any], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


# ------------------------------------------------------------------------------------ report
def format_report(reports: Sequence[SplitReport], *, show: int = _SHOW, width: int = 100) -> str:
    """The per-split problem lists (first ``show`` records of each kind) and a summary table."""
    lines: list[str] = []
    for report in reports:
        lines += _format_split(report, show=show, width=width) + [""]
    lines.append("Summary")
    header = ("split", "dataset", "images", "annotations", "errors", "warnings", "result")
    rows = [header] + [(r.split, r.dataset, _count(r.num_images, r.total_images), _count(r.num_annotations),
                        str(r.errors), str(r.warnings), _result(r)) for r in reports]
    widths = [max(len(row[k]) for row in rows) for k in range(len(header))]
    for row in rows:
        cells = [c.ljust(w) if k in (0, 1, 6) else c.rjust(w) for k, (c, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    errors, warns = sum(r.errors for r in reports), sum(r.warnings for r in reports)
    lines.append(f"{errors} error(s) and {warns} warning(s) in {len(reports)} split(s).")
    return "\n".join(lines)


def _format_split(report: SplitReport, *, show: int, width: int) -> list[str]:
    counts = "not read"
    if report.num_images is not None:
        counts = (f"{_count(report.num_images, report.total_images)} images, "
                  f"{_count(report.num_annotations)} {report.annotation_unit}")
    lines = [f"Split {report.split} ({report.dataset}): {counts}" + (f" - {report.source}" if report.source else "")]
    if not report.problems:
        lines.append("  no problems found")
    for kind, (severity, description) in PROBLEM_KINDS.items():
        found = report.problems.get(kind)
        if not found:
            continue
        lines.append(f"  {severity:<8} {description}: {len(found)}")
        for problem in found[:show]:  # the split's annotation file is named once, in its heading
            text = problem.describe(with_file=problem.file != report.source)
            lines += textwrap.wrap(text, width=width, initial_indent="    - ", subsequent_indent="      ",
                                   break_long_words=False, break_on_hyphens=False)
        if len(found) > show:
            lines.append(f"    ... and {len(found) - show} more")
    return lines


def _count(value: int | None, total: int | None = None) -> str:
    if value is None:
        return "-"
    return f"{value} of {total}" if total is not None else str(value)


def _result(report: SplitReport) -> str:
    if report.problems.get("build_failed"):
        return "cannot be built"
    return "errors" if report.errors else ("ok, warnings" if report.warnings else "ok")
