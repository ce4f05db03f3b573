"""Fault corpus for image files and COCO annotation files: each broken input is generated here and
must give either a documented recovery or a DatasetError naming the file and the record
(docs/faults.md lists every case with what segkit does). Cases already covered next to the code they
test (tests/test_data_coco.py, tests/test_data_semseg.py, tests/test_cli.py) are not repeated."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from segkit.data.coco import CocoDataset, DatasetError, load_image

H, W = 40, 48


def _pixels(height: int = H, width: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _coco(tmp_path: Path, *, images: Any = None, annotations: Any = None, categories: Any = None,
          drop: str | None = None) -> str:
    """A two-image COCO file (a.png with one box, b.png with one box) with parts replaced or dropped."""
    (tmp_path / "img").mkdir(exist_ok=True)
    for name, seed in (("a.png", 0), ("b.png", 1)):
        if not (tmp_path / "img" / name).exists():
            Image.fromarray(_pixels(seed=seed)).save(tmp_path / "img" / name)
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": H, "width": W},
                   {"id": 2, "file_name": "b.png", "height": H, "width": W}] if images is None else images,
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 10], "area": 200, "iscrowd": 0},
        ] if annotations is None else annotations,
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}] if categories is None else categories,
    }
    if drop:
        del data[drop]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return str(path)


def _dataset(tmp_path: Path, **kwargs: Any) -> CocoDataset:
    options = {k: kwargs.pop(k) for k in ("transforms", "skip_empty", "with_masks") if k in kwargs}
    return CocoDataset(ann_file=_coco(tmp_path, **kwargs), img_dir=str(tmp_path / "img"), **options)


# ------------------------------------------------------------------------------- image files
def _save(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _encoded(array: np.ndarray, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("case,data", [
    ("zero_byte", b""),
    ("truncated_png", _encoded(_pixels(), "PNG")[:200]),
    ("truncated_jpeg", _encoded(_pixels(), "JPEG")[:300]),
    ("not_an_image", b"name,value\nfoo,1\n"),
])
def test_broken_image_file_names_the_file_and_image_id(tmp_path: Path, case: str, data: bytes):
    path = _save(tmp_path, f"{case}.png", data)
    with pytest.raises(DatasetError, match=rf"cannot decode image file '.*{case}\.png' \(image id 7\).*corrupt"):
        load_image(path, image_id=7)


def test_missing_image_file_says_where_it_was_looked_for(tmp_path: Path):
    with pytest.raises(DatasetError, match=r"image file '.*nowhere\.jpg' \(image id 3\) does not exist.*img_dir"):
        load_image(str(tmp_path / "nowhere.jpg"), image_id=3)


def test_grayscale_image_becomes_three_equal_channels(tmp_path: Path):
    gray = _pixels()[..., 0]
    path = _save(tmp_path, "gray.png", _encoded(gray, "PNG"))
    image = load_image(path)
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], gray)


def test_rgba_image_drops_the_alpha_channel(tmp_path: Path):
    rgba = np.concatenate([_pixels(), np.full((H, W, 1), 17, np.uint8)], axis=2)
    image = load_image(_save(tmp_path, "rgba.png", _encoded(rgba, "PNG")))
    np.testing.assert_array_equal(image, rgba[..., :3])


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path: Path):
    wide = np.linspace(0, 65535, H * W).round().astype(np.uint16).reshape(H, W)
    image = load_image(_save(tmp_path, "deep.png", _encoded(wide, "PNG")))
    np.testing.assert_array_equal(image[..., 0], np.rint(wide / 257.0).astype(np.uint8))
    assert image.max() == 255 and image.min() == 0
    assert (image[..., 0] == 255).mean() < 0.01  # clipping at 255 would saturate most pixels


def test_float_image_is_refused_with_the_fix(tmp_path: Path):
    path = str(tmp_path / "float.tiff")
    Image.fromarray(np.random.default_rng(0).random((H, W)).astype(np.float32)).save(path)
    with pytest.raises(DatasetError, match=r"float.tiff' \(image id 5\) holds floating-point pixels.*8-bit"):
        load_image(path, image_id=5)


def test_exif_rotated_jpeg_is_read_upright(tmp_path: Path):
    """A camera stores the sensor's pixels and an orientation tag; viewers (and annotation tools)
    show the image rotated. Orientation 6 = rotate 90 degrees clockwise to display."""
    stored = np.zeros((H, W, 3), np.uint8)
    stored[:8, :8] = 255  # a white block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path, "camera.jpg", _encoded(stored, "JPEG", quality=100, exif=exif.tobytes()))
    image = load_image(path)
    assert image.shape == (W, H, 3)  # upright: width and height swapped
    assert image[:8, -8:].mean() > 200 and image[:8, :8].mean() < 50  # the block is now top-right


def test_exif_rotated_image_with_unrotated_annotation_size_is_named(tmp_path: Path):
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "img").mkdir()
    Image.fromarray(_pixels(seed=0)).save(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "b.png").write_bytes(_encoded(_pixels(seed=1), "JPEG", exif=exif.tobytes()))
    dataset = _dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"b\.png' \(image id 2\) is 48x40 \(HxW\) but the annotation file says 40x48"):
        dataset[1]


def test_image_much_larger_than_the_training_size_is_resized_with_its_boxes(tmp_path: Path):
    big_h, big_w = 1200, 1600
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((big_h, big_w, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    images = [{"id": 1, "file_name": "a.png", "height": big_h, "width": big_w}]
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [400, 300, 800, 600], "area": 480000,
                    "iscrowd": 0}]
    dataset = _dataset(tmp_path, images=images, annotations=annotations,
                       transforms=[{"type": "LongestMaxSize", "max_size": 160}])
    image, target = dataset[0]
    assert tuple(image.shape) == (3, 120, 160)
    np.testing.assert_allclose(target["boxes"].numpy(), [[40, 30, 120, 90]], atol=1e-4)
    assert target["orig_size"].tolist() == [big_h, big_w]


# ------------------------------------------------------------------------ COCO annotation files
@pytest.mark.parametrize("replace,message", [
    ({"images": {"1": "a.png"}}, r"'images' in '.*instances\.json' must be a list, got dict"),
    ({"annotations": "none"}, r"'annotations' in '.*instances\.json' must be a list, got str"),
    ({"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}] * 2},
     r"'images' in '.*instances\.json' uses the id 1 more than once"),
    ({"annotations": [{"id": 4, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0},
                      {"id": 4, "image_id": 2, "category_id": 2, "bbox": [5, 5, 9, 9], "area": 81, "iscrowd": 0}]},
     r"'annotations' in '.*instances\.json' uses the id 4 more than once"),
])
def test_malformed_coco_structure_names_the_file_and_the_part(tmp_path: Path, replace: dict, message: str):
    with pytest.raises(DatasetError, match=message):
        _dataset(tmp_path, **replace)


@pytest.mark.parametrize("bbox", [[2, 2, -3, 10], [2, 2, 0, 10], [100, 100, 10, 10]],
                         ids=["negative_width", "zero_width", "outside_the_image"])
def test_unusable_box_is_dropped_with_one_counted_warning_naming_the_annotation(tmp_path: Path, bbox: list):
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": bbox, "area": 1, "iscrowd": 0},
                   {"id": 2, "image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 10], "area": 200, "iscrowd": 0}]
    with pytest.warns(UserWarning, match=r"instances\.json: dropped 1 annotation\(s\).*\(annotation ids 1\)"):
        dataset = _dataset(tmp_path, annotations=annotations)
    assert len(dataset[0][1]["boxes"]) == 0 and len(dataset[1][1]["boxes"]) == 1


def test_image_with_more_boxes_than_training_can_match_is_refused_naming_file_and_image(tmp_path: Path):
    from segkit.ops.labels import MAX_BOXES_PER_IMAGE

    many = [{"id": k, "image_id": 2, "category_id": 1, "bbox": [k % 30, k % 20, 10, 10], "area": 100, "iscrowd": 0}
            for k in range(1, MAX_BOXES_PER_IMAGE + 2)]
    with pytest.raises(DatasetError, match=r"instances\.json: image_id 2 has 10,001 boxes, more than the 10,000"):
        _dataset(tmp_path, annotations=many)
    assert len(_dataset(tmp_path, annotations=many[:-1])) == 2  # at the limit: accepted


def test_crowd_rle_is_kept_for_evaluation_but_not_trained_on(tmp_path: Path):
    crowd = {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 48, 40], "area": 1920, "iscrowd": 1,
             "segmentation": {"size": [H, W], "counts": [0, H * W]}}
    annotations = [crowd, {"id": 1, "image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 10], "area": 100,
                           "iscrowd": 0, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]}]
    dataset = _dataset(tmp_path, annotations=annotations, with_masks=True)
    _, target = dataset[0]
    assert target["labels"].tolist() == [2] and tuple(target["masks"].shape) == (1, H, W)
    assert dataset.coco.anns[3]["iscrowd"] == 1


def test_image_without_annotations_is_kept_for_evaluation_and_skipped_for_training(tmp_path: Path):
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(_dataset(tmp_path, annotations=annotations)) == 2
    assert len(_dataset(tmp_path, annotations=annotations, skip_empty=True)) == 1


def test_empty_dataset_is_refused_when_training_starts(tmp_path: Path, tiny_config: Path,
                                                       capsys: pytest.CaptureFixture[str]):
    from segkit.cli import main

    ann_file = _coco(tmp_path, images=[], annotations=[])
    config = tmp_path / "empty.yaml"
    config.write_text(f"_base_: [{tiny_config.name}]\n"
                      f"data:\n  train: {{_delete_: true, type: CocoDataset, ann_file: '{ann_file}', "
                      f"img_dir: '{tmp_path / 'img'}'}}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(config), "model.roi_head.num_classes=2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "instances.json" in err and "no images" in err and "Traceback" not in err
