"""Semantic segmentation datasets read label maps correctly and pipelines keep maps aligned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from segkit.data.coco import DatasetError
from segkit.data.semseg import SemSegFolder, default_palette
from segkit.data.semseg_formats import (
    ADE20K, ADE20K_CLASSES, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, CONTEXT_CLASSES, VOC_CLASSES, Cityscapes,
    PascalContext, ShapesSegmentation, VOCSegmentation,
)
from segkit.data.transforms import apply_seg_transforms, build_seg_transforms
from segkit.errors import ConfigError
from segkit.registry import DATASETS

H, W = 24, 32


# ---------------------------------------------------------------------- writing tiny datasets
def _image(path: Path, seed: int, size: tuple[int, int] = (H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _label(path: Path, values: np.ndarray, mode: str = "P") -> None:
    """Write an index label map as a palette ("P") or greyscale ("L") PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(values.astype(np.uint8), mode="L")
    if mode == "P":
        image = image.convert("P")
        image.putpalette(default_palette(256).ravel().tolist())
        image.putdata(values.astype(np.uint8).ravel().tolist())
    image.save(path)


def _stripes(values: list[int]) -> np.ndarray:
    """An H x W map made of vertical stripes with the given values."""
    return np.repeat(np.array(values), -(-W // len(values)))[:W][None, :].repeat(H, 0)


def _folder(root: Path, labels: dict[str, np.ndarray], *, mode: str = "P") -> tuple[Path, Path]:
    for k, (stem, values) in enumerate(labels.items()):
        _image(root / "img" / f"{stem}.jpg", seed=k)
        _label(root / "ann" / f"{stem}.png", values, mode=mode)
    return root / "img", root / "ann"


# ---------------------------------------------------------------------- SemSegFolder
def test_folder_returns_the_contract(tmp_path: Path) -> None:
    raw = _stripes([0, 1, 2, 255])
    img_dir, ann_dir = _folder(tmp_path, {"b": raw, "a": raw[:, ::-1]})
    ds = SemSegFolder(img_dir=str(img_dir), ann_dir=str(ann_dir), classes=["bg", "cat", "dog"])
    assert len(ds) == 2 and ds.classes == ("bg", "cat", "dog") and ds.num_classes == 3 and ds.ignore_index == 255
    assert np.array_equal(ds.palette, default_palette(3)) and ds.palette.dtype == np.uint8
    image, target = ds[1]
    assert image.shape == (3, H, W) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert target["sem_seg"].dtype == torch.int64 and torch.equal(target["sem_seg"], torch.from_numpy(raw).long())
    assert target["image_id"] == 1 and target["file_name"] == "b.jpg"
    assert target["orig_size"].tolist() == [H, W] and target["orig_size"].dtype == torch.int64
    assert ds.image_path(0) == str(img_dir / "a.jpg") and ds.label_path(0) == str(ann_dir / "a.png")
    assert default_palette(21)[15].tolist() == [192, 128, 128]  # VOC's "person" colour


def test_classes_can_come_from_a_text_file_and_l_mode_maps_are_read(tmp_path: Path) -> None:
    img_dir, ann_dir = _folder(tmp_path, {"x": _stripes([0, 1])}, mode="L")
    (tmp_path / "classes.txt").write_text("sky\nroad\n\n")
    ds = SemSegFolder(img_dir=str(img_dir), ann_dir=str(ann_dir), classes=str(tmp_path / "classes.txt"))
    assert ds.classes == ("sky", "road")
    assert ds[0][1]["sem_seg"].unique().tolist() == [0, 1]


def test_reduce_zero_label_ignores_zero_and_shifts_the_rest(tmp_path: Path) -> None:
    img_dir, ann_dir = _folder(tmp_path, {"x": _stripes([0, 1, 2, 255])})
    ds = SemSegFolder(img_dir=str(img_dir), ann_dir=str(ann_dir), classes=["a", "b"], reduce_zero_label=True)
    assert torch.equal(ds[0][1]["sem_seg"], torch.from_numpy(_stripes([255, 0, 1, 255])).long())


def test_label_map_maps_listed_values_and_ignores_the_others(tmp_path: Path) -> None:
    img_dir, ann_dir = _folder(tmp_path, {"x": _stripes([7, 3, 9, 200])})
    ds = SemSegFolder(img_dir=str(img_dir), ann_dir=str(ann_dir), classes=["a", "b"], label_map={3: 0, 7: 1},
                      ignore_index=100)
    assert torch.equal(ds[0][1]["sem_seg"], torch.from_numpy(_stripes([1, 0, 100, 100])).long())


def test_split_file_selects_and_orders_the_images(tmp_path: Path) -> None:
    img_dir, ann_dir = _folder(tmp_path, {"a": _stripes([0]), "b": _stripes([1]), "c": _stripes([0])})
    (tmp_path / "split.txt").write_text("c\nb\n")
    ds = SemSegFolder(img_dir=str(img_dir), ann_dir=str(ann_dir), classes=["x", "y"], split=str(tmp_path / "split.txt"))
    assert [ds[i][1]["file_name"] for i in range(len(ds))] == ["c.jpg", "b.jpg"]


def test_reduce_zero_label_and_label_map_cannot_be_combined(tmp_path: Path) -> None:
    img_dir, ann_dir = _folder(tmp_path, {"x": _stripes([0])})
    with pytest.raises(ConfigError, match="cannot be combined"):
        SemSegFolder(img_dir=str(img_dir), ann_dir=str(ann_dir), classes=["a"], reduce_zero_label=True,
                     label_map={1: 0})


# ---------------------------------------------------------------------- bad inputs name the file
def test_missing_label_map_is_named(tmp_path: Path) -> None:
    img_dir, ann_dir = _folder(tmp_path, {"a": _stripes([0]), "b": _stripes([0])})
    (ann_dir / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of 2 images have no label map: '.*b\.png'"):
        SemSegFolder(img_dir=str(img_dir), ann_dir=str(ann_dir), classes=["a"])


def test_no_images_found_names_the_folder_and_the_suffixes_seen(tmp_path: Path) -> None:
    img_dir, ann_dir = _folder(tmp_path, {"a": _stripes([0])})
    with pytest.raises(DatasetError, match=r"no images ending in '\.png' found under '.*img'.*'\.jpg'"):
        SemSegFolder(img_dir=str(img_dir), ann_dir=str(ann_dir), classes=["a"], img_suffix=".png")


def test_label_map_of_another_size_names_both_files(tmp_path: Path) -> None:
    img_dir, ann_dir = _folder(tmp_path, {"a": _stripes([0])})
    _label(ann_dir / "a.png", np.zeros((H + 1, W), np.uint8))
    ds = SemSegFolder(img_dir=str(img_dir), ann_dir=str(ann_dir), classes=["a"])
    with pytest.raises(DatasetError, match=rf"'.*a\.png' is {H + 1}x{W} .* image '.*a\.jpg' is {H}x{W}"):
        ds[0]


def test_rgb_label_image_is_rejected_with_its_name(tmp_path: Path) -> None:
    img_dir, ann_dir = _folder(tmp_path, {"a": _stripes([0])})
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(ann_dir / "a.png")
    ds = SemSegFolder(img_dir=str(img_dir), ann_dir=str(ann_dir), classes=["a"])
    with pytest.raises(DatasetError, match=r"'.*a\.png' is a colour image \(PIL mode 'RGB'\).*mode 'P'"):
        ds[0]


def test_values_outside_the_classes_are_named(tmp_path: Path) -> None:
    img_dir, ann_dir = _folder(tmp_path, {"a": _stripes([0, 1, 5, 7, 255])})
    ds = SemSegFolder(img_dir=str(img_dir), ann_dir=str(ann_dir), classes=["a", "b"])
    expected = r"'.*a\.png' holds the value\(s\) 5, 7, which are neither a class index 0\.\.1 nor .* 255"
    with pytest.raises(DatasetError, match=expected):
        ds[0]


# ---------------------------------------------------------------------- benchmark layouts
def _voc(root: Path) -> Path:
    voc = root / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for k, stem in enumerate(["a", "b", "c", "d", "e"]):
        _image(voc / "JPEGImages" / f"{stem}.jpg", seed=k)
    for stem, value in [("a", 1), ("b", 2), ("c", 3)]:  # VOC annotates a, b (train) and c (val)
        _label(voc / "SegmentationClass" / f"{stem}.png", _stripes([0, value, 255]))
    (sets / "train.txt").write_text("a\nb\n")
    (sets / "val.txt").write_text("c\n")
    (sets / "trainval.txt").write_text("a\nb\nc\n")
    return voc


def _sbd(root: Path) -> Path:
    sbd = root / "sbd" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    for stem, value in [("b", 20), ("c", 20), ("d", 4), ("e", 5)]:
        seg = _stripes([0, value]).astype(np.uint8)
        scipy.io.savemat(sbd / "cls" / f"{stem}.mat", {"GTcls": {"Segmentation": seg, "CategoriesPresent": value}})
    (sbd / "train.txt").write_text("b\nd\nc\n")
    (sbd / "val.txt").write_text("e\n")
    return sbd


def test_voc_split_has_21_classes_and_keeps_border_ignore(tmp_path: Path) -> None:
    ds = VOCSegmentation(root=str(_voc(tmp_path)), split="val")
    assert ds.classes == VOC_CLASSES and ds.num_classes == 21 and ds.classes[15] == "person"
    assert len(ds) == 1 and ds[0][1]["sem_seg"].unique().tolist() == [0, 3, 255]


def test_voc_train_aug_is_sbd_and_voc_train_minus_voc_val(tmp_path: Path) -> None:
    ds = VOCSegmentation(root=str(_voc(tmp_path)), split="train_aug", sbd_root=str(_sbd(tmp_path)))
    assert [ds[i][1]["file_name"] for i in range(len(ds))] == ["a.jpg", "b.jpg", "d.jpg", "e.jpg"]
    assert [Path(ds.label_path(i)).name for i in range(len(ds))] == ["a.png", "b.png", "d.mat", "e.mat"]
    labels = [ds[i][1]["sem_seg"].unique().tolist() for i in range(len(ds))]
    assert labels == [[0, 1, 255], [0, 2, 255], [0, 4], [0, 5]]  # VOC train keeps its own PNG


def test_train_aug_without_sbd_root_says_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sbd_root") as info:
        VOCSegmentation(root=str(_voc(tmp_path)), split="train_aug")
    assert info.value.key == "sbd_root"


def test_unknown_voc_split_lists_the_available_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="available splits: train, trainval, val. Did you mean 'trainval'"):
        VOCSegmentation(root=str(_voc(tmp_path)), split="trainvall")


def _context(root: Path) -> Path:
    sets = root / "ImageSets" / "SegmentationContext"
    sets.mkdir(parents=True)
    _image(root / "JPEGImages" / "p.jpg", seed=0)
    _label(root / "SegmentationClassContext" / "p.png", _stripes([0, 1, 59]))
    (sets / "train.txt").write_text("p\n")
    return root


def test_pascal_context_ignores_background_unless_asked(tmp_path: Path) -> None:
    root = str(_context(tmp_path))
    ds59, ds60 = PascalContext(root=root), PascalContext(root=root, include_background=True)
    assert ds59.num_classes == 59 and ds59.classes[0] == "aeroplane" and ds59.classes[-1] == "wood"
    assert ds60.num_classes == 60 and ds60.classes == CONTEXT_CLASSES
    assert ds59[0][1]["sem_seg"].unique().tolist() == [0, 58, 255]
    assert ds60[0][1]["sem_seg"].unique().tolist() == [0, 1, 59]


def test_ade20k_has_150_classes_and_reduces_zero(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "validation" / "ADE_val_1.jpg", seed=0)
    _label(tmp_path / "annotations" / "validation" / "ADE_val_1.png", _stripes([0, 1, 150]), mode="L")
    ds = ADE20K(root=str(tmp_path), split="validation")
    assert ds.num_classes == 150 and ADE20K_CLASSES[:3] == ("wall", "building", "sky")
    assert ds[0][1]["sem_seg"].unique().tolist() == [0, 149, 255]
    with pytest.raises(ConfigError, match="Did you mean 'training'"):
        ADE20K(root=str(tmp_path), split="train")


def _cityscapes(root: Path) -> Path:
    """Two cities of val as the dataset ships them: label ids (7 road, 26 car, 0 unlabelled, 4 static,
    30 trailer) and the train ids the dataset's scripts write beside them."""
    for city, name, ids in (("frankfurt", "frankfurt_000000_000294", [7, 26, 0]),
                            ("lindau", "lindau_000000_000019", [33, 4, 30])):
        _image(root / "leftImg8bit" / "val" / city / f"{name}_leftImg8bit.png", seed=len(city))
        _label(root / "gtFine" / "val" / city / f"{name}_gtFine_labelIds.png", _stripes(ids), mode="L")
        train_ids = [{7: 0, 26: 13, 33: 18}.get(i, 255) for i in ids]
        _label(root / "gtFine" / "val" / city / f"{name}_gtFine_labelTrainIds.png", _stripes(train_ids), mode="L")
        (root / "gtFine" / "val" / city / f"{name}_gtFine_color.png").write_bytes(b"")  # not a label map
    return root


def test_cityscapes_maps_label_ids_to_the_19_train_ids(tmp_path: Path) -> None:
    root = _cityscapes(tmp_path)
    by_ids = Cityscapes(root=str(root), split="val")
    by_train_ids = DATASETS.build({"type": "Cityscapes", "root": str(root), "split": "val",
                                   "label_type": "labelTrainIds"}, path="data.val")
    assert by_ids.num_classes == 19 and by_ids.classes == CITYSCAPES_CLASSES and by_ids.classes[13] == "car"
    assert by_ids.palette.tolist()[0] == list(CITYSCAPES_PALETTE[0])
    assert len(by_ids) == 2 and by_ids[0][1]["file_name"] == "frankfurt/frankfurt_000000_000294_leftImg8bit.png"
    assert by_ids[0][1]["sem_seg"].unique().tolist() == [0, 13, 255]
    assert by_ids[1][1]["sem_seg"].unique().tolist() == [18, 255]
    for i in range(2):
        assert torch.equal(by_ids[i][1]["sem_seg"], by_train_ids[i][1]["sem_seg"])
    # predictions written as raw values compare with the label-id files
    assert by_ids.raw_label_values()[[0, 13, 18]].tolist() == [7, 26, 33]


def test_cityscapes_names_a_bad_label_type_and_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Did you mean 'labelTrainIds'") as info:
        Cityscapes(root=str(tmp_path), label_type="labelTrainId")
    assert info.value.key == "label_type"
    with pytest.raises(DatasetError, match="leftImg8bit/train' does not exist"):
        Cityscapes(root=str(tmp_path))


def test_shapes_label_maps_agree_with_its_instance_masks(tmp_path: Path) -> None:
    ds = ShapesSegmentation(split="val", num_images=3, image_size=64, root=str(tmp_path), progress=False)
    assert ds.classes == ("background", "circle", "square", "triangle") and len(ds) == 3
    coco = ds.instances.coco
    for index, image_id in enumerate(ds.instances.image_ids):
        expected = np.zeros((64, 64), dtype=np.int64)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert anns
        for ann in anns:
            mask = mask_utils.decode(ann["segmentation"]).astype(bool)
            assert not expected[mask].any()  # masks hold the visible pixels only: no overlap
            expected[mask] = ds.instances.cat_id_to_label[ann["category_id"]]
        assert np.array_equal(ds[index][1]["sem_seg"].numpy(), expected)


# ---------------------------------------------------------------------- pipelines
def _coded_scene(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 30x40 image whose red channel is 60 x its label (labels 1..3 in random 5x5 blocks)."""
    label = np.random.default_rng(seed).integers(1, 4, (6, 8)).repeat(5, 0).repeat(5, 1)
    image = np.zeros((30, 40, 3), np.uint8)
    image[..., 0] = label * 60
    image[..., 1] = np.arange(40)[None, :] * 6  # asymmetric, so a flip of the image alone would show
    return image, label


def test_pipeline_keeps_image_and_label_map_aligned() -> None:
    pipeline = build_seg_transforms([
        {"type": "RandomScale", "scale_limit": [-0.5, 1.0], "interpolation": 0, "p": 1.0},
        {"type": "PadIfNeeded", "min_height": 48, "min_width": 48, "position": "top_left"},
        {"type": "RandomCrop", "height": 48, "width": 48},
        {"type": "HorizontalFlip", "p": 0.5},
    ], path="data.train.transforms")
    flipped = 0
    for seed in range(12):
        pipeline.set_random_seed(seed)
        image, label = _coded_scene(seed)
        out_image, out_label = apply_seg_transforms(pipeline, image=image, label=label)
        assert out_image.shape == (3, 48, 48) and out_label.shape == (48, 48) and out_label.dtype == torch.int64
        red = (out_image[0] * 255).round().long()
        labelled = out_label != 255
        assert torch.equal(red[labelled], out_label[labelled] * 60)
        assert (red[~labelled] == 0).all() and (out_image[:, ~labelled] == 0).all()  # padding on both
        columns = torch.arange(48.0).expand(48, 48)[labelled]
        green = out_image[1][labelled]  # grows with the column unless the image was flipped
        flipped += int(((columns - columns.mean()) * (green - green.mean())).sum() < 0)
    assert 0 < flipped < 12  # the flip was drawn both ways and the map followed it


def test_padding_fills_the_label_map_with_ignore_index() -> None:
    image, label = np.zeros((10, 10, 3), np.uint8), np.ones((10, 10), np.int64)
    pipeline = build_seg_transforms([{"type": "PadIfNeeded", "min_height": 16, "min_width": 12,
                                      "position": "top_left"}], ignore_index=100)
    _, out = apply_seg_transforms(pipeline, image=image, label=label, ignore_index=100)
    assert out.shape == (16, 12) and (out[:10, :10] == 1).all()
    assert (out[10:] == 100).all() and (out[:, 10:] == 100).all()
    crop = build_seg_transforms([{"type": "SegRandomCrop", "height": 14, "width": 14}])
    _, out = apply_seg_transforms(crop, image=image, label=label)
    assert out.shape == (14, 14) and (out[10:] == 255).all() and (out[:10, :10] == 1).all()


def test_dataset_transforms_pad_with_its_ignore_index(tmp_path: Path) -> None:
    img_dir, ann_dir = _folder(tmp_path, {"x": _stripes([0, 1])})
    ds = SemSegFolder.from_config({"img_dir": str(img_dir), "ann_dir": str(ann_dir), "classes": ["a", "b"],
                                   "ignore_index": 9, "transforms": [
                                       {"type": "PadIfNeeded", "min_height": H + 4, "min_width": W,
                                        "position": "top_left"}]}, path="data.train")
    label = ds[0][1]["sem_seg"]
    assert label.shape == (H + 4, W) and (label[H:] == 9).all() and label[:H].unique().tolist() == [0, 1]


def test_cat_max_ratio_crop_retries_until_no_class_dominates() -> None:
    label = np.zeros((20, 100), np.int64)
    label[:, 80:] = 1  # a random 30 px wide crop is balanced with probability 13/71
    pipeline = build_seg_transforms([{"type": "SegRandomCrop", "height": 20, "width": 30, "cat_max_ratio": 0.75,
                                      "max_tries": 60}])
    for seed in range(10):
        pipeline.set_random_seed(seed)
        _, out = apply_seg_transforms(pipeline, image=np.zeros((20, 100, 3), np.uint8), label=label)
        share = torch.bincount(out.ravel(), minlength=2).float() / out.numel()
        assert share.max() < 0.75


def test_random_short_side_resize_keeps_the_aspect_ratio() -> None:
    pipeline = build_seg_transforms([{"type": "RandomShortSideResize", "min_size": 20, "max_size": 40,
                                      "max_long_side": 70}])
    sizes = set()
    for seed in range(8):
        pipeline.set_random_seed(seed)
        image, label = _coded_scene(seed)
        out_image, out_label = apply_seg_transforms(pipeline, image=image, label=label)
        height, width = out_label.shape
        assert out_image.shape[1:] == (height, width) and width <= 70
        assert 20 <= height <= 40 and abs(width / height - 4 / 3) < 0.06
        assert set(out_label.unique().tolist()) <= {1, 2, 3}  # nearest: no blended labels
        sizes.add(height)
    assert len(sizes) > 1


def test_label_maps_refuse_non_nearest_interpolation() -> None:
    with pytest.raises(ConfigError, match="nearest") as info:
        build_seg_transforms([{"type": "RandomScale", "mask_interpolation": 1}], path="data.train.transforms")
    assert info.value.key == "data.train.transforms[0].mask_interpolation"


def test_registry_builds_the_datasets_and_names_bad_transform_keys(tmp_path: Path) -> None:
    root = str(_context(tmp_path))
    ds = DATASETS.build({"type": "PascalContext", "root": root}, path="data.train")
    assert isinstance(ds, PascalContext)
    bad = {"type": "PascalContext", "root": root, "transforms": [{"type": "PadIfNeeded", "min_hight": 8}]}
    with pytest.raises(ConfigError) as info:
        DATASETS.build(bad, path="data.train")
    assert info.value.key == "data.train.transforms[0].min_hight"
