"""CocoDataset: the sample contract, label mapping, filtering and error messages."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from segkit.data.coco import CocoDataset, DatasetError
from segkit.errors import ConfigError, UserError

H, W = 30, 40


def _write(tmp_path: Path, annotations: list[dict[str, Any]], *, images: list[dict[str, Any]] | None = None,
           categories: list[dict[str, Any]] | None = None, write_images: bool = True) -> str:
    images = images if images is not None else [
        {"id": 1, "file_name": "a.png", "height": H, "width": W},
        {"id": 2, "file_name": "b.png", "height": H, "width": W},
    ]
    categories = categories if categories is not None else [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]
    (tmp_path / "img").mkdir(exist_ok=True)
    if write_images:
        for info in images:
            Image.new("RGB", (info["width"], info["height"]), (10, 200, 30)).save(tmp_path / "img" / info["file_name"])
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(ann_file)


def _ann(ann_id: int, image_id: int, category_id: int, bbox: list[float], **extra: Any) -> dict[str, Any]:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "area": bbox[2] * bbox[3],
            "iscrowd": 0, **extra}


def _dataset(tmp_path: Path, annotations: list[dict[str, Any]], **kwargs: Any) -> CocoDataset:
    return CocoDataset(ann_file=_write(tmp_path, annotations), img_dir=str(tmp_path / "img"), **kwargs)


def test_sample_follows_the_dataset_contract(tmp_path: Path) -> None:
    anns = [_ann(1, 1, 7, [2, 3, 10, 5], segmentation=[[2, 3, 12, 3, 12, 8, 2, 8]]),
            _ann(2, 1, 3, [20, 10, 5, 8], segmentation=[[20, 10, 25, 10, 25, 18, 20, 18]])]
    ds = _dataset(tmp_path, anns, with_masks=True)
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert 0 <= image.min() and image.max() <= 1
    assert target["boxes"].dtype == torch.float32 and target["boxes"].tolist() == [[2, 3, 12, 8], [20, 10, 25, 18]]
    assert target["labels"].dtype == torch.int64
    assert target["image_id"] == 1 and isinstance(target["image_id"], int)
    assert target["orig_size"].dtype == torch.int64 and target["orig_size"].tolist() == [H, W]
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (2, H, W)
    assert len(ds) == 2 and ds.num_classes == 2


def test_labels_follow_sorted_category_ids(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, [_ann(1, 1, 7, [2, 3, 10, 5]), _ann(2, 1, 3, [20, 10, 5, 8])])
    assert ds.classes == ["cat", "dog"]
    assert ds.label_to_cat_id == {1: 3, 2: 7} and ds.cat_id_to_label == {3: 1, 7: 2}
    assert ds[0][1]["labels"].tolist() == [2, 1]


def test_crowd_annotations_are_kept_for_evaluation_but_not_given_to_the_model(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, [_ann(1, 1, 7, [2, 3, 10, 5]), _ann(2, 1, 3, [20, 10, 5, 8], iscrowd=1)])
    assert ds[0][1]["labels"].tolist() == [2]
    assert len(ds.coco.getAnnIds(imgIds=[1])) == 2


def test_degenerate_boxes_are_dropped_with_one_warning(tmp_path: Path) -> None:
    anns = [_ann(1, 1, 7, [2, 3, 10, 5]), _ann(11, 1, 7, [2, 3, 0.5, 5]), _ann(12, 1, 7, [50, 3, 4, 4]),
            _ann(13, 2, 3, [5, 5, 3, 0])]
    with pytest.warns(UserWarning) as record:
        ds = _dataset(tmp_path, anns)
    messages = [str(w.message) for w in record if "min_box_size" in str(w.message)]
    assert len(messages) == 1
    assert "3 annotation" in messages[0] and "11, 12, 13" in messages[0]
    assert ds[0][1]["boxes"].shape == (1, 4)


def test_boxes_partly_outside_are_clipped(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, [_ann(1, 1, 7, [-5, 20, 10, 20])])
    assert ds[0][1]["boxes"].tolist() == [[0, 20, 5, H]]


def test_skip_empty_drops_images_without_usable_annotations(tmp_path: Path) -> None:
    anns = [_ann(1, 1, 7, [2, 3, 10, 5]), _ann(2, 2, 7, [2, 3, 10, 5], iscrowd=1)]
    assert _dataset(tmp_path, anns, skip_empty=True).image_ids == [1]
    keep = _dataset(tmp_path, anns, skip_empty=False)
    assert keep.image_ids == [1, 2]
    assert keep[1][1]["boxes"].shape == (0, 4) and keep[1][1]["labels"].shape == (0,)


def test_polygon_and_rle_masks_decode(tmp_path: Path) -> None:
    square = np.zeros((H, W), dtype=np.uint8)
    square[10:20, 5:15] = 1
    compressed = mask_utils.encode(np.asfortranarray(square))
    compressed["counts"] = compressed["counts"].decode("ascii")
    runs, flat, value = [], square.flatten(order="F"), 0
    for start in range(len(flat) + 1):  # uncompressed RLE: run lengths, starting with zeros
        if start == len(flat) or flat[start] != value:
            runs.append(start - sum(runs))
            value = 1 - value
    anns = [
        _ann(1, 1, 7, [5, 10, 10, 10], segmentation=[[5, 10, 15, 10, 15, 20, 5, 20]]),
        _ann(2, 1, 7, [5, 10, 10, 10], segmentation=compressed),
        _ann(3, 1, 7, [5, 10, 10, 10], segmentation={"size": [H, W], "counts": runs}),
    ]
    masks = _dataset(tmp_path, anns, with_masks=True)[0][1]["masks"]
    assert torch.equal(masks[1], torch.from_numpy(square)) and torch.equal(masks[2], torch.from_numpy(square))
    assert abs(int(masks[0].sum()) - 100) <= 25  # polygon rasterisation differs at the border


def _square_rle(height: int = H, width: int = W) -> dict[str, Any]:
    square = np.zeros((height, width), dtype=np.uint8)
    square[2:8, 3:9] = 1
    rle = mask_utils.encode(np.asfortranarray(square))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


_POLYGON = [[2, 3, 12, 3, 12, 8, 2, 8]]


def _with_bad_mask(segmentation: Any, **extra: Any) -> list[dict[str, Any]]:
    """A good annotation on image 1 and annotation 9 on image 2 with ``segmentation`` (if not None)."""
    bad = _ann(9, 2, 3, [2, 3, 10, 5], **extra)
    if segmentation is not None:
        bad["segmentation"] = segmentation
    return [_ann(1, 1, 7, [2, 3, 10, 5], segmentation=_POLYGON), bad]


@pytest.mark.parametrize(("segmentation", "problem"), [
    (None, "has no 'segmentation'"),
    ([], "empty 'segmentation'"),
    ({}, "empty 'segmentation'"),
    ([2, 3, 12, 3, 12, 8], "flat list of numbers"),
    ([[2, 3, 12, 3]], "polygon 0 has 4 number.*at least 3 points"),
    ([[2, 3, 12, 3, 12, 8], []], "polygon 1 has 0 number"),
    ([[2, 3, 12, 3, 12, 8, 2]], "polygon 0 has an odd count of numbers"),
    ([[2, 3, 12, "x", 12, 8]], "polygon 0 holds 'x', which is not a finite number"),
    ([[2, 3, 12, 3, True, 8]], "polygon 0 holds True"),
    ([[2, 3, 12, 3, float("nan"), 8]], "polygon 0 holds nan"),
    ({"size": [H, W]}, "without 'counts'"),
    ({"counts": "abc"}, "without 'size'"),
    ({**_square_rle(), "size": [H + 1, W]}, r"size \[31, 40\] but its image is 30x40"),
    ({**_square_rle(), "size": [W, H]}, r"looks like \[width, height\]"),
    ({"size": [H, W], "counts": [100, 5]}, r"sum to 105.*30x40 = 1200 pixels"),
    ({"size": [H, W], "counts": [1300, -100]}, "not all non-negative integers"),
    ({"size": [H, W], "counts": 5}, "'counts' is of type int"),
])
def test_invalid_mask_names_the_annotation_and_the_problem(tmp_path: Path, segmentation: Any, problem: str) -> None:
    with pytest.raises(DatasetError, match=rf"instances\.json: annotation id 9 \(image id 2\) .*{problem}") as info:
        _dataset(tmp_path, _with_bad_mask(segmentation), with_masks=True)
    assert "invalid_masks: skip" in str(info.value)


def test_masks_are_not_checked_without_with_masks(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, _with_bad_mask([[1, 2]]))
    assert ds[1][1]["labels"].tolist() == [1]


def test_file_without_any_segmentation_is_reported_once(tmp_path: Path) -> None:
    anns = [_ann(1, 1, 7, [2, 3, 10, 5]), _ann(2, 2, 3, [2, 3, 10, 5])]
    with pytest.raises(DatasetError, match=r"with_masks: true\) but .*instances\.json has no 'segmentation' in any "
                                           r"annotation; use a detection config"):
        _dataset(tmp_path, anns, with_masks=True)


def test_error_counts_the_other_invalid_masks(tmp_path: Path) -> None:
    anns = _with_bad_mask([[1, 2]]) + [_ann(10, 2, 3, [2, 3, 10, 5]), _ann(11, 1, 3, [2, 3, 10, 5], segmentation=[])]
    with pytest.raises(DatasetError, match=r"annotation id 9 .*\(2 more annotation\(s\) have an invalid mask"):
        _dataset(tmp_path, anns, with_masks=True)


def test_wrong_size_rle_on_a_crowd_annotation_is_reported(tmp_path: Path) -> None:
    anns = _with_bad_mask({"size": [H, W], "counts": [7]}, iscrowd=1)
    with pytest.raises(DatasetError, match=r"annotation id 9 .*sum to 7"):
        _dataset(tmp_path, anns, with_masks=True)


def test_skip_drops_invalid_masks_from_the_targets_with_one_warning(tmp_path: Path) -> None:
    anns = _with_bad_mask([[1, 2]]) + [_ann(10, 2, 3, [2, 3, 10, 5], segmentation=_POLYGON),
                                        _ann(11, 2, 7, [2, 3, 10, 5], segmentation={"size": [W, H], "counts": "a"})]
    with pytest.warns(UserWarning) as record:
        ds = _dataset(tmp_path, anns, with_masks=True, invalid_masks="skip")
    messages = [str(w.message) for w in record if "invalid mask" in str(w.message)]
    assert len(messages) == 1
    assert "2 annotation(s)" in messages[0] and "ids 9, 11" in messages[0]
    target = ds[1][1]
    assert target["labels"].tolist() == [1] and target["masks"].shape == (1, H, W)
    assert sorted(ds.coco.getAnnIds(imgIds=[2])) == [9, 10, 11]  # still ground truth for evaluation


def test_skip_with_skip_empty_drops_an_image_left_without_annotations(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="invalid mask"):
        ds = _dataset(tmp_path, _with_bad_mask([]), with_masks=True, invalid_masks="skip", skip_empty=True)
    assert ds.image_ids == [1]


def test_unknown_invalid_masks_value_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'error'.*'skip'.*'drop'") as info:
        _dataset(tmp_path, [], invalid_masks="drop")
    assert info.value.key == "invalid_masks"


def test_config_error_key_includes_the_dataset_path(tmp_path: Path) -> None:
    cfg = {"ann_file": _write(tmp_path, []), "img_dir": str(tmp_path / "img"), "invalid_masks": "drop"}
    with pytest.raises(ConfigError) as info:
        CocoDataset.from_config(cfg, path="data.train")
    assert info.value.key == "data.train.invalid_masks"


def test_polygon_without_area_gives_an_empty_mask(tmp_path: Path) -> None:
    anns = [_ann(1, 1, 7, [5, 5, 10, 5], segmentation=[[5, 5, 5, 5, 5, 5]]),
            _ann(2, 1, 7, [5, 5, 10, 5], segmentation=[[5, 5, 10, 5, 15, 5]])]  # a line
    masks = _dataset(tmp_path, anns, with_masks=True)[0][1]["masks"]
    assert masks.shape == (2, H, W) and int(masks.sum()) == 0


def test_compressed_rle_that_does_not_fit_its_size_names_the_annotation(tmp_path: Path) -> None:
    big = _square_rle(2 * H, W)  # encoded for a taller image, then given this image's size
    with pytest.raises(DatasetError, match=r"annotation id 9 \(image id 2\) .*2400, but the mask has 1200 pixels"
                                           r".*30x40"):
        _dataset(tmp_path, _with_bad_mask({**big, "size": [H, W]}), with_masks=True)


def test_category_ids_fix_labels_and_names(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, [_ann(1, 1, 7, [2, 3, 10, 5]), _ann(2, 1, 3, [20, 10, 5, 8])], category_ids=[1, 2, 3, 7])
    assert ds.classes == ["N/A", "N/A", "cat", "dog"] and ds.num_classes == 4
    assert ds.label_to_cat_id == {1: 1, 2: 2, 3: 3, 4: 7} and ds.cat_id_to_label == {1: 1, 2: 2, 3: 3, 7: 4}
    assert ds[0][1]["labels"].tolist() == [4, 3]


def test_category_ids_keep_the_listed_order(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, [_ann(1, 1, 7, [2, 3, 10, 5])], category_ids=(7, 3))
    assert ds.classes == ["dog", "cat"] and ds[0][1]["labels"].tolist() == [1]


def test_annotation_outside_category_ids_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"annotation id 2 \(image id 1\) has category_id 3, which the "
                                           r"dataset's category_ids option does not list \(7, 8\)"):
        _dataset(tmp_path, [_ann(1, 1, 7, [2, 3, 10, 5]), _ann(2, 1, 3, [2, 3, 10, 5])], category_ids=[7, 8])


@pytest.mark.parametrize(("category_ids", "problem"), [
    ([1, 3, 7, 3], "lists 3 more than once"),
    ([], "is empty"),
    ("1,2", "must be a list of integer"),
    ([1, "2"], "entry 1 is '2'"),
])
def test_invalid_category_ids_are_a_config_error(tmp_path: Path, category_ids: Any, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        _dataset(tmp_path, [], category_ids=category_ids)
    assert info.value.key == "category_ids"


def test_missing_image_file_names_the_file_and_image_id(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, [_ann(1, 2, 7, [2, 3, 10, 5])])
    os.remove(tmp_path / "img" / "b.png")
    with pytest.raises(UserError) as info:
        ds[1]
    assert "b.png" in str(info.value) and "image id 2" in str(info.value)


def test_undecodable_image_names_the_file_and_image_id(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, [])
    (tmp_path / "img" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"a\.png.*image id 1"):
        ds[0]


def test_annotation_id_zero_warns_about_pycocotools(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="id 0.*pycocotools"):
        _dataset(tmp_path, [_ann(0, 1, 7, [2, 3, 10, 5])])


def test_unknown_category_names_the_annotation(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="annotation id 5 has category_id 99"):
        _dataset(tmp_path, [_ann(5, 1, 99, [2, 3, 10, 5])])


def test_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        CocoDataset(ann_file=str(tmp_path / "nope.json"), img_dir=str(tmp_path))


def test_annotation_file_that_is_not_json(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        CocoDataset(ann_file=str(tmp_path / "bad.json"), img_dir=str(tmp_path))


def test_annotation_file_without_required_keys(tmp_path: Path) -> None:
    (tmp_path / "partial.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match="'annotations', 'categories'"):
        CocoDataset(ann_file=str(tmp_path / "partial.json"), img_dir=str(tmp_path))


def test_no_warning_for_a_clean_file(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _dataset(tmp_path, [_ann(1, 1, 7, [2, 3, 10, 5])])
