"""Pascal VOC detection: ``Annotations/*.xml`` + ``ImageSets/Main/<split>.txt`` + ``JPEGImages/``.

A year folder (``VOCdevkit/VOC2007``) holds the three sub-folders. Each XML file is checked
strictly when the dataset is built; an error names the file, the object and what is wrong.

Boxes: VOC's ``xmin..xmax`` are 1-based inclusive pixel indices, so a box covering the whole image
is ``1..W``. segkit's boxes are continuous coordinates, so a VOC box becomes
``[xmin - 1, ymin - 1, xmax, ymax]`` (``0..W`` for the whole image), as Detectron2 reads VOC, and
``segkit convert voc2coco`` writes ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`` as
the COCO ``[x, y, w, h]``. VOC AP computed on these boxes equals the devkit's (see
:mod:`segkit.evaluation.voc`).

``difficult`` objects: kept, with the flag, in the ground truth (``coco.anns[id]["difficult"]``);
VOC evaluation neither rewards nor penalises detecting them. With ``use_difficult: false`` (the
default) they are also crowd regions (``iscrowd: 1``), so they are left out of the training targets
and COCO evaluation ignores them as well. ``truncated`` is kept the same way.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any
from xml.sax.saxutils import escape

import albumentations as A
import numpy as np
from tqdm import tqdm

from segkit.data.coco import CocoDataset, read_coco_dict
from segkit.data.images import check_pixel_count
from segkit.errors import ConfigError, DatasetError, did_you_mean
from segkit.registry import DATASETS
from segkit.textio import read_names

__all__ = ["VOCDetection", "ShapesVOC", "VOC_DETECTION_CLASSES", "parse_voc_xml", "voc_to_coco", "coco_to_voc"]

VOC_DETECTION_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
_UNKNOWN = ("error", "skip")
_PROGRESS_FROM = 2000  # files; fewer parse in well under a second


def _text(node: ET.Element, tag: str, where: str, *, required: bool = True) -> str | None:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise DatasetError(f"{where} has no <{tag}>.")
        return None
    return child.text.strip()


def _number(node: ET.Element, tag: str, where: str) -> float:
    text = _text(node, tag, where)
    try:
        value = float(text)  # type: ignore[arg-type]
    except ValueError:
        raise DatasetError(f"{where}: <{tag}> is {text!r}, not a number.") from None
    if not np.isfinite(value):
        raise DatasetError(f"{where}: <{tag}> is {text!r}, not a finite number.")
    return value


def _flag(node: ET.Element, tag: str, where: str) -> int:
    text = _text(node, tag, where, required=False)
    if text is None:
        return 0
    try:
        value = int(float(text))
    except ValueError:
        value = -1
    if value not in (0, 1) or float(text) != value:
        raise DatasetError(f"{where}: <{tag}> is {text!r}; it must be 0 or 1.")
    return value


def parse_voc_xml(path: str, classes: Sequence[str] = VOC_DETECTION_CLASSES, *,
                  unknown_classes: str = "error") -> dict[str, Any]:
    """Read one VOC annotation file.

    Returns:
        ``{"filename", "width", "height", "objects"}`` where ``width``/``height`` are ``None`` if
        the file has no ``<size>``, and each object is ``{"name", "label" (1..K), "bbox" (VOC's
        xmin, ymin, xmax, ymax as written), "difficult", "truncated"}``.

    Raises:
        DatasetError: the file is missing, not well-formed XML, not an ``<annotation>``, or has a
            missing or malformed ``<filename>``, ``<size>`` (or one over
            :func:`~segkit.data.coco.max_image_pixels`), ``<name>`` or ``<bndbox>``, an empty box
            (``xmax < xmin``), a flag other than 0/1, or (with ``unknown_classes="error"``) a
            class name not in ``classes``. The message names the file and the object.
    """
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DatasetError(f"annotation file '{path}' does not exist; every image of the split needs "
                           f"Annotations/<name>.xml.") from None
    except ET.ParseError as exc:
        raise DatasetError(f"annotation file '{path}' is not well-formed XML: {exc}.") from None
    except OSError as exc:  # a folder in its place, no permission
        raise DatasetError(f"cannot read annotation file '{path}': {exc.strerror or exc}.") from None
    if root.tag != "annotation":
        raise DatasetError(f"annotation file '{path}' has root element <{root.tag}>; a VOC file has <annotation>.")
    filename = _text(root, "filename", f"annotation file '{path}'")
    width = height = None
    size = root.find("size")
    if size is not None:
        where = f"annotation file '{path}', <size>"
        width, height = _number(size, "width", where), _number(size, "height", where)
        if width <= 0 or height <= 0 or width != int(width) or height != int(height):
            raise DatasetError(f"{where} is {width:g}x{height:g} (WxH); both must be positive integers.")
        width, height = int(width), int(height)
        check_pixel_count(where, height, width)
    index = {name: k for k, name in enumerate(classes, start=1)}
    objects = []
    for k, obj in enumerate(root.iter("object")):
        where = f"annotation file '{path}', object {k}"
        name = _text(obj, "name", where)
        if name not in index:
            if unknown_classes == "skip":
                continue
            raise DatasetError(
                f"{where} has class {name!r}, which is not one of the dataset's classes "
                f"({', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''})." + did_you_mean(str(name), classes)
                + " Set the dataset's classes to include it, or unknown_classes: skip to leave such objects out."
            )
        box = obj.find("bndbox")
        if box is None:
            raise DatasetError(f"{where} ({name}) has no <bndbox>.")
        bwhere = f"{where} ({name}), <bndbox>"
        xmin, ymin, xmax, ymax = (_number(box, tag, bwhere) for tag in ("xmin", "ymin", "xmax", "ymax"))
        if xmax < xmin or ymax < ymin:
            raise DatasetError(f"{bwhere} is empty: xmin={xmin:g}, ymin={ymin:g}, xmax={xmax:g}, ymax={ymax:g} "
                               f"(VOC boxes are inclusive pixel indices with xmin <= xmax and ymin <= ymax).")
        objects.append({
            "name": name, "label": index[name], "bbox": [xmin, ymin, xmax, ymax],
            "difficult": _flag(obj, "difficult", where), "truncated": _flag(obj, "truncated", where),
        })
    return {"filename": filename, "width": width, "height": height, "objects": objects}


def read_split_ids(root: str, split: str) -> list[str]:
    folder = os.path.join(root, "ImageSets", "Main")
    path = os.path.join(folder, f"{split}.txt")
    if not os.path.isdir(root):
        raise ConfigError(f"VOC root '{root}' does not exist; it is a year folder holding Annotations/, "
                          f"ImageSets/Main/ and JPEGImages/ (for example VOCdevkit/VOC2007).", key="root")
    if not os.path.isfile(path):
        have = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".txt") and "_" not in f) \
            if os.path.isdir(folder) else []
        raise ConfigError(f"no split file '{path}' for split {split!r}; available splits: "
                          f"{', '.join(have) or 'none (check root)'}." + did_you_mean(split, have), key="split")
    ids = [line.split()[0] for line in read_names(path, error=DatasetError, what="split file")]
    if not ids:
        raise DatasetError(f"split file '{path}' is empty; list one image name without suffix per line.")
    return ids


def voc_to_coco(
    roots: str | Sequence[str],
    splits: str | Sequence[str] = "trainval",
    classes: Sequence[str] = VOC_DETECTION_CLASSES,
    *,
    use_difficult: bool = False,
    unknown_classes: str = "error",
    absolute_paths: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """A COCO instances dict of the VOC split(s) (``segkit convert voc2coco``, :class:`VOCDetection`).

    Args:
        roots: one year folder or several (concatenated in order, e.g. VOC2007 and VOC2012).
        splits: one split name for every root, or one per root.
        classes: the class names; label / category id ``k`` is ``classes[k - 1]``.
        use_difficult: write difficult objects as normal objects (``iscrowd: 0``); by default they
            are crowd regions. Either way they carry ``"difficult": 1``.
        unknown_classes: ``"error"`` or ``"skip"`` for an object whose class is not in ``classes``.
        absolute_paths: ``file_name`` as an absolute path; otherwise relative to the root's
            ``JPEGImages`` (one root) or to the roots' common parent folder (several).
        progress: a progress bar; ``None``: for large splits only.

    Images get ids ``1..N`` in split-file order (roots one after another) and keep their VOC name
    as ``"voc_id"``; annotations get ids ``1..M``.
    """
    roots = [os.fspath(roots)] if isinstance(roots, (str, os.PathLike)) else [os.fspath(r) for r in roots]
    splits = [splits] * len(roots) if isinstance(splits, str) else list(splits)
    if len(splits) != len(roots):
        raise ConfigError(f"split lists {len(splits)} names for {len(roots)} roots; give one split, or one per root.",
                          key="split")
    if unknown_classes not in _UNKNOWN:
        raise ConfigError(f"unknown_classes must be 'error' or 'skip', got {unknown_classes!r}", key="unknown_classes")
    classes = _check_classes(classes)
    parent = os.path.commonpath([os.path.abspath(r) for r in roots]) if len(roots) > 1 else None
    jobs = [(root, voc_id) for root, split in zip(roots, splits) for voc_id in read_split_ids(root, split)]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    show = len(jobs) >= _PROGRESS_FROM if progress is None else progress
    for image_id, (root, voc_id) in enumerate(tqdm(jobs, desc="reading VOC annotations", unit="file",
                                                  disable=not show), start=1):
        xml_path = os.path.join(root, "Annotations", f"{voc_id}.xml")
        record = parse_voc_xml(xml_path, classes, unknown_classes=unknown_classes)
        image_path = os.path.join(root, "JPEGImages", record["filename"])
        if image_path in seen:
            raise DatasetError(f"image '{image_path}' is listed twice (by {seen[image_path]} and {xml_path}); "
                               f"each split file must name an image once.")
        seen[image_path] = xml_path
        if absolute_paths:
            file_name = os.path.abspath(image_path)
        elif parent is not None:
            file_name = os.path.relpath(os.path.abspath(image_path), parent)
        else:
            file_name = record["filename"]
        image = {"id": image_id, "file_name": file_name, "voc_id": voc_id}
        if record["width"] is not None:
            image.update(width=record["width"], height=record["height"])
        images.append(image)
        for obj in record["objects"]:
            xmin, ymin, xmax, ymax = obj["bbox"]
            w, h = xmax - xmin + 1, ymax - ymin + 1
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": obj["label"],
                "bbox": [xmin - 1, ymin - 1, w, h], "area": w * h,
                "iscrowd": int(bool(obj["difficult"]) and not use_difficult),
                "difficult": obj["difficult"], "truncated": obj["truncated"],
            })
    categories = [{"id": k, "name": name, "supercategory": "none"} for k, name in enumerate(classes, start=1)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _check_classes(classes: Any) -> tuple[str, ...]:
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence) or not classes \
            or not all(isinstance(c, str) and c for c in classes):
        raise ConfigError(f"classes must be a non-empty list of class names, got {classes!r}", key="classes")
    if len(set(classes)) != len(classes):
        raise ConfigError(f"classes lists a name twice: {list(classes)}", key="classes")
    return tuple(classes)


@DATASETS.register()
class VOCDetection(CocoDataset):
    """Pascal VOC detection samples, one or several year folders (VOC2007 + VOC2012 trainval).

    Args:
        root: a year folder (holding ``Annotations/``, ``ImageSets/Main/``, ``JPEGImages/``), or a
            list of them, concatenated.
        split: the image list ``ImageSets/Main/<split>.txt`` (``train``, ``val``, ``trainval``,
            ``test``), one for all roots or one per root.
        classes: class names (default: VOC's 20); labels ``1..K`` follow this order.
        use_difficult: train on difficult objects too (default: they are ignored regions; see the
            module docstring). Evaluation treats them as difficult either way.
        unknown_classes: ``"error"`` (default) or ``"skip"`` objects whose class is not in ``classes``.
        transforms, skip_empty, min_box_size: as for :class:`~segkit.data.CocoDataset`.
        progress: a progress bar while reading the XML files (``None``: for large splits).

    ``dataset[i]`` returns ``(image, target)`` as :class:`~segkit.data.CocoDataset` does; COCO and
    VOC evaluation both work on it (``coco`` is built in memory).

    Raises:
        ConfigError: a root or split that does not exist (the message lists the available splits).
        DatasetError: a malformed annotation file (see :func:`parse_voc_xml`) or an image listed twice.

    Example:
        >>> ds = VOCDetection(root=["data/VOCdevkit/VOC2007", "data/VOCdevkit/VOC2012"], split="trainval")
    """

    def __init__(
        self,
        *,
        root: str | Sequence[str],
        split: str | Sequence[str] = "trainval",
        classes: Sequence[str] = VOC_DETECTION_CLASSES,
        use_difficult: bool = False,
        unknown_classes: str = "error",
        transforms: Sequence[Mapping[str, Any]] | A.Compose | None = None,
        skip_empty: bool = False,
        min_box_size: float = 1.0,
        progress: bool | None = None,
    ) -> None:
        self.roots = [os.fspath(root)] if isinstance(root, (str, os.PathLike)) else [os.fspath(r) for r in root]
        self.splits = [split] * len(self.roots) if isinstance(split, str) else list(split)
        self.use_difficult = bool(use_difficult)
        self._voc = voc_to_coco(self.roots, self.splits, classes, use_difficult=use_difficult,
                                unknown_classes=unknown_classes, absolute_paths=True, progress=progress)
        where = ", ".join(f"{os.path.join(r, 'Annotations')} ({s})" for r, s in zip(self.roots, self.splits))
        super().__init__(ann_file=where, img_dir="", transforms=transforms, skip_empty=skip_empty,
                         min_box_size=min_box_size)

    def _load_coco(self) -> Any:
        return read_coco_dict(self._voc, self.ann_file)

    def annotation_source(self, image_id: int) -> str:
        info = self.coco.imgs[image_id]
        root = os.path.dirname(os.path.dirname(info["file_name"]))
        return os.path.join(root, "Annotations", f"{info['voc_id']}.xml")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.roots}, split={self.splits}, images={len(self)}, "
                f"classes={len(self.classes)}, use_difficult={self.use_difficult})")


def coco_to_voc(coco: Mapping[str, Any], img_dir: str, out_root: str, *, split: str,
                difficult_area: float = 0.0, progress: bool | None = None) -> list[str]:
    """Write a COCO detection dataset in VOC's layout (``segkit convert coco2voc``; VOC exports of Shapes).

    Images are written as JPEG under ``out_root/JPEGImages`` (quality 95; JPEG files are copied),
    one XML per image under ``Annotations``, and ``ImageSets/Main/<split>.txt`` lists them. Boxes
    become VOC's 1-based inclusive indices (``xmin = round(x) + 1``, ``xmax = round(x + w)``);
    crowd annotations and boxes with an area below ``difficult_area`` become ``difficult``.

    Returns:
        the VOC ids written (file stems), in the order of ``coco["images"]``.
    """
    from PIL import Image

    from segkit.data.images import load_image

    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(out_root, sub), exist_ok=True)
    names = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
    by_image: dict[int, list[Mapping[str, Any]]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    ids: list[str] = []
    images = list(coco["images"])
    show = len(images) >= _PROGRESS_FROM if progress is None else progress
    for info in tqdm(images, desc="writing VOC files", unit="img", disable=not show):
        voc_id = os.path.splitext(os.path.basename(str(info["file_name"])))[0]
        src = os.path.join(img_dir, str(info["file_name"]))
        dst = os.path.join(out_root, "JPEGImages", f"{voc_id}.jpg")
        pixels = load_image(src, image_id=int(info["id"]))
        Image.fromarray(pixels).save(dst, quality=95)
        height, width = pixels.shape[:2]
        lines = ["<annotation>", f"  <folder>{escape(os.path.basename(os.path.abspath(out_root)))}</folder>",
                 f"  <filename>{voc_id}.jpg</filename>",
                 f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
                 "  <segmented>0</segmented>"]
        for ann in by_image.get(int(info["id"]), []):
            x, y, w, h = (float(v) for v in ann["bbox"])
            xmin, ymin = int(round(x)) + 1, int(round(y)) + 1
            xmax, ymax = max(int(round(x + w)), xmin), max(int(round(y + h)), ymin)
            difficult = int(bool(ann.get("iscrowd", 0)) or w * h < difficult_area)
            lines += ["  <object>", f"    <name>{escape(names[int(ann['category_id'])])}</name>",
                      "    <pose>Unspecified</pose>", "    <truncated>0</truncated>",
                      f"    <difficult>{difficult}</difficult>",
                      f"    <bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>",
                      "  </object>"]
        lines.append("</annotation>")
        _write_text(os.path.join(out_root, "Annotations", f"{voc_id}.xml"), "\n".join(lines) + "\n")
        ids.append(voc_id)
    _write_text(os.path.join(out_root, "ImageSets", "Main", f"{split}.txt"), "\n".join(ids) + "\n")
    return ids


def _write_text(path: str, text: str) -> None:
    from segkit.fileio import atomic_write_text

    atomic_write_text(path, text)


@DATASETS.register()
class ShapesVOC(VOCDetection):
    """The Shapes dataset exported to VOC's layout and read as VOC (tests, the VOC quickstart).

    The split is generated as :class:`~segkit.data.Shapes` does (same arguments, same images), then
    written once as a VOC year folder ``<shapes folder>/voc`` (JPEG images, one XML per image,
    ``ImageSets/Main/<split>.txt``); shapes smaller than ``difficult_area`` pixels are marked
    ``difficult``.

    Args:
        split, num_images, image_size, seed, root, min_objects, max_objects, progress: as for
            :class:`~segkit.data.Shapes`.
        difficult_area: shapes with a smaller box area (pixels) are ``difficult`` (default 0: none).
        use_difficult, transforms, skip_empty, min_box_size: as for :class:`VOCDetection`.

    Attributes:
        voc_root: the VOC year folder.
    """

    def __init__(
        self,
        *,
        split: str = "train",
        num_images: int | None = None,
        image_size: int = 128,
        seed: int = 0,
        root: str | None = None,
        min_objects: int = 2,
        max_objects: int = 7,
        difficult_area: float = 0.0,
        use_difficult: bool = False,
        transforms: Sequence[Mapping[str, Any]] | A.Compose | None = None,
        skip_empty: bool | None = None,
        min_box_size: float = 1.0,
        progress: bool = True,
    ) -> None:
        from segkit.data.shapes import SHAPE_CATEGORIES, Shapes

        shapes = Shapes(split=split, num_images=num_images, image_size=image_size, seed=seed, root=root,
                        min_objects=min_objects, max_objects=max_objects, progress=progress)
        self.voc_root = _export_once(shapes, split, float(difficult_area), progress)
        super().__init__(root=self.voc_root, split=split, classes=SHAPE_CATEGORIES, use_difficult=use_difficult,
                         transforms=transforms, skip_empty=(split == "train") if skip_empty is None else skip_empty,
                         min_box_size=min_box_size, progress=False)


def _export_once(shapes: Any, split: str, difficult_area: float, progress: bool) -> str:
    """``<shapes root>/voc[_d<area>]``, written into a temporary folder and renamed when complete."""
    import shutil
    import tempfile

    name = "voc" if difficult_area <= 0 else f"voc_d{difficult_area:g}"
    final = os.path.join(shapes.root, name)
    if os.path.isfile(os.path.join(final, "ImageSets", "Main", f"{split}.txt")):
        return final
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=shapes.root)
    try:
        coco_to_voc(shapes.coco.dataset, shapes.img_dir, tmp, split=split, difficult_area=difficult_area,
                    progress=progress and len(shapes.coco.imgs) >= _PROGRESS_FROM)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            if not os.path.isfile(os.path.join(final, "ImageSets", "Main", f"{split}.txt")):
                raise DatasetError(f"cannot move the VOC export of Shapes into '{final}', which exists but is "
                                   f"incomplete; delete that folder and retry.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
