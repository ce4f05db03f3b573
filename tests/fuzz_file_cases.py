"""Fuzz cases of data files: COCO annotations, COCO results, label maps and VOC folders, run by a command.

Each case edits a valid file made from the Shapes data (:mod:`fuzz_shared`): a field of a record, any value in
the document, its size or its encoding (JSON); a label map's size, mode, content or header; a VOC detection file,
XML file or split file; and the command's options. COCO files go through ``segkit data check``, ``train`` and
``score --task bbox/segm``; results through ``score --task bbox/segm``; label maps through ``score --task
semseg``; VOC folders through ``score --task voc``.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hypothesis import strategies as st

from conftest import MASK_HEAD
from fuzz_harness import Case
from fuzz_inputs import (ENCODING_NAMES, FEW, Raw, all_paths, dump_json, dump_yaml, encode, leaf_values,
                         mostly_utf8, png_bomb, png_bytes, png_declaring, set_path, short, structures)
from fuzz_shared import BOUNDED_TRAINING, Shared

HUGE_DIGITS = Raw("1" * 5000)
DEEP_JSON = Raw("[" * 100_000 + "]" * 100_000)
ID_VALUES = [2**63, 2**64, -2**63 - 1, 10**30, -1, 0, 1.5, 1.0, "1", [1], {"id": 1}, True, None, float("nan"),
             HUGE_DIGITS, 10**20]
BBOX_VALUES = [[1e9, 1e9, 1e9, 1e9], [float("nan")] * 4, [0, 0, -5, -5], ["1", "2", "3", "4"], [], [1, 2, 3],
               [[1, 2, 3, 4]], None, "x", [2**63, 0, 1, 1], [1e308] * 4, [-1e308] * 4, [float("inf")] * 4,
               [0, 0, 1e-9, 1e-9], [1, 2, 3, 4, 5]]
# how often a list or a field is chosen for an edit, against 1 for the others: the ones with the most code behind
WEIGHTS = {"annotations": 3, "segmentation": 4, "bbox": 2}


def _rle(counts: Any, size: Any = (64, 64)) -> dict[str, Any]:
    return {"size": list(size) if isinstance(size, tuple) else size, "counts": counts}


SEGMENTATION_VALUES = [
    [[0, 0, 1e9, 0, 0, 1e9]], [[1e9, 1e9, 2e9, 1e9, 1e9, 2e9]], [[-1e9, -1e9, 1e9, -1e9, 0, 1e9]],
    [[0, 0, 5e8, 0, 0, 5e8]], [[0, 0, 1e308, 0, 0, 1e308]], [[0, 0, 64, 0, 0, 64] * 50_000],
    [[float("nan")] * 6], [[float("inf"), 0, 0, float("inf"), 5, 5]], [[0, 0, 10, 0]], [[0, 0, 10]], [], [[]],
    [["a", "b", "c", "d", "e", "f"]], [list(range(200_000))], [[0, 0, 10, 0, 10, 10]] * 10_000,
    [[2**63, 0, 1, 1, 0, 1]], _rle("!!!!"), _rle(""), _rle("zzzzzzzz"), _rle("\u00ff\u0000"), _rle([4096]),
    _rle([1, 2, 3]), _rle([-5, 4101]), _rle([2**40]), _rle([1.5]), _rle(["a"]), _rle("0", (2**31, 2**31)),
    _rle([10**10], (100_000, 100_000)), _rle("0", (-1, 64)), _rle("0", "64x64"), {"counts": "abc"}, {"size": [64, 64]},
    {}, _rle(None), "string", 5, None, [[0, 0, 10, 0, 10, 10], "x"],
]
FILE_NAMES = ["", "missing.png", "../train/000002.png", "/dev/zero", "/dev/urandom", "/etc/passwd", "a\x00b.png",
              "x" * 300 + ".png", 5, None, ["a"], ".", "000001.png/../000002.png", "ü.png", "000001.PNG"]
SIZE_VALUES = [0, -1, 2**31, 10**9, 1.5, "64", None, float("nan"), 65, 63, 1, 2**63, HUGE_DIGITS]
ANN_FIELDS = {"id": ID_VALUES, "image_id": ID_VALUES, "category_id": ID_VALUES, "bbox": BBOX_VALUES,
              "segmentation": SEGMENTATION_VALUES, "area": [-1, float("nan"), "x", None, 2**63, 1e308],
              "iscrowd": [2, -1, "1", None, 1, True, 1.0]}
IMAGE_FIELDS = {"id": ID_VALUES, "file_name": FILE_NAMES, "height": SIZE_VALUES, "width": SIZE_VALUES}
CATEGORY_FIELDS = {"id": ID_VALUES, "name": [5, None, "", "a" * 10_000, ["x"], "circle"], "supercategory": [5, None]}
MANY_RECORDS = 20_000  # records in a file made big (the copies share their objects: small in memory)
TOP_LEVEL_VALUES = [[], {}, "x", None, 5, DEEP_JSON, Raw("NaN"), [None], [[]], [5], HUGE_DIGITS]


Fields = dict[Any, dict[str, list[Any]]]  # {key of a list of records (None: the document): {field: values}}


@st.composite
def json_edits(draw: st.DrawFn, doc: Any, fields: Fields) -> tuple[Any, list[str]]:
    """1-3 edits of a copy of ``doc``: a field of a record, a value anywhere, a top-level key, the size."""
    doc = copy.deepcopy(doc)
    notes = []
    for _ in range(draw(FEW)):
        op = draw(st.sampled_from(["field"] * 3 + ["delete field", "anywhere", "top-level", "size"] + ["field"] * 3))
        edit = {"field": _field_edit, "delete field": _field_edit, "anywhere": _anywhere_edit,
                "top-level": _top_level_edit, "size": _size_edit}[op]
        doc, note = draw(edit(doc, fields, delete=op == "delete field"))
        if note:
            notes.append(note)
    return doc, notes


@st.composite
def _field_edit(draw: st.DrawFn, doc: Any, fields: Fields, *, delete: bool) -> tuple[Any, str]:
    """A field of one record set to a value tried for that field (or a generic one), or deleted."""
    lists = [k for k in fields if isinstance(doc, dict) and isinstance(doc.get(k), list) and doc[k]] or (
        [None] if None in fields and isinstance(doc, list) and doc else [])
    if not lists:
        return doc, ""
    list_key = draw(st.sampled_from([k for k in lists for _ in range(WEIGHTS.get(k, 1))]))
    records = doc if list_key is None else doc[list_key]
    index = draw(st.integers(0, len(records) - 1))
    name = draw(st.sampled_from([n for n in sorted(fields[list_key]) for _ in range(WEIGHTS.get(n, 1))]))
    if not isinstance(records[index], dict):
        return doc, ""
    where = f"{list_key or 'record'}[{index}].{name}"
    if delete:
        records[index].pop(name, None)
        return doc, f"deleted {where}"
    own = st.sampled_from(fields[list_key][name])
    value = draw(st.one_of(own, leaf_values, own))
    records[index][name] = value
    return doc, f"{where}={short(value)}"


@st.composite
def _anywhere_edit(draw: st.DrawFn, doc: Any, fields: Fields, *, delete: bool) -> tuple[Any, str]:
    """Any value of the document replaced by a structure or a hostile top-level value."""
    paths = all_paths(doc)
    if not paths:
        return doc, ""
    path = draw(st.sampled_from(paths))
    value = draw(structures | st.sampled_from(TOP_LEVEL_VALUES))
    set_path(doc, path, value)
    return doc, f"{'.'.join(map(str, path))}={short(value)}"


@st.composite
def _top_level_edit(draw: st.DrawFn, doc: Any, fields: Fields, *, delete: bool) -> tuple[Any, str]:
    """A top-level key of a document that is a mapping replaced or deleted."""
    if not isinstance(doc, dict):
        return doc, ""
    key = draw(st.sampled_from(sorted(k for k in fields if k is not None) + ["info", "licenses", "extra"]))
    value = draw(st.sampled_from(TOP_LEVEL_VALUES + ["__delete__"]))
    if value == "__delete__":
        doc.pop(key, None)
        return doc, f"deleted {key}"
    doc[key] = value
    return doc, f"{key}={short(value)}"


@st.composite
def _size_edit(draw: st.DrawFn, doc: Any, fields: Fields, *, delete: bool) -> tuple[Any, str]:
    """A list of records made long, empty or of one record, or the whole document replaced."""
    how = draw(st.sampled_from(["many records", "empty", "whole file", "one record"]))
    if how == "whole file":
        return draw(st.sampled_from(TOP_LEVEL_VALUES)), how
    if isinstance(doc, list):
        return _resized(doc, how), how
    keys = sorted(k for k in fields if k is not None and isinstance(doc, dict) and isinstance(doc.get(k), list))
    if keys:
        key = draw(st.sampled_from(keys))
        doc[key] = _resized(doc[key], how)
        return doc, f"{key}: {how}"
    return doc, ""


def _resized(records: list[Any], how: str) -> list[Any]:
    """``records`` repeated to MANY_RECORDS entries (never more, however often it is applied), emptied or cut to one."""
    if how == "many records":
        return (records * (MANY_RECORDS // max(len(records), 1) + 1))[:MANY_RECORDS] if records else records
    return [] if how == "empty" else records[:1]


@st.composite
def json_file(draw: st.DrawFn, doc: Any, fields: Fields) -> tuple[bytes, str]:
    """An edited ``doc`` as bytes in some encoding, and what was changed."""
    doc, notes = draw(json_edits(doc, fields))
    how = draw(mostly_utf8)
    if how != "utf-8":
        notes.append(how)
    return encode(dump_json(doc), how), "; ".join(notes)


def coco_config(shared: Shared) -> bytes:
    """The tiny Mask R-CNN reading ``in/ann.json`` (the case's COCO file) for both splits."""
    cfg = copy.deepcopy(shared.det_config)
    dataset = {"type": "CocoDataset", "ann_file": "in/ann.json", "img_dir": shared.train_images, "with_masks": True}
    cfg["data"]["train"], cfg["data"]["val"] = dataset, dict(dataset)
    cfg["model"]["roi_head"]["mask_head"] = yaml.safe_load(MASK_HEAD.split("=", 1)[1])
    cfg["evaluation"]["iou_types"] = ["bbox", "segm"]
    return dump_yaml(cfg).encode()


@st.composite
def coco_cases(draw: st.DrawFn, shared: Shared) -> Case:
    """An edited COCO file (polygons and RLEs) checked, trained on, or scored against valid results."""
    fields = {"images": IMAGE_FIELDS, "annotations": ANN_FIELDS, "categories": CATEGORY_FIELDS}
    content, note = draw(json_file(shared.coco_doc, fields))
    files = {"in/ann.json": content, "in/c.yaml": coco_config(shared),
             "in/results.json": json.dumps(shared.results_doc).encode()}
    command = draw(st.sampled_from(["train", "data check", "score bbox", "score segm", "data check", "train"]))
    argv = {"data check": ["data", "check", "in/c.yaml"], "train": ["train", "in/c.yaml", *BOUNDED_TRAINING],
            "score bbox": ["score", "--task", "bbox", "--gt", "in/ann.json", "--pred", "in/results.json"],
            "score segm": ["score", "--task", "segm", "--gt", "in/ann.json", "--pred", "in/results.json"]}[command]
    return Case("coco", argv, files, exit_one_allowed=command == "data check", note=note)


# ================================================================================================ results files
RESULT_FIELDS = {None: {"image_id": ID_VALUES, "category_id": ID_VALUES, "bbox": BBOX_VALUES,
                        "segmentation": SEGMENTATION_VALUES,
                        "score": [float("nan"), float("inf"), -1, 2, "high", None, 2**63, [0.5], True, 1e-320]}}
OUT_VALUES = [None] * 6 + ["out", "out/new/m.json", "", "out/m.json/x"] + ["out/m.json"] * 6


@st.composite
def results_cases(draw: st.DrawFn, shared: Shared) -> Case:
    """`segkit score --task bbox/segm` of edited results (made from the ground truth) against the ground truth."""
    content, note = draw(json_file(shared.results_doc, RESULT_FIELDS))
    task = draw(st.sampled_from(["bbox", "segm"]))
    argv = ["score", "--task", task, "--gt", shared.val_ann, "--pred", "in/results.json"]
    argv += draw(st.sampled_from([[], [], ["--per-class"], ["--backend", "auto"], ["--backend", "faster_coco_eval"]]))
    out = draw(st.sampled_from(OUT_VALUES))
    if out is not None:
        argv += ["--out", out]
    return Case("results", argv, {"in/results.json": content}, note=note)


# ================================================================================================ label maps
NUM_CLASSES = [4] * 6 + [None, 1, 2, 0, -1, 255, 256, 65_536, 200_000, 2**31, 2**63] + [4] * 6
IGNORE_INDEX = [255] * 4 + [0, -1, 3, 65_535, 65_536, 2**40] + [255] * 4
CLASSES = [None] * 3 + ["background,circle,square,triangle", "a", "", ",,,", "in/classes.txt", "in/classes.txt"] + [
    None] * 3
CLASS_FILES = [b"background\ncircle\nsquare\ntriangle\n", b"", b"\n\n", "caf\xe9\n".encode("latin-1"),
               "a\nb\nc\nd\n".encode("utf-16"), b"a\x00b\nc\nd\ne\n", b"x\n" * 100_000,
               b"\xef\xbb\xbfa\nb\nc\nd\n"]


def label_edits(rng_seed: int, original: bytes) -> dict[str, Any]:
    """Ways to break one label map (``None``: remove the file), by name."""
    rng = np.random.default_rng(rng_seed)
    return {
        "other size": lambda: png_bytes(rng.integers(0, 4, (32, 48), dtype=np.uint8)),
        "one pixel": lambda: png_bytes(np.zeros((1, 1), dtype=np.uint8)),
        "RGB": lambda: png_bytes(rng.integers(0, 4, (64, 64, 3), dtype=np.uint8)),
        "RGBA": lambda: png_bytes(rng.integers(0, 4, (64, 64, 4), dtype=np.uint8)),
        "16-bit": lambda: png_bytes(rng.integers(0, 65_535, (64, 64), dtype=np.uint16)),
        "palette": lambda: png_bytes(rng.integers(0, 4, (64, 64), dtype=np.uint8), mode="P"),
        "grey with alpha": lambda: png_bytes(rng.integers(0, 4, (64, 64, 2), dtype=np.uint8), mode="LA"),
        "1-bit": lambda: png_bytes(rng.integers(0, 2, (64, 64), dtype=bool)),
        "values outside the classes": lambda: png_bytes(rng.integers(0, 256, (64, 64), dtype=np.uint8)),
        "all ignored": lambda: png_bytes(np.full((64, 64), 255, dtype=np.uint8)),
        "truncated": lambda: original[: len(original) // 2],
        "zero bytes": lambda: b"",
        "text": lambda: b"not an image\n",
        "JPEG named .png": lambda: _jpeg(rng),
        "declares 100000 x 100000": lambda: png_declaring(100_000, 100_000),
        "declares 2**31-1 x 1": lambda: png_declaring(2**31 - 1, 1),
        "declares 12000 x 12000": lambda: png_declaring(12_000, 12_000, rows=10),
        "decompression bomb": lambda: png_bomb(),
        "removed": lambda: None,
    }


def _jpeg(rng: np.random.Generator) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 4, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


EDIT_NAMES = list(label_edits(0, b""))


@st.composite
def semseg_cases(draw: st.DrawFn, shared: Shared) -> Case:
    """`segkit score --task semseg` of a copy of the label maps against themselves, a few files broken."""
    names = sorted(os.listdir(shared.val_labels))
    originals = {n: (Path(shared.val_labels) / n).read_bytes() for n in names}
    folders = {side: {n: content for n, content in originals.items()} for side in ("gt", "pred")}
    notes = []
    for _ in range(draw(st.sampled_from([1, 0, 2, 1]))):
        notes.append(draw(_label_map_edit(folders, originals)))
    files = {f"in/{side}/{n}": content for side, folder in folders.items() for n, content in folder.items()}
    argv = ["score", "--task", "semseg", "--gt", "in/gt", "--pred", "in/pred"]
    num_classes = draw(st.sampled_from(NUM_CLASSES))
    if num_classes is not None:
        argv += ["--num-classes", str(num_classes)]
    ignore = draw(st.sampled_from(IGNORE_INDEX))
    if ignore != 255:
        argv += ["--ignore-index", str(ignore)]
    if draw(st.booleans()):
        argv.append("--reduce-zero-label")
    classes = draw(st.sampled_from(CLASSES))
    if classes is not None:
        argv += ["--classes", classes]
        if classes == "in/classes.txt":
            files["in/classes.txt"] = draw(st.sampled_from(CLASS_FILES))
    out = draw(st.sampled_from(OUT_VALUES))
    if out is not None:
        argv += ["--out", out]
    return Case("semseg", argv, files, note="; ".join(notes))


@st.composite
def _label_map_edit(draw: st.DrawFn, folders: dict[str, dict[str, bytes]], originals: dict[str, bytes]) -> str:
    """One label map of the ground truth or the predictions broken, removed, or an extra file (in place)."""
    side = draw(st.sampled_from(["pred", "gt", "pred"]))
    name = draw(st.sampled_from(sorted(originals)))
    edit = draw(st.sampled_from(EDIT_NAMES + ["extra file", "odd name"]))
    folder = folders[side]
    if edit == "extra file":
        folder["extra.png"] = originals[name]
    elif edit == "odd name":
        folder[draw(st.sampled_from(["a b.png", "ü.png", ".hidden.png", "x.PNG", "x.png.png"]))] = originals[name]
    else:
        content = label_edits(draw(st.integers(0, 3)), originals[name])[edit]()
        if content is None:
            folder.pop(name, None)
        else:
            folder[name] = content
    return f"{side}/{name}: {edit}"


# ================================================================================================ VOC files
DETECTION_LINES = ["", "x", "000001 0.5 1 2 3", "000001 nan 1 2 3 4", "000001 0.5 inf 2 3 4", "000001 0.5 1e308 2 3 4",
                   "000001 0.5 4 3 2 1", "../../etc/passwd 0.5 1 2 3 4", "000001 0.5 1 2 3 4 5 6",
                   "000001\t0.5\t1\t2\t3\t4", "nosuchimage 0.5 1 2 3 4", "000001 -1 1 2 3 4", "000001 1e400 1 2 3 4",
                   "000001 0.5 " + "9" * 5000 + " 2 3 4", "000001 0x10 1 2 3 4", "000001 1_0 1 2 3 4",
                   "000001 0.5 -1e9 -1e9 1e9 1e9", "000001 0.5 1 2 3 4 # comment", "\x00", "000001 0.5 1 2 3 4\x00",
                   "caf\xe9 0.5 1 2 3 4", "000001 0.5 1 2 3 4\r", " 000001  0.5  1  2  3  4 "]
def _first(xml: bytes, tag: bytes, value: bytes) -> bytes:
    """``xml`` with the text of the first ``<tag>`` replaced by ``value``."""
    return re.sub(rb"<%s>[^<]*</%s>" % (tag, tag), b"<%s>%s</%s>" % (tag, value, tag), xml, count=1)


XML_EDITS = {
    "malformed": lambda x: x[: len(x) // 2],
    "not an annotation": lambda x: b"<html><body/></html>",
    "billion laughs": lambda x: x.replace(b"<annotation>", b"<!DOCTYPE annotation [" + b"".join(
        b'<!ENTITY l%d "%s">' % (i, (b"&l%d;" % (i - 1)) * 10 if i else b"lol") for i in range(10)) +
        b"]><annotation>").replace(b"<pose>Unspecified</pose>", b"<pose>&l9;</pose>", 1),
    "external entity": lambda x: x.replace(b"<annotation>", b'<!DOCTYPE annotation [<!ENTITY e SYSTEM '
                                           b'"file:///etc/passwd">]><annotation>').replace(b"<name>", b"<name>&e;", 1),
    "deep nesting": lambda x: x.replace(b"</annotation>", b"<a>" * 100_000 + b"</a>" * 100_000 + b"</annotation>"),
    "size zero": lambda x: x.replace(b"<width>64</width>", b"<width>0</width>"),
    "size huge": lambda x: x.replace(b"<width>64</width>", b"<width>1000000000</width>"),
    "size not a number": lambda x: x.replace(b"<height>64</height>", b"<height>sixty</height>"),
    "no size": lambda x: x.replace(b"<size>", b"<nosize>").replace(b"</size>", b"</nosize>"),
    "box not a number": lambda x: _first(x, b"xmin", b"x"),
    "box NaN": lambda x: _first(x, b"xmax", b"nan"),
    "box huge": lambda x: _first(x, b"xmax", b"9999999999999999999"),
    "box inverted": lambda x: _first(x, b"xmin", b"60"),
    "unknown class": lambda x: x.replace(b"<name>", b"<name>dog", 1),
    "no filename": lambda x: x.replace(b"<filename>", b"<file>").replace(b"</filename>", b"</file>"),
    "difficult 2": lambda x: x.replace(b"<difficult>0", b"<difficult>2", 1),
    "latin-1 declared": lambda x: b'<?xml version="1.0" encoding="latin-1"?>' + x.replace(b"Unspecified", b"caf\xe9"),
    "latin-1 undeclared": lambda x: x.replace(b"Unspecified", b"caf\xe9"),
    "utf-16": lambda x: x.decode().encode("utf-16"),
    "empty": lambda x: b"",
    "removed": lambda x: None,
}
def _repeated_lines(text: bytes, count: int) -> bytes:
    """The lines of ``text`` repeated to ``count`` lines: never more, however often it is applied."""
    lines = text.splitlines(keepends=True) or [b"\n"]
    return b"".join((lines * (count // len(lines) + 1))[:count])


SPLIT_EDITS = {
    "latin-1": lambda t: t + "caf\xe9\n".encode("latin-1"), "BOM": lambda t: b"\xef\xbb\xbf" + t,
    "CRLF": lambda t: t.replace(b"\n", b"\r\n"), "empty": lambda t: b"", "unknown id": lambda t: t + b"nosuchimage\n",
    "path traversal": lambda t: t + b"../../../etc/passwd\n", "blank lines": lambda t: b"\n\n" + t + b"\n\n",
    "many lines": lambda t: _repeated_lines(t, 20_000), "NUL": lambda t: t + b"a\x00b\n",
    "utf-16": lambda t: t.decode().encode("utf-16"),
    "removed": lambda t: None,
}


@st.composite
def voc_cases(draw: st.DrawFn, shared: Shared) -> Case:
    """`segkit score --task voc` of detection files made from a VOC folder, against it, one of them broken."""
    gt = {f"in/gt/{name}": content for name, content in shared.voc_files.items()}
    dets = {f"in/dets/comp4_det_val_{name}.txt": "\n".join(lines) + "\n" for name, lines in shared.detections.items()}
    dets = {name: text.encode() for name, text in dets.items()}
    notes = []
    for _ in range(draw(FEW)):
        op = draw(st.sampled_from(["line", "detection file", "xml", "split", "line"]))
        edit = {"line": _detection_line_edit, "detection file": _detection_file_edit, "xml": _xml_edit,
                "split": _split_edit}[op]
        notes.append(draw(edit(gt, dets)))
    argv = ["score", "--task", "voc", "--gt", "in/gt", "--pred", "in/dets"]
    shapes = [["--classes", "circle,square,triangle"]] * 3
    argv += draw(st.sampled_from(shapes + [[], ["--classes", "a"], ["--classes", "circle,circle,square"]] + shapes))
    val = [["--split", "val"]] * 3
    argv += draw(st.sampled_from(val + [[], ["--split", "../val"], ["--split", ""], ["--split", "val/../val"]] + val))
    argv += draw(st.sampled_from([[], ["--method", "area"], ["--method", "11points"], ["--plus-one"],
                                  ["--iou-thr", "0"], ["--iou-thr", "1"], ["--iou-thr", "-1"], ["--iou-thr", "nan"],
                                  ["--iou-thr", "2"], ["--iou-thr", "0.5", "0.75", "0.5"], []]))
    out = draw(st.sampled_from(OUT_VALUES))
    if out is not None:
        argv += ["--out", out]
    return Case("voc", argv, {**gt, **dets}, note="; ".join(notes))


@st.composite
def _detection_line_edit(draw: st.DrawFn, gt: dict[str, bytes], dets: dict[str, bytes]) -> str:
    """A malformed line put somewhere in a detection file (in place)."""
    if not dets:
        return ""
    name = draw(st.sampled_from(sorted(dets)))
    lines = dets[name].split(b"\n")
    line = draw(st.sampled_from(DETECTION_LINES))
    lines.insert(draw(st.integers(0, len(lines))), line.encode("latin-1"))  # caf\xe9: a latin-1 byte
    dets[name] = b"\n".join(lines)
    return f"{Path(name).name}: line {line[:40]!r}"


@st.composite
def _detection_file_edit(draw: st.DrawFn, gt: dict[str, bytes], dets: dict[str, bytes]) -> str:
    """A detection file removed, made long, replaced by a folder, copied for an unknown class or re-encoded."""
    if not dets:
        return ""
    name = draw(st.sampled_from(sorted(dets)))
    how = draw(st.sampled_from(["removed", "many lines", "folder", "unknown class", "encoding"]))
    if how == "removed":
        dets.pop(name)
    elif how == "many lines":
        dets[name] = _repeated_lines(dets[name], 100_000)
    elif how == "folder":
        del dets[name]
        dets[f"{name}/x"] = b""  # a folder of that name
    elif how == "unknown class":
        dets["in/dets/comp4_det_val_dog.txt"] = dets[name]
    else:
        encoding = draw(st.sampled_from(ENCODING_NAMES))
        dets[name] = encode(dets[name].decode(), encoding)
        how += f" {encoding}"
    return f"{Path(name).name}: {how}"


@st.composite
def _xml_edit(draw: st.DrawFn, gt: dict[str, bytes], dets: dict[str, bytes]) -> str:
    """One annotation XML file broken or removed (in place)."""
    name = draw(st.sampled_from(sorted(n for n in gt if n.endswith(".xml"))))
    edit = draw(st.sampled_from(sorted(XML_EDITS)))
    content = XML_EDITS[edit](gt[name])
    if content is None:
        gt.pop(name)
    else:
        gt[name] = content
    return f"{Path(name).name}: {edit}"


@st.composite
def _split_edit(draw: st.DrawFn, gt: dict[str, bytes], dets: dict[str, bytes]) -> str:
    """The split file broken or removed (in place)."""
    name = "in/gt/ImageSets/Main/val.txt"
    if name not in gt:
        return ""
    edit = draw(st.sampled_from(sorted(SPLIT_EDITS)))
    content = SPLIT_EDITS[edit](gt[name])
    if content is None:
        gt.pop(name)
    else:
        gt[name] = content
    return f"val.txt: {edit}"
