"""SSD's augmentation (PhotometricDistort, ZoomOut, MinIoURandomCrop): boxes stay on their objects, the crop
constraint holds, masks and labels follow their boxes, seeded pipelines repeat, and bad values are errors."""

from __future__ import annotations

import numpy as np
import pytest

from segkit.data.transforms import apply_transforms, build_transforms
from segkit.errors import ConfigError

BOXES = np.array([[10, 12, 50, 60], [60, 20, 110, 90], [2, 70, 22, 98]], dtype=np.float32)
LABELS = np.array([1, 2, 3])


def _coordinate_image(height: int = 100, width: int = 120) -> np.ndarray:
    """uint8 image whose red / green channels are each pixel's x / y: a crop's offset can be read back."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = np.arange(width)[None, :]
    image[..., 1] = np.arange(height)[:, None]
    image[..., 2] = 7
    return image


def _box_masks(height: int = 100, width: int = 120) -> np.ndarray:
    masks = np.zeros((len(BOXES), height, width), dtype=np.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, BOXES.astype(int)):
        mask[y1:y2, x1:x2] = 1
    return masks


def _run(cfgs, seed, image=None, boxes=BOXES, labels=LABELS, masks=None):
    pipeline = build_transforms(cfgs, path="data.train.transforms")
    pipeline.set_random_seed(seed)
    return apply_transforms(pipeline, image=_coordinate_image() if image is None else image, boxes=boxes,
                            labels=labels, masks=masks)


def _iou(boxes: np.ndarray, crop: np.ndarray) -> np.ndarray:
    inter_w = np.clip(np.minimum(boxes[:, 2], crop[2]) - np.maximum(boxes[:, 0], crop[0]), 0, None)
    inter_h = np.clip(np.minimum(boxes[:, 3], crop[3]) - np.maximum(boxes[:, 1], crop[1]), 0, None)
    inter = inter_w * inter_h
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + (crop[2] - crop[0]) * (crop[3] - crop[1]) - inter)


@pytest.mark.parametrize("min_iou", [0.1, 0.5, 0.7])
def test_min_iou_crop_keeps_the_boxes_centred_inside_and_meets_the_drawn_iou(min_iou):
    for seed in range(15):
        image, boxes, labels, masks = _run([{"type": "MinIoURandomCrop", "min_ious": [min_iou]}], seed,
                                           masks=_box_masks())
        pixels = (image.numpy() * 255).round().astype(int)
        left, top = pixels[0, 0, 0], pixels[1, 0, 0]  # the coordinates written into the crop's first pixel
        crop = np.array([left, top, left + image.shape[2], top + image.shape[1]], dtype=np.float32)
        assert pixels[0, -1, -1] == crop[2] - 1 and pixels[1, -1, -1] == crop[3] - 1  # one window, not resized
        centres = (BOXES[:, :2] + BOXES[:, 2:]) / 2
        inside = (centres[:, 0] > crop[0]) & (centres[:, 0] < crop[2]) & (centres[:, 1] > crop[1]) & (centres[:, 1] < crop[3])
        assert inside.any() and _iou(BOXES[inside], crop).max() >= min_iou - 1e-6
        assert labels.tolist() == LABELS[inside].tolist()
        expected = np.clip(BOXES[inside], crop[[0, 1, 0, 1]], crop[[2, 3, 2, 3]]) - crop[[0, 1, 0, 1]]
        np.testing.assert_allclose(boxes.numpy(), expected, atol=1e-3)
        for mask, box in zip(masks.numpy(), boxes.numpy().round().astype(int)):  # each mask is its box's
            ys, xs = np.nonzero(mask)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box.tolist()


def test_min_iou_crop_keeps_images_without_boxes_and_the_whole_image_option():
    image, boxes, _, _ = _run([{"type": "MinIoURandomCrop"}], 0, boxes=np.zeros((0, 4)), labels=np.zeros(0))
    assert tuple(image.shape) == (3, 100, 120) and len(boxes) == 0
    image, boxes, _, _ = _run([{"type": "MinIoURandomCrop", "min_ious": [1.0]}], 0)
    assert tuple(image.shape) == (3, 100, 120) and np.allclose(boxes.numpy(), BOXES)


def test_zoom_out_moves_boxes_with_the_image_onto_a_filled_canvas():
    sizes = set()
    for seed in range(10):
        image, boxes, labels, masks = _run([{"type": "ZoomOut", "fill": [1, 2, 3], "max_scale": 4.0, "p": 1.0}], seed,
                                           masks=_box_masks())
        pixels = (image.numpy() * 255).round().astype(int)
        h, w = image.shape[1:]
        assert 100 <= h <= 400 and 120 <= w <= 480 and abs(h / 100 - w / 120) < 0.05
        sizes.add((h, w))
        shift = boxes.numpy()[0, :2] - BOXES[0, :2]
        np.testing.assert_allclose(boxes.numpy() - BOXES, np.tile(shift, (3, 2)), atol=1e-3)  # one translation
        x, y = int(round(shift[0])), int(round(shift[1]))
        assert pixels[0, y, x] == 0 and pixels[1, y, x] == 0 and pixels[2, y, x] == 7  # the image's first pixel
        assert pixels[0, y + 99, x + 119] == 119 and pixels[1, y + 99, x + 119] == 99  # and its last one
        filled = np.ones((h, w), dtype=bool)
        filled[y:y + 100, x:x + 120] = False
        assert (pixels[2][filled] == 3).all() and (pixels[0][filled] == 1).all()
        assert labels.tolist() == LABELS.tolist() and masks.shape[1:] == (h, w) and masks[:, filled].sum() == 0
    assert len(sizes) > 5


def test_photometric_distort_changes_colours_only():
    image = _coordinate_image()
    out, boxes, labels, _ = _run([{"type": "PhotometricDistort", "p_each": 1.0}], 3, image=image)
    assert tuple(out.shape) == (3, 100, 120) and np.allclose(boxes.numpy(), BOXES)
    assert not np.allclose(out.numpy(), image.transpose(2, 0, 1) / 255.0, atol=0.02)
    same, _, _, _ = _run([{"type": "PhotometricDistort", "p_each": 0.0}], 3, image=image)
    np.testing.assert_allclose(same.numpy(), image.transpose(2, 0, 1) / 255.0, atol=1e-6)  # every step skipped


def test_seeded_ssd_pipelines_repeat_and_different_seeds_differ():
    cfgs = [{"type": "PhotometricDistort"}, {"type": "ZoomOut", "p": 0.5}, {"type": "MinIoURandomCrop"},
            {"type": "HorizontalFlip", "p": 0.5}]
    first = [_run(cfgs, seed, masks=_box_masks()) for seed in range(4)]
    again = [_run(cfgs, seed, masks=_box_masks()) for seed in range(4)]
    for a, b in zip(first, again):
        assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a, b))
    assert len({tuple(out[0].shape) for out in first}) > 1 or len({out[1].numpy().tobytes() for out in first}) > 1


@pytest.mark.parametrize("item, key", [
    ({"type": "MinIoURandomCrop", "min_scale": 0.0}, "min_scale"),
    ({"type": "ZoomOut", "max_scale": 0.5}, "max_scale"),
    ({"type": "PhotometricDistort", "hue": [0.0, 0.9]}, "hue"),
])
def test_bad_values_are_config_errors_naming_the_item(item, key):
    with pytest.raises(ConfigError, match=key) as err:
        build_transforms([item], path="data.train.transforms")
    assert err.value.key.startswith("data.train.transforms[0]")
