"""The synthetic Shapes dataset: determinism, valid COCO files, occlusion, caching, building."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

import segkit.data.shapes as shapes_module
from segkit.data.shapes import Shapes, generate_shapes, prepare_shapes
from segkit.errors import ConfigError
from segkit.registry import DATASETS

SMALL = {"num_images": 12, "image_size": 96, "seed": 3}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("segkit_data"))


@pytest.fixture(scope="module")
def train(root: str) -> Shapes:
    return Shapes(split="train", root=root, with_masks=True, progress=False, **SMALL)


@pytest.fixture(scope="module")
def coco_json(train: Shapes) -> dict:
    with open(train.ann_file) as f:
        return json.load(f)


def test_generation_is_deterministic(tmp_path: Path) -> None:
    for name in ("a", "b"):
        generate_shapes(str(tmp_path / name), split="train", num_images=4, image_size=64, seed=5, progress=False)
    rel = ["annotations/instances_train.json", "images/train/000004.png", "labels/train/000004.png"]
    for path in rel:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes(), path


def test_train_and_val_do_not_share_images(root: str, train: Shapes) -> None:
    val = Shapes(split="val", root=root, progress=False, **SMALL)
    assert val.root != train.root
    first_train = {Image.open(train.image_path(i)).tobytes() for i in range(len(train))}
    assert not any(Image.open(val.image_path(i)).tobytes() in first_train for i in range(len(val)))


def test_annotations_are_valid_coco(train: Shapes, coco_json: dict) -> None:
    assert [img["id"] for img in coco_json["images"]] == list(range(1, SMALL["num_images"] + 1))
    assert [a["id"] for a in coco_json["annotations"]] == list(range(1, len(coco_json["annotations"]) + 1))
    assert [c["name"] for c in coco_json["categories"]] == ["circle", "square", "triangle"]
    for ann in coco_json["annotations"]:
        assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"]["counts"], str)
        mask = mask_utils.decode(train.coco.annToRLE(ann))
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        assert ann["area"] == int(mask.sum())


def test_label_maps_show_the_front_most_instance(train: Shapes) -> None:
    for index in range(len(train)):
        label_map = np.asarray(Image.open(train.label_path(index)))
        _, target = train[index]
        masks = target["masks"].numpy()
        assert label_map.dtype == np.uint8
        assert masks.sum(0).max() <= 1  # visible parts never overlap
        expected = (masks * target["labels"].numpy()[:, None, None]).sum(0)
        assert np.array_equal(label_map, expected)


def test_objects_occlude_each_other(coco_json: dict) -> None:
    by_image: dict[int, list[list[int]]] = {}
    for ann in coco_json["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["bbox"])
    overlapping = 0
    for boxes in by_image.values():
        b = np.array(boxes, dtype=float)
        x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
        iw = np.minimum(x2[:, None], x2) - np.maximum(x1[:, None], x1)
        ih = np.minimum(y2[:, None], y2) - np.maximum(y1[:, None], y1)
        overlapping += int(np.triu((iw > 0) & (ih > 0), 1).sum())
    assert overlapping > 0
    # A fully visible disc fills about pi/4 of its box; an occluded one fills less.
    fill = [a["area"] / (a["bbox"][2] * a["bbox"][3]) for a in coco_json["annotations"] if a["category_id"] == 1]
    assert min(fill) < 0.65 < max(fill)


def test_dataset_returns_the_contract(train: Shapes) -> None:
    image, target = train[0]
    assert image.dtype == torch.float32 and image.shape == (3, 96, 96)
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    n = len(target["labels"])
    assert n >= 1 and target["labels"].dtype == torch.int64
    assert set(target["labels"].tolist()) <= {1, 2, 3}
    assert target["boxes"].shape == (n, 4) and target["boxes"].dtype == torch.float32
    assert target["masks"].shape == (n, 96, 96) and target["masks"].dtype == torch.uint8
    assert target["orig_size"].tolist() == [96, 96] and target["image_id"] == 1
    assert train.classes == ["circle", "square", "triangle"] and train.label_to_cat_id == {1: 1, 2: 2, 3: 3}


def test_category_subset_defines_the_ids(root: str) -> None:
    ds = Shapes(split="val", root=root, num_images=3, image_size=64, categories=["triangle", "circle"], progress=False)
    assert ds.classes == ["triangle", "circle"] and ds.num_classes == 2
    assert {a["category_id"] for a in ds.coco.dataset["annotations"]} <= {1, 2}


def test_cache_is_reused_and_leaves_no_temporary_folder(root: str, train: Shapes, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the cached split must not be generated again")

    monkeypatch.setattr(shapes_module, "generate_shapes", fail)
    again = Shapes(split="train", root=root, progress=False, **SMALL)
    assert again.root == train.root
    assert not [n for n in os.listdir(os.path.dirname(train.root)) if ".tmp-" in n]


def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch) -> None:
    def crash(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(shapes_module, "render_image", crash)
    with pytest.raises(RuntimeError):
        prepare_shapes(root=str(tmp_path), split="train", num_images=2, image_size=64, seed=0, progress=False)
    assert os.listdir(tmp_path / "shapes") == []


def test_concurrent_preparation_agrees_on_one_folder(tmp_path: Path) -> None:
    args = {"root": str(tmp_path), "split": "val", "num_images": 3, "image_size": 64, "seed": 1, "progress": False}
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: prepare_shapes(**args), range(2)))
    assert folders[0] == folders[1]
    assert os.listdir(tmp_path / "shapes") == [os.path.basename(folders[0])]


def test_build_from_config(root: str, train: Shapes) -> None:
    cfg = {"type": "Shapes", "split": "train", "root": root, "progress": False,
           "transforms": [{"type": "HorizontalFlip", "p": 1.0}], **SMALL}
    ds = DATASETS.build(cfg, path="data.train")
    assert len(ds) == len(train)
    assert torch.allclose(ds[0][0], train[0][0].flip(-1))


def test_unknown_argument_names_its_key_and_suggests(root: str) -> None:
    with pytest.raises(ConfigError) as info:
        DATASETS.build({"type": "Shapes", "num_image": 4, "root": root}, path="data.train")
    assert info.value.key == "data.train.num_image"
    assert "num_images" in str(info.value)


def test_bad_transform_in_a_dataset_config_names_its_key(root: str) -> None:
    cfg = {"type": "Shapes", "root": root, "transforms": [{"type": "HorizontalFlip", "prob": 1.0}], **SMALL}
    with pytest.raises(ConfigError) as info:
        DATASETS.build(cfg, path="data.train")
    assert info.value.key == "data.train.transforms[0].prob"


def test_bad_value_names_its_key(root: str) -> None:
    with pytest.raises(ConfigError) as info:
        DATASETS.build({"type": "Shapes", "root": root, "categories": ["circle", "sqare"]}, path="data.val")
    assert info.value.key == "data.val.categories" and "square" in str(info.value)
