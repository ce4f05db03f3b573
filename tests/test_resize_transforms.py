"""segkit.data.resize_transforms: aspect-keeping random resizes that move boxes, masks and label maps too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segkit.data.transforms import apply_seg_transforms, apply_transforms, build_seg_transforms, build_transforms
from segkit.errors import ConfigError
from tests.scenes import tight_box, two_rectangles


def _label_scene() -> tuple[np.ndarray, np.ndarray]:
    """A 30x40 image whose red channel is 60 x its label (labels 1..3 in 5x5 blocks)."""
    label = np.random.default_rng(0).integers(1, 4, (6, 8)).repeat(5, 0).repeat(5, 1)
    image = np.zeros((30, 40, 3), np.uint8)
    image[..., 0] = label * 60
    return image, label


def test_short_side_choice_moves_boxes_and_masks_with_the_image() -> None:
    image, boxes, labels, masks = two_rectangles()
    pipeline = build_transforms([{"type": "RandomShortSideResize", "sizes": [20, 80, 100], "max_long_side": 135}],
                                path="data.train.transforms")
    seen = set()
    for seed in range(12):
        pipeline.set_random_seed(seed)
        img, out_boxes, out_labels, out_masks = apply_transforms(pipeline, image=image, boxes=boxes, labels=labels,
                                                                 masks=masks)
        height, width = img.shape[1:]
        seen.add(height)
        assert width <= 135 and out_masks.shape == (2, height, width) and out_labels.tolist() == [1, 2]
        scale = height / 40
        assert np.allclose(out_boxes.numpy(), boxes * scale, atol=1e-3)  # exactly the image's scale
        for box, mask in zip(out_boxes, out_masks):
            assert tight_box(mask) == pytest.approx(box.tolist(), abs=1.0)  # the box is still around the object
    assert seen == {20, 80, 90}  # 100 would make the long side 150 > 135: capped to 90 x 135


def test_short_side_range_draws_every_size_in_it() -> None:
    image, boxes, labels, masks = two_rectangles()
    pipeline = build_transforms([{"type": "RandomShortSideResize", "min_size": 30, "max_size": 34}], path="t")
    heights = set()
    for seed in range(40):
        pipeline.set_random_seed(seed)
        img, out_boxes, _, _ = apply_transforms(pipeline, image=image, boxes=boxes, labels=labels, masks=masks)
        height, width = img.shape[1:]
        heights.add(height)
        assert width == round(height * 1.5)
        assert np.allclose(out_boxes.numpy(), boxes * np.array([width / 60, height / 40] * 2), atol=1e-3)  # per axis, exactly
    assert heights == {30, 31, 32, 33, 34}


@pytest.mark.parametrize("item, key, message", [
    ({"sizes": [640, 800], "min_size": 600}, "sizes", "not both"),
    ({"sizes": []}, "sizes", "non-empty"),
    ({"sizes": [640, 0]}, "sizes", "whole number of pixels"),
    ({"min_size": 800}, "max_size", "both min_size and max_size"),
    ({"min_size": 800, "max_size": 640}, "min_size", "min_size <= max_size"),
    ({"sizes": [640], "max_long_side": -1}, "max_long_side", "whole number of pixels"),
])
def test_bad_short_side_settings_name_their_key(item, key, message) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build_transforms([{"type": "HorizontalFlip"}, {"type": "RandomShortSideResize", **item}],
                         path="data.train.transforms")
    assert info.value.key == f"data.train.transforms[1].{key}"


@pytest.mark.parametrize("side", ["long", "short"])
def test_base_size_jitter_draws_the_side_in_range_and_keeps_the_aspect_ratio(side: str) -> None:
    pipeline = build_seg_transforms([{"type": "BaseSizeJitter", "base_size": 40, "ratio_range": [0.5, 2.0],
                                      "side": side, "interpolation": 0}])  # nearest for the image too: exact comparison
    image, label = _label_scene()  # 30 x 40: the width is the long side
    drawn = set()
    for seed in range(50):
        pipeline.set_random_seed(seed)
        out_image, out_label = apply_seg_transforms(pipeline, image=image, label=label)
        height, width = out_label.shape
        size = width if side == "long" else height
        other = height if side == "long" else width
        expected_other = int((30 / 40 if side == "long" else 40 / 30) * size + 0.5)
        assert 20 <= size <= 80 and other == expected_other
        assert out_image.shape[1:] == (height, width)
        red = (out_image[0] * 255).round().long()
        assert set(out_label.unique().tolist()) <= {1, 2, 3}  # nearest: no blended labels
        assert torch.equal(red, out_label * 60)  # a block's pixels and labels stay together
        drawn.add(size)
    assert min(drawn) <= 25 and max(drawn) >= 75 and len(drawn) > 20


def test_base_size_jitter_then_crop_pads_the_map_with_ignore_index() -> None:
    pipeline = build_seg_transforms([{"type": "BaseSizeJitter", "base_size": 40, "ratio_range": [0.5, 0.5]},
                                     {"type": "SegRandomCrop", "height": 32, "width": 32}], ignore_index=255)
    image, label = _label_scene()
    out_image, out_label = apply_seg_transforms(pipeline, image=image, label=label)
    assert out_label.shape == (32, 32)  # 15 x 20 after the jitter, padded at the bottom / right
    assert (out_label[15:] == 255).all() and (out_label[:, 20:] == 255).all()
    assert set(out_label[:15, :20].unique().tolist()) <= {1, 2, 3} and not out_image[:, 15:].any()


def test_base_size_jitter_moves_boxes_and_masks() -> None:
    image, boxes, labels, masks = two_rectangles()  # 40 x 60
    pipeline = build_transforms([{"type": "BaseSizeJitter", "base_size": 60, "ratio_range": [2.0, 2.0]}], path="t")
    img, out_boxes, _, out_masks = apply_transforms(pipeline, image=image, boxes=boxes, labels=labels, masks=masks)
    assert img.shape[1:] == (80, 120) and out_masks.shape == (2, 80, 120)
    assert np.allclose(out_boxes.numpy(), boxes * 2, atol=1e-3)
    for box, mask in zip(out_boxes, out_masks):
        assert tight_box(mask) == pytest.approx(box.tolist(), abs=1e-3)


@pytest.mark.parametrize("item, key, message", [
    ({"base_size": 0}, "base_size", "whole number of pixels"),
    ({"base_size": 520, "ratio_range": [2.0, 0.5]}, "ratio_range", "0 < low <= high"),
    ({"base_size": 520, "ratio_range": [0.5]}, "ratio_range", r"\[low, high\]"),
    ({"base_size": 520, "side": "width"}, "side", "long, short"),
])
def test_bad_base_size_jitter_settings_name_their_key(item, key, message) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build_seg_transforms([{"type": "BaseSizeJitter", **item}], path="data.train.transforms")
    assert info.value.key == f"data.train.transforms[0].{key}"
