"""Hostile and foreign data files: every one ends in a message naming the file and the record.

Each case is a real file: polygons that would crash pycocotools, JSON nested a million deep,
Latin-1 and UTF-16 text, ids beyond 64 bits, PNG headers declaring ten billion pixels, NUL bytes
in file names, garbage RLE in results files. See docs/faults.md.
"""

from __future__ import annotations

import codecs
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from segkit.cli import main
from segkit.data.coco import CocoDataset, DatasetError, load_image
from segkit.errors import ConfigError, UserError

H, W = 30, 40
SQUARE = [[2, 3, 12, 3, 12, 8, 2, 8]]


# ---------------------------------------------------------------------- writing files
def _coco(tmp_path: Path, *, annotations: list[dict[str, Any]] | None = None,
          images: list[dict[str, Any]] | None = None, categories: list[dict[str, Any]] | None = None) -> dict:
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.new("RGB", (W, H), (10, 200, 30)).save(tmp_path / "img" / "a.png")
    return {
        "images": images if images is not None else [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
        "annotations": annotations if annotations is not None else [_ann(1)],
        "categories": categories if categories is not None else [{"id": 1, "name": "dog"}],
    }


def _ann(ann_id: int, segmentation: Any = None, **extra: Any) -> dict[str, Any]:
    return {"id": ann_id, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 5], "area": 50, "iscrowd": 0,
            "segmentation": SQUARE if segmentation is None else segmentation, **extra}


def _write_json(path: Path, data: Any) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def _dataset(tmp_path: Path, data: dict, **kwargs: Any) -> CocoDataset:
    return CocoDataset(ann_file=_write_json(tmp_path / "instances.json", data), img_dir=str(tmp_path / "img"),
                       **kwargs)


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, " ".join(err.split())


def _png_declaring(path: Path, width: int, height: int) -> None:
    """A valid PNG header declaring ``width x height`` 8-bit grey pixels, with one compressed row of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
                     + chunk(b"IEND", b""))


# ---------------------------------------------------------------------- polygons
def test_polygon_with_huge_coordinates_is_refused_naming_the_annotation(tmp_path: Path) -> None:
    data = _coco(tmp_path, annotations=[_ann(7, [[0, 0, 1e9, 0, 1e9, 1e9, 0, 1e9]])])
    with pytest.raises(DatasetError, match=r"annotation id 7 \(image id 1\) .*x coordinate 1e\+09, far outside its "
                                           r"30x40 \(HxW\) image"):
        _dataset(tmp_path, data, with_masks=True)


def test_polygon_whose_outline_is_too_long_to_rasterise_is_refused(tmp_path: Path) -> None:
    zigzag = np.zeros((20000, 2))
    zigzag[1::2, 0] = W  # every edge crosses the whole image
    zigzag[:, 1] = np.linspace(0, H, len(zigzag))
    data = _coco(tmp_path, annotations=[_ann(3, [zigzag.ravel().tolist()])])
    with pytest.raises(DatasetError, match=r"annotation id 3 .*20000 points whose outline is too long .*at most 100 x "
                                           r"\(height \+ width\) = 7000"):
        _dataset(tmp_path, data, with_masks=True)


def test_polygon_with_an_integer_beyond_the_floats_is_refused(tmp_path: Path) -> None:
    data = _coco(tmp_path, annotations=[_ann(4, [[0, 0, 10**400, 0, 10, 10]])])
    with pytest.raises(DatasetError, match=r"annotation id 4 .*polygon 0 holds 1000.*which is not a finite number"):
        _dataset(tmp_path, data, with_masks=True)


def test_polygon_a_little_outside_the_image_is_rasterised(tmp_path: Path) -> None:
    data = _coco(tmp_path, annotations=[_ann(1, [[-30.0, -20.0, 70, -20, 70, 50, -30, 50]])])
    _, target = _dataset(tmp_path, data, with_masks=True)[0]
    assert target["masks"].shape == (1, H, W) and int(target["masks"].sum()) == H * W


def test_data_check_reports_a_huge_polygon_instead_of_crashing(tmp_path: Path, capsys) -> None:
    data = _coco(tmp_path, annotations=[_ann(1), _ann(2, [[0, 0, 1e9, 0, 1e9, 1e9, 0, 1e9]])])
    ann_file = _write_json(tmp_path / "instances.json", data)
    config = tmp_path / "data.yaml"
    config.write_text(f"data:\n  val: {{type: CocoDataset, ann_file: '{ann_file}', img_dir: '{tmp_path / 'img'}'}}\n")
    code = main(["data", "check", str(config)])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 1
    assert "annotation id 2: has a 'segmentation' whose polygon 0 has the x coordinate 1e+09" in out


def test_segm_score_refuses_a_ground_truth_polygon_far_outside_its_image(tmp_path: Path, capsys) -> None:
    gt = _write_json(tmp_path / "gt.json", _coco(tmp_path, annotations=[_ann(5, [[0, 0, 2e9, 0, 2e9, 9, 0, 9]])]))
    results = _write_json(tmp_path / "results.json", [])
    code, err = _cli(["score", "--task", "segm", "--gt", gt, "--pred", results], capsys)
    assert code == 2 and f"{gt}: annotation id 5 (image id 1) has a 'segmentation' whose polygon 0" in err


def test_segm_evaluation_refuses_a_skipped_mask_that_cannot_be_rasterised(tmp_path: Path) -> None:
    from segkit.evaluation.coco import CocoEvaluator

    data = _coco(tmp_path, annotations=[_ann(1), _ann(2, [[0, 0, 1e9, 0, 1e9, 1e9, 0, 1e9]])])
    with pytest.warns(UserWarning, match="invalid_masks: skip"):
        dataset = _dataset(tmp_path, data, with_masks=True, invalid_masks="skip")
    with pytest.raises(DatasetError, match=r"annotation id 2 \(image id 1\) .*far outside.*'segm' evaluation"):
        CocoEvaluator(dataset=dataset, iou_types=["bbox", "segm"])


def test_ground_truth_rle_without_size_is_refused_by_segm_score(tmp_path: Path, capsys) -> None:
    gt = _write_json(tmp_path / "gt.json", _coco(tmp_path, annotations=[_ann(6, {"counts": "abc"})]))
    code, err = _cli(["score", "--task", "segm", "--gt", gt, "--pred", _write_json(tmp_path / "r.json", [])], capsys)
    assert code == 2 and "annotation id 6 (image id 1) has an RLE 'segmentation' without 'size'" in err


# ---------------------------------------------------------------------- nesting
@pytest.mark.parametrize("depth", [150, 10**6])
def test_deeply_nested_annotation_file_is_refused_naming_the_file(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "deep.json"
    path.write_text('{"images": ' + "[" * depth + "]" * depth + ', "annotations": [], "categories": []}')
    with pytest.raises(DatasetError, match=r"annotation file '.*deep\.json' nests arrays or objects more than 100"):
        CocoDataset(ann_file=str(path), img_dir=str(tmp_path))


def test_deeply_nested_results_file_exits_2_naming_the_file(tmp_path: Path, capsys) -> None:
    gt = _write_json(tmp_path / "gt.json", _coco(tmp_path))
    results = tmp_path / "results.json"
    results.write_text("[" * 10**6 + "]" * 10**6)
    code, err = _cli(["score", "--task", "bbox", "--gt", gt, "--pred", str(results)], capsys)
    assert code == 2 and f"results file '{results}' nests arrays or objects more than 100 levels" in err


def test_brackets_inside_json_strings_do_not_count_as_nesting(tmp_path: Path) -> None:
    from segkit.textio import load_json

    path = tmp_path / "names.json"
    path.write_text(json.dumps({"name": "[" * 500 + '\\"{', "list": [[["x]"]]]}))
    assert load_json(path, max_depth=4)["list"] == [[["x]"]]]  # 4 deep: the object and 3 lists


def test_json_syntax_error_names_the_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"images": [],\n  "annotations": [1,, 2]}')
    with pytest.raises(DatasetError, match=r"'.*bad\.json' is not valid JSON: Expecting value at line 2, column 21"):
        CocoDataset(ann_file=str(path), img_dir=str(tmp_path))


# ---------------------------------------------------------------------- encodings
def test_annotation_file_with_a_utf8_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(codecs.BOM_UTF8 + json.dumps(_coco(tmp_path)).encode("utf-8"))
    assert len(CocoDataset(ann_file=str(path), img_dir=str(tmp_path / "img"))) == 1


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_annotation_file_in_utf16_or_utf32_with_a_byte_order_mark_is_read(tmp_path: Path, encoding: str) -> None:
    data = _coco(tmp_path)
    data["categories"][0]["name"] = "chien café"
    path = tmp_path / "wide.json"
    path.write_bytes(json.dumps(data, ensure_ascii=False).encode(encoding))  # Python writes the mark first
    assert CocoDataset(ann_file=str(path), img_dir=str(tmp_path / "img")).classes == ["chien café"]


def test_utf16_file_without_a_byte_order_mark_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nomark.json"
    path.write_bytes(json.dumps(_coco(tmp_path)).encode("utf-16-le"))
    with pytest.raises(DatasetError, match=r"'.*nomark\.json' is not readable text: it begins with NUL bytes, as "
                                           r"UTF-16 .*Save the file as UTF-8"):
        CocoDataset(ann_file=str(path), img_dir=str(tmp_path))


def test_latin1_annotation_file_names_the_line_and_byte(tmp_path: Path) -> None:
    data = _coco(tmp_path)
    data["categories"][0]["name"] = "café"
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps(data, ensure_ascii=False, indent=1).encode("latin-1"))
    offset = path.read_bytes().index(b"\xe9")
    line = path.read_bytes()[:offset].count(b"\n") + 1
    with pytest.raises(DatasetError, match=rf"annotation file '.*latin1\.json' is not readable text: it is not valid "
                                           rf"UTF-8.*\(0xe9\) is on line {line} after '.*caf', at byte offset {offset} "
                                           rf"of the file\. Save the file as UTF-8"):
        CocoDataset(ann_file=str(path), img_dir=str(tmp_path))


def test_latin1_voc_split_file_is_named(tmp_path: Path) -> None:
    from segkit.data.voc import VOCDetection

    sets = tmp_path / "VOC2007" / "ImageSets" / "Main"
    sets.mkdir(parents=True)
    (sets / "trainval.txt").write_bytes(b"000005\n00000\xe9\n")
    with pytest.raises(DatasetError, match=r"split file '.*trainval\.txt' is not readable text.*line 2 after "
                                           r"'00000', at byte offset 12"):
        VOCDetection(root=str(tmp_path / "VOC2007"), split="trainval")


def _semseg_folder(tmp_path: Path) -> tuple[Path, Path]:
    img_dir, ann_dir = tmp_path / "img", tmp_path / "ann"
    img_dir.mkdir()
    ann_dir.mkdir()
    Image.new("RGB", (W, H)).save(img_dir / "a.jpg")
    Image.new("L", (W, H)).save(ann_dir / "a.png")
    return img_dir, ann_dir


def test_latin1_segmentation_split_file_is_named(tmp_path: Path) -> None:
    from segkit.data.semseg import SemSegFolder

    img_dir, ann_dir = _semseg_folder(tmp_path)
    split = tmp_path / "split.txt"
    split.write_bytes(b"a\nb\xe9\n")
    with pytest.raises(DatasetError, match=r"split file '.*split\.txt' is not readable text.*line 2 after 'b'"):
        SemSegFolder(img_dir=str(img_dir), ann_dir=str(ann_dir), classes=["bg", "fg"], split=str(split))


def test_latin1_class_file_is_a_config_error_naming_the_line(tmp_path: Path) -> None:
    from segkit.data.semseg import SemSegFolder

    img_dir, ann_dir = _semseg_folder(tmp_path)
    classes = tmp_path / "classes.txt"
    classes.write_bytes(b"background\nv\xe9lo\n")
    with pytest.raises(ConfigError, match=r"class file '.*classes\.txt' is not readable text.*line 2 after 'v'") \
            as info:
        SemSegFolder(img_dir=str(img_dir), ann_dir=str(ann_dir), classes=str(classes))
    assert info.value.key == "classes"


def test_split_file_line_with_a_nul_byte_is_named(tmp_path: Path) -> None:
    from segkit.data.semseg import SemSegFolder

    img_dir, ann_dir = _semseg_folder(tmp_path)
    split = tmp_path / "split.txt"
    split.write_bytes(b"a\nb\x00c\n")
    with pytest.raises(DatasetError, match=r"split file '.*split\.txt', line 2, holds a NUL character"):
        SemSegFolder(img_dir=str(img_dir), ann_dir=str(ann_dir), classes=["bg", "fg"], split=str(split))


def test_latin1_class_list_of_score_exits_2(tmp_path: Path, capsys) -> None:
    img_dir, ann_dir = _semseg_folder(tmp_path)
    classes = tmp_path / "classes.txt"
    classes.write_bytes(b"fond\n\xe9cole\n")
    code, err = _cli(["score", "--task", "semseg", "--gt", str(ann_dir), "--pred", str(ann_dir), "--num-classes", "2",
                      "--classes", str(classes)], capsys)
    assert code == 2 and f"class file '{classes}' is not readable text" in err and "line 2" in err


# ---------------------------------------------------------------------- ids, image sizes, file names
@pytest.mark.parametrize("part, value", [("annotations", 2**63), ("images", 2**64), ("categories", -(2**63) - 1)])
def test_id_beyond_64_bits_is_refused_naming_the_entry(tmp_path: Path, part: str, value: int) -> None:
    data = _coco(tmp_path)
    data[part][0]["id"] = value
    data["annotations"][0].update({"images": {"image_id": value}, "categories": {"category_id": value}}.get(part, {}))
    with pytest.raises(DatasetError, match=rf"entry 0 of '{part}' in '.*' has the id {value}, beyond the 64-bit "
                                           rf"integers"):
        _dataset(tmp_path, data)


def test_annotated_size_over_the_pixel_limit_is_refused_before_masks_are_made(tmp_path: Path) -> None:
    data = _coco(tmp_path, images=[{"id": 1, "file_name": "a.png", "height": 10**6, "width": 10**6}])
    with pytest.raises(DatasetError, match=r"image id 1 in '.*' is 1000000x1000000 \(HxW\) = 1,000,000,000,000 "
                                           r"pixels, more than segkit decodes .*SEGKIT_MAX_IMAGE_PIXELS"):
        _dataset(tmp_path, data, with_masks=True)


def test_voc_size_over_the_pixel_limit_names_the_xml_file(tmp_path: Path) -> None:
    from segkit.data.voc import parse_voc_xml

    path = tmp_path / "a.xml"
    path.write_text("<annotation><filename>a.jpg</filename><size><width>1000000</width><height>1000000</height>"
                    "</size></annotation>")
    with pytest.raises(DatasetError, match=r"annotation file '.*a\.xml', <size> is 1000000x1000000 \(HxW\)"):
        parse_voc_xml(str(path))


def test_voc_annotation_path_that_is_a_folder_is_named(tmp_path: Path) -> None:
    from segkit.data.voc import parse_voc_xml

    (tmp_path / "000005.xml").mkdir()
    with pytest.raises(DatasetError, match=r"cannot read annotation file '.*000005\.xml': Is a directory"):
        parse_voc_xml(str(tmp_path / "000005.xml"))


def test_decompression_bomb_image_is_refused_naming_the_file_and_the_limit(tmp_path: Path) -> None:
    _png_declaring(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(DatasetError, match=r"image file '.*bomb\.png' \(image id 4\) is 10,000,000,000 pixels, more "
                                           r"than segkit decodes \(178,956,970 pixels.*SEGKIT_MAX_IMAGE_PIXELS"):
        load_image(str(tmp_path / "bomb.png"), image_id=4)


def test_decompression_bomb_label_map_exits_2_in_score(tmp_path: Path, capsys) -> None:
    _, ann_dir = _semseg_folder(tmp_path)
    pred = tmp_path / "pred"
    pred.mkdir()
    _png_declaring(pred / "a.png", 100_000, 100_000)
    code, err = _cli(["score", "--task", "semseg", "--gt", str(ann_dir), "--pred", str(pred), "--num-classes", "2"],
                     capsys)
    assert code == 2 and f"label map '{pred / 'a.png'}' is 10,000,000,000 pixels" in err


def test_pixel_limit_follows_the_environment_variable(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    monkeypatch.setenv("SEGKIT_MAX_IMAGE_PIXELS", "150")
    with pytest.raises(DatasetError, match=r"is 10x20 \(HxW\) = 200 pixels, more than segkit decodes \(150 pixels"):
        load_image(str(tmp_path / "a.png"))
    monkeypatch.setenv("SEGKIT_MAX_IMAGE_PIXELS", "none")
    assert load_image(str(tmp_path / "a.png")).shape == (10, 20, 3)
    monkeypatch.setenv("SEGKIT_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(UserError, match="SEGKIT_MAX_IMAGE_PIXELS='lots' must be a positive number"):
        load_image(str(tmp_path / "a.png"))


def test_pixel_limit_can_be_lifted_for_a_really_large_image(tmp_path: Path, monkeypatch) -> None:
    from segkit.data.coco import open_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    _png_declaring(tmp_path / "large.png", 20_000, 10_000)  # 200 million pixels: over the default limit
    with pytest.raises(DatasetError, match="200,000,000 pixels, more than segkit decodes"):
        load_image(str(tmp_path / "large.png"))
    monkeypatch.setenv("SEGKIT_MAX_IMAGE_PIXELS", "250000000")
    with open_image(str(tmp_path / "large.png"), "image") as im:  # opened as for decoding; not decoded here
        assert im.size == (20_000, 10_000)


def test_nul_byte_in_a_file_name_is_refused_naming_the_image(tmp_path: Path) -> None:
    data = _coco(tmp_path, images=[{"id": 9, "file_name": "a\0.png"}])  # no size: it would be read from the file
    data["annotations"][0]["image_id"] = 9
    with pytest.raises(DatasetError, match=r"image id 9 in '.*' has file_name 'a\\x00\.png', which holds a NUL"):
        _dataset(tmp_path, data)


def test_nul_byte_in_a_predict_input_is_refused(tmp_path: Path) -> None:
    from segkit.predict import find_images

    with pytest.raises(UserError, match=r"input '.*x\\0/\*\.png' holds a NUL character"):
        find_images([f"{tmp_path}/x\0/*.png"])


def test_box_with_an_integer_beyond_the_floats_is_refused(tmp_path: Path) -> None:
    data = _coco(tmp_path, annotations=[_ann(2, bbox=[1, 2, 10**400, 5])])
    with pytest.raises(DatasetError, match=r"annotation id 2 in '.*' has bbox \[1, 2, 1000.*four finite numbers"):
        _dataset(tmp_path, data)


# ---------------------------------------------------------------------- score: results files
def _score_bbox(tmp_path: Path, records: list[dict[str, Any]], capsys, task: str = "bbox") -> tuple[int, str]:
    gt = _write_json(tmp_path / "gt.json", _coco(tmp_path))
    results = _write_json(tmp_path / "results.json", records)
    return _cli(["score", "--task", task, "--gt", gt, "--pred", results], capsys)


@pytest.mark.parametrize("key, value", [("image_id", [1]), ("image_id", {"id": 1}), ("category_id", [1]),
                                        ("image_id", 1.5), ("image_id", True)])
def test_result_id_that_is_not_an_integer_exits_2_naming_the_record(tmp_path: Path, capsys, key: str,
                                                                    value: Any) -> None:
    record = {"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [2, 3, 10, 5], key: value}
    code, err = _score_bbox(tmp_path, [record], capsys)
    assert code == 2 and f"record 0: {key} {value!r} is not an integer" in err


def test_result_box_with_an_integer_beyond_the_floats_exits_2(tmp_path: Path, capsys) -> None:
    record = {"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [2, 3, 10**400, 5]}
    code, err = _score_bbox(tmp_path, [record], capsys)
    assert code == 2 and "record 0: bbox [2, 3, 1000" in err


def _square_rle(height: int, width: int) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    mask = np.zeros((height, width), dtype=np.uint8)
    mask[3:8, 2:12] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


@pytest.mark.parametrize("counts, problem", [
    ("garbage!!", "holds a byte outside COCO's RLE alphabet"),
    ("", "is empty"),
    (_square_rle(H, W)["counts"][:-1] + "Q", "ends in the middle of a run length"),
    (_square_rle(2 * H, W)["counts"], "decodes to run lengths summing to 2400, but the mask has 1200 pixels"),
])
def test_garbage_compressed_rle_in_results_exits_2_instead_of_scoring_0(tmp_path: Path, capsys, counts: str,
                                                                        problem: str) -> None:
    good = {"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": _square_rle(H, W)}
    bad = {**good, "segmentation": {"size": [H, W], "counts": counts}}
    code, err = _score_bbox(tmp_path, [good, bad], capsys, task="segm")
    assert code == 2 and f"record 1 has an RLE 'segmentation' whose 'counts' {problem}" in err


def test_uncompressed_rle_in_results_scores_as_its_compressed_form(tmp_path: Path, capsys) -> None:
    from pycocotools import mask as mask_utils

    compressed = _square_rle(H, W)
    mask = mask_utils.decode({**compressed, "counts": compressed["counts"].encode()}).ravel(order="F").astype(int)
    runs = np.diff(np.flatnonzero(np.diff(np.r_[-1, mask, -1]) != 0)).tolist()  # starts with a background run
    outs = []
    for segmentation in (compressed, {"size": [H, W], "counts": runs}):
        record = {"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": segmentation}
        out = tmp_path / f"m{len(outs)}.json"
        code, err = _cli(["score", "--task", "segm", "--gt", _write_json(tmp_path / "gt.json", _coco(tmp_path)),
                          "--pred", _write_json(tmp_path / "r.json", [record]), "--out", str(out)], capsys)
        assert code == 0, err
        outs.append(json.loads(out.read_text()))
    assert outs[0] == outs[1] and outs[0]["segm/AP"] == pytest.approx(1.0)


def test_uncompressed_rle_that_does_not_cover_the_mask_exits_2(tmp_path: Path, capsys) -> None:
    record = {"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": {"size": [H, W], "counts": [5, 10]}}
    code, err = _score_bbox(tmp_path, [record], capsys, task="segm")
    assert code == 2 and "record 0 has an uncompressed RLE 'segmentation' whose run lengths sum to 15" in err


def test_num_classes_too_large_to_score_exits_2_before_allocating(tmp_path: Path, capsys) -> None:
    _, ann_dir = _semseg_folder(tmp_path)
    code, err = _cli(["score", "--task", "semseg", "--gt", str(ann_dir), "--pred", str(ann_dir),
                      "--num-classes", "200000"], capsys)
    assert code == 2 and "--num-classes 200000 is more than segkit scores (4096)" in err and "298.0 GiB" in err


@pytest.mark.parametrize("classes, message", [("a,a", "names 'a' more than once"),
                                              ("a,b,c", "names 3 classes but --num-classes is 2")])
def test_class_names_that_do_not_fit_the_classes_exit_2(tmp_path: Path, capsys, classes: str, message: str) -> None:
    _, ann_dir = _semseg_folder(tmp_path)
    code, err = _cli(["score", "--task", "semseg", "--gt", str(ann_dir), "--pred", str(ann_dir), "--num-classes", "2",
                      "--classes", classes], capsys)
    assert code == 2 and message in err
