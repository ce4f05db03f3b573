"""segkit.models.preprocess: the one preprocessing every meta-architecture shares."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segkit.models.preprocess import ImagePreprocessor, check_images
from segkit.registry import MODELS

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def test_images_are_normalised_resized_and_padded_at_the_bottom_right():
    pre = ImagePreprocessor(pixel_mean=MEAN, pixel_std=STD, min_size=64, max_size=96, size_divisor=32)
    images = [torch.rand(3, 40, 50), torch.rand(3, 30, 90)]
    batch = pre(images)
    assert tuple(batch.tensor.shape) == (2, 3, 64, 96)
    assert batch.image_sizes == [(64, 80), (32, 96)] and batch.original_sizes == [(40, 50), (30, 90)]
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    expected = F.interpolate(((images[0] - mean) / std)[None], scale_factor=64 / 40, mode="bilinear",
                             recompute_scale_factor=True, align_corners=False)[0]
    assert torch.equal(batch.tensor[0, :, :64, :80], expected)
    assert not batch.tensor[0, :, :, 80:].any() and not batch.tensor[1, :, 32:].any()  # zero padding


def test_targets_follow_the_resize_and_boxes_map_back_to_the_input():
    pre = ImagePreprocessor(min_size=80, max_size=200)
    boxes = torch.tensor([[4.0, 8.0, 20.0, 30.0]])
    masks = torch.zeros(1, 40, 50, dtype=torch.uint8)
    masks[0, 8:30, 4:20] = 1
    batch = pre([torch.rand(3, 40, 50)], [{"boxes": boxes, "labels": torch.tensor([1]), "masks": masks}])
    target = batch.targets[0]
    assert batch.image_sizes == [(80, 100)]
    assert torch.allclose(target["boxes"], boxes * 2) and tuple(target["masks"].shape) == (1, 80, 100)
    assert int(target["masks"].sum()) == 4 * int(masks.sum())  # nearest neighbours: each pixel becomes 2 x 2
    assert torch.allclose(pre.boxes_to_input(target["boxes"], (80, 100), (40, 50)), boxes)


def test_without_min_size_images_keep_their_size():
    pre = ImagePreprocessor(size_divisor=16)
    batch = pre([torch.rand(3, 37, 50)])
    assert batch.image_sizes == [(37, 50)] and tuple(batch.tensor.shape[-2:]) == (48, 64)
    probs = torch.rand(4, 48, 64)
    assert pre.maps_to_input(probs[..., :37, :50], (37, 50)).shape == (4, 37, 50)
    assert pre.maps_to_input(probs, (96, 128)).shape == (4, 96, 128)


def test_every_meta_architecture_preprocesses_with_it_the_same_way():
    backbone = {"type": "ResNet", "depth": 18, "base_channels": 8}
    detector = MODELS.build({"type": "TwoStageDetector", "backbone": backbone, "neck": {"type": "FPN", "out_channels": 8},
                             "rpn_head": {"type": "RPN"},
                             "roi_head": {"type": "StandardRoIHead", "num_classes": 2}, "pixel_mean": MEAN,
                             "pixel_std": STD}, path="model")
    segmentor = MODELS.build({"type": "EncoderDecoder", "backbone": backbone, "pixel_mean": MEAN, "pixel_std": STD,
                              "decode_head": {"type": "FCNHead", "num_classes": 3, "channels": 8}}, path="model")
    assert type(detector.preprocessor) is type(segmentor.preprocessor) is ImagePreprocessor
    images = [torch.rand(3, 37, 50), torch.rand(3, 60, 20)]
    assert torch.equal(detector.preprocess(images)[0], segmentor.preprocess(images)[0])
    assert "preprocessor.pixel_mean" not in detector.state_dict()  # settings of the config, not weights


@pytest.mark.parametrize("images, message", [
    ([], "non-empty list"),
    ([torch.rand(1, 8, 8)], r"images\[0\] must be a tensor of shape \[3, H, W\]"),
    ([torch.rand(3, 8, 8), torch.zeros(3, 8, 8, dtype=torch.uint8)], r"images\[1\] must be a float tensor"),
    ([torch.rand(3, 0, 8)], r"images\[0\] is empty"),
    (torch.rand(3, 8, 8), r"or one \[N, 3, H, W\] tensor"),
])
def test_malformed_images_are_named(images, message):
    with pytest.raises(ValueError, match=message):
        check_images(images)


@pytest.mark.parametrize("kwargs, message", [
    ({"pixel_mean": (0.5,)}, "need three values"),
    ({"size_divisor": 0}, "size_divisor must be >= 1"),
    ({"max_size": 100}, "max_size only applies together with min_size"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImagePreprocessor(**kwargs)
