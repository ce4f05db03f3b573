"""segkit.models.preprocess: the one preprocessing every meta-architecture shares."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segkit.errors import ConfigError
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


def _rectangle_target(height: int, width: int, box: tuple[int, int, int, int]) -> dict[str, torch.Tensor]:
    """A target whose one box is drawn as its mask: pixels [y1, y2) x [x1, x2)."""
    x1, y1, x2, y2 = box
    masks = torch.zeros(1, height, width, dtype=torch.uint8)
    masks[0, y1:y2, x1:x2] = 1
    return {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([1]), "masks": masks}


def test_training_draws_the_short_side_from_the_listed_sizes_and_caps_the_long_side():
    sizes = (32, 48, 64)
    pre = ImagePreprocessor(min_size=40, max_size=100, train_min_size=sizes).train()
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        batch = pre([torch.rand(3, 30, 40), torch.rand(3, 20, 60)])
        for short, long in ((min(s), max(s)) for s in batch.image_sizes):
            assert long <= 100
            seen.add(short)
    # the 20 x 60 image reaches the cap before 48 and 64: 100 / 60 * 20 = 33 px
    assert seen == {32, 48, 64, 33}
    assert pre.eval()([torch.rand(3, 30, 40)]).image_sizes == [(40, 53)]  # eval: the test size


def test_range_sampling_draws_every_size_between_its_bounds():
    pre = ImagePreprocessor(min_size=20, max_size=1000, train_min_size=[16, 20],
                            train_min_size_sampling="range").train()
    torch.manual_seed(0)
    assert {pre([torch.rand(3, 10, 10)]).image_sizes[0][0] for _ in range(60)} == {16, 17, 18, 19, 20}


def test_per_batch_sampling_gives_every_image_of_a_batch_the_same_short_side():
    pre = ImagePreprocessor(min_size=40, max_size=1000, train_min_size=[24, 32, 40, 48],
                            train_min_size_per="batch").train()
    torch.manual_seed(0)
    shorts = set()
    for _ in range(12):
        batch = pre([torch.rand(3, 30, 40), torch.rand(3, 50, 20), torch.rand(3, 16, 16)])
        assert len({min(s) for s in batch.image_sizes}) == 1
        shorts.add(min(batch.image_sizes[0]))
    assert len(shorts) > 1


def test_boxes_and_masks_follow_a_drawn_size():
    pre = ImagePreprocessor(min_size=40, max_size=1000, train_min_size=[60, 80, 120]).train()
    torch.manual_seed(0)
    for _ in range(6):
        batch = pre([torch.rand(3, 40, 50)], [_rectangle_target(40, 50, (10, 5, 30, 25))])
        target, (height, width) = batch.targets[0], batch.image_sizes[0]
        assert target["masks"].shape[-2:] == (height, width)
        ys, xs = torch.nonzero(target["masks"][0], as_tuple=True)
        mask_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert torch.allclose(target["boxes"][0], mask_box, atol=1.0)  # the box still encloses the drawn rectangle
        assert torch.allclose(target["boxes"][0], torch.tensor([10.0, 5.0, 30.0, 25.0]) * height / 40)


@pytest.mark.parametrize("kwargs, key, message", [
    ({"min_size": 800, "train_min_size": [640, 800, 700], "train_min_size_sampling": "range"},
     "model.train_min_size", r"\[low, high\]"),
    ({"min_size": 800, "train_min_size": [800, 640], "train_min_size_sampling": "range"},
     "model.train_min_size", "low <= high"),
    ({"min_size": 800, "train_min_size": [640, 0]}, "model.train_min_size", "whole numbers >= 1"),
    ({"min_size": 800, "train_min_size": []}, "model.train_min_size", "non-empty"),
    ({"train_min_size": [640, 800]}, "model.train_min_size", "needs min_size"),
    ({"min_size": 800, "train_min_size": [640], "train_min_size_sampling": "uniform"},
     "model.train_min_size_sampling", "choice, range"),
    ({"min_size": 800, "train_min_size": [640], "train_min_size_per": "step"}, "model.train_min_size_per",
     "image, batch"),
])
def test_bad_multiscale_settings_are_config_errors_at_their_key(kwargs, key, message):
    cfg = {"type": "TwoStageDetector", "backbone": {"type": "ResNet", "depth": 18, "base_channels": 8},
           "neck": {"type": "FPN", "out_channels": 8}, "rpn_head": {"type": "RPN"},
           "roi_head": {"type": "StandardRoIHead", "num_classes": 2}, **kwargs}
    with pytest.raises(ConfigError, match=message) as info:
        MODELS.build(cfg, path="model")
    assert info.value.key == key


def test_a_detector_trains_on_drawn_sizes_and_evaluates_at_min_size():
    model = MODELS.build({"type": "TwoStageDetector", "backbone": {"type": "ResNet", "depth": 18, "base_channels": 8},
                          "neck": {"type": "FPN", "out_channels": 8}, "rpn_head": {"type": "RPN"},
                          "roi_head": {"type": "StandardRoIHead", "num_classes": 2}, "min_size": 64,
                          "max_size": 128, "train_min_size": [48, 96], "train_min_size_per": "batch"}, path="model")
    torch.manual_seed(0)
    target = _rectangle_target(40, 50, (10, 5, 30, 25))
    losses = model.train()([torch.rand(3, 40, 50)] * 2, [target] * 2)
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.eval().preprocess([torch.rand(3, 40, 50)])[1] == [(64, 80)]
