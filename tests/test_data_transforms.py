"""Transforms move the image, boxes, labels and masks together; collate keeps sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segkit.data.collate import collate
from segkit.data.transforms import apply_transforms, build_transforms
from segkit.errors import ConfigError
from tests.scenes import tight_box, two_rectangles


def test_horizontal_flip_moves_boxes_and_masks_together() -> None:
    image, boxes, labels, masks = two_rectangles()
    pipeline = build_transforms([{"type": "HorizontalFlip", "p": 1.0}], path="data.train.transforms")
    img, out_boxes, out_labels, out_masks = apply_transforms(pipeline, image=image, boxes=boxes, labels=labels, masks=masks)
    assert img.shape == (3, 40, 60) and img.dtype == torch.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert np.allclose(out_boxes.numpy(), [[48, 5, 58, 15], [5, 20, 20, 35]], atol=1e-3)
    assert out_labels.tolist() == [1, 2]
    for box, mask in zip(out_boxes, out_masks):
        assert tight_box(mask) == pytest.approx(box.tolist(), abs=1e-3)
    assert torch.equal(img[0] > 0.5, out_masks[0].bool())  # the red object is under its mask


def test_crop_that_removes_an_object_removes_its_box_label_and_mask() -> None:
    image, boxes, labels, masks = two_rectangles()
    pipeline = build_transforms([{"type": "Crop", "x_min": 30, "y_min": 0, "x_max": 60, "y_max": 40}], path="t")
    img, out_boxes, out_labels, out_masks = apply_transforms(pipeline, image=image, boxes=boxes, labels=labels, masks=masks)
    assert img.shape == (3, 40, 30)
    assert out_labels.tolist() == [2]
    assert np.allclose(out_boxes.numpy(), [[10, 20, 25, 35]], atol=1e-3)
    assert out_masks.shape == (1, 40, 30)
    assert tight_box(out_masks[0]) == pytest.approx(out_boxes[0].tolist(), abs=1e-3)


def test_crop_clips_a_partly_visible_box() -> None:
    image, boxes, labels, masks = two_rectangles()
    pipeline = build_transforms([{"type": "Crop", "x_min": 6, "y_min": 0, "x_max": 60, "y_max": 40}], path="t")
    _, out_boxes, out_labels, out_masks = apply_transforms(pipeline, image=image, boxes=boxes, labels=labels, masks=masks)
    assert out_labels.tolist() == [1, 2]
    assert out_boxes[0].tolist() == pytest.approx([0, 5, 6, 15], abs=1e-3)
    assert int(out_masks[0].sum()) == 6 * 10


def test_no_instances_and_no_pipeline_give_empty_tensors() -> None:
    image = np.zeros((8, 9, 3), dtype=np.uint8)
    pipeline = build_transforms([{"type": "VerticalFlip", "p": 1.0}], path="t")
    for p in (pipeline, None):
        img, boxes, labels, masks = apply_transforms(
            p, image=image, boxes=np.zeros((0, 4)), labels=np.zeros(0), masks=np.zeros((0, 8, 9), np.uint8)
        )
        assert img.shape == (3, 8, 9)
        assert boxes.shape == (0, 4) and boxes.dtype == torch.float32
        assert labels.shape == (0,) and labels.dtype == torch.int64
        assert masks.shape == (0, 8, 9) and masks.dtype == torch.uint8


def test_unknown_transform_argument_names_its_key() -> None:
    with pytest.raises(ConfigError) as info:
        build_transforms([{"type": "HorizontalFlip"}, {"type": "HorizontalFlip", "pp": 0.5}], path="data.train.transforms")
    assert info.value.key == "data.train.transforms[1].pp"
    assert "'p'" in str(info.value)


def test_unknown_transform_type_suggests_a_name() -> None:
    with pytest.raises(ConfigError) as info:
        build_transforms([{"type": "HorizontalFlp"}], path="data.train.transforms")
    assert info.value.key == "data.train.transforms[0].type"
    assert "HorizontalFlip" in str(info.value)


def test_normalize_is_rejected_because_the_model_normalises() -> None:
    with pytest.raises(ConfigError, match="normalises"):
        build_transforms([{"type": "Normalize"}], path="data.train.transforms")


def test_nested_transform_lists_are_built() -> None:
    pipeline = build_transforms(
        [{"type": "OneOf", "transforms": [{"type": "HorizontalFlip", "p": 1.0}], "p": 1.0}], path="t"
    )
    image, boxes, labels, masks = two_rectangles()
    _, out_boxes, _, _ = apply_transforms(pipeline, image=image, boxes=boxes, labels=labels, masks=masks)
    assert out_boxes[0].tolist() == pytest.approx([48, 5, 58, 15], abs=1e-3)


def test_collate_keeps_images_as_a_list_without_padding() -> None:
    a = (torch.zeros(3, 10, 12), {"boxes": torch.zeros(0, 4)})
    b = (torch.zeros(3, 7, 5), {"boxes": torch.ones(1, 4)})
    images, targets = collate([a, b])
    assert [tuple(i.shape) for i in images] == [(3, 10, 12), (3, 7, 5)]
    assert targets[1]["boxes"].shape == (1, 4)


def test_augmentations_follow_the_torch_seed() -> None:
    """DataLoader workers and epochs differ in ``torch.initial_seed()``, so must their augmentations."""
    from segkit.data.transforms import follow_torch_seed

    pipeline = build_transforms([{"type": "HorizontalFlip", "p": 0.5}], path="t")
    image, boxes, labels, masks = two_rectangles()

    def flips(seed: int) -> list[bool]:
        torch.manual_seed(seed)
        last = None
        pattern = []
        for _ in range(16):
            last = follow_torch_seed(pipeline, last)
            out = apply_transforms(pipeline, image=image, boxes=boxes, labels=labels)[1]
            pattern.append(bool(out[0, 0] > 30))
        return pattern

    first = flips(1)
    assert flips(2) != first
    assert flips(1) == first
