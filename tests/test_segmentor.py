"""EncoderDecoder: losses and auxiliary renaming, padding, whole / slide / multi-scale / flip inference,
learning, input and config errors."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segkit.errors import ConfigError
from segkit.models.segmentor import EncoderDecoder, SegTestConfig
from segkit.ops import ShapeSpec
from segkit.registry import BACKBONES, HEADS, MODELS

NUM_CLASSES = 4


@BACKBONES.register("TestSegPointwiseNet")
class PointwiseNet(nn.Module):
    """1x1 convolutions at stride 1: each output pixel depends on its input pixel only, so the
    network commutes with flips, crops and padding."""

    def __init__(self, *, channels: int = 8) -> None:
        super().__init__()
        self.channels = channels
        self.body = nn.Sequential(nn.Conv2d(3, channels, 1), nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU())

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {"c1": ShapeSpec(self.channels, 1)}

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(c1=self.body(x))


@BACKBONES.register("TestSegTwoConvNet")
class TwoConvNet(nn.Module):
    """Two 3x3 convolutions of stride 2: a small receptive field, so windows and padding matter."""

    def __init__(self, *, channels: int = 8) -> None:
        super().__init__()
        self.channels = channels
        self.body = nn.Sequential(nn.Conv2d(3, channels, 3, 2, 1), nn.ReLU(), nn.Conv2d(channels, channels, 3, 2, 1), nn.ReLU())

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {"c2": ShapeSpec(self.channels, 4)}

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(c2=self.body(x))


@HEADS.register("TestSegLinearHead")
class LinearHead(nn.Module):
    """1x1 convolution classifier on the coarsest input map, cross-entropy loss ``loss_seg``."""

    def __init__(self, *, in_shapes, num_classes: int, ignore_index: int = 255, scale: float = 1.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.in_feature = max(in_shapes, key=lambda name: in_shapes[name].stride)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.scale = scale
        self.classifier = nn.Conv2d(in_shapes[self.in_feature].channels, num_classes, 1)

    def forward(self, features):
        return {"seg_logits": self.classifier(features[self.in_feature])}

    def losses(self, outputs, sem_seg):
        logits = F.interpolate(outputs["seg_logits"], size=sem_seg.shape[-2:], mode="bilinear", align_corners=False)
        return {"loss_seg": self.scale * F.cross_entropy(logits, sem_seg, ignore_index=self.ignore_index)}


@HEADS.register("TestSegTwoLossHead")
class TwoLossHead(LinearHead):
    """:class:`LinearHead` with an extra ``loss_extra`` (mean squared logit) and ``se_logits``."""

    def forward(self, features):
        outputs = super().forward(features)
        return {**outputs, "se_logits": outputs["seg_logits"].mean(dim=(2, 3))}

    def losses(self, outputs, sem_seg):
        return {**super().losses(outputs, sem_seg), "loss_extra": outputs["seg_logits"].pow(2).mean()}


BACKBONE_CONFIGS = {
    "resnet": {"type": "ResNet", "depth": 18, "base_channels": 8},
    "twoconv": {"type": "TestSegTwoConvNet"},
    "pointwise": {"type": "TestSegPointwiseNet"},
}


def build(backbone: str = "twoconv", **options) -> EncoderDecoder:
    """A tiny segmentor in eval mode: a backbone of BACKBONE_CONFIGS with a linear head."""
    torch.manual_seed(0)
    backbone_cfg = BACKBONE_CONFIGS[backbone]
    cfg = {"type": "EncoderDecoder", "backbone": backbone_cfg,
           "decode_head": {"type": "TestSegLinearHead", "num_classes": NUM_CLASSES}, **options}
    return MODELS.build(cfg, path="model").eval()


def random_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def random_labels(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, NUM_CLASSES, (h, w), generator=torch.Generator().manual_seed(seed))


def probs_with(model: EncoderDecoder, image: torch.Tensor, **test_cfg) -> torch.Tensor:
    model.test_cfg = SegTestConfig.from_mapping(test_cfg)
    with torch.no_grad():
        return model([image])[0]["sem_seg"]


# ---------------------------------------------------------------------- training
def test_losses_include_auxiliary_losses_renamed():
    model = build(auxiliary_head={"type": "TestSegTwoLossHead", "num_classes": NUM_CLASSES}).train()
    images, targets = [random_image(40, 56)], [{"sem_seg": random_labels(40, 56)}]
    losses = model(images, targets)
    assert set(losses) == {"loss_seg", "loss_aux_seg", "loss_aux_extra"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    # reference: both heads applied to the same batch, the labels padded with 255 to 64 x 64
    batch, _ = model.preprocess(images)
    labels = F.pad(targets[0]["sem_seg"], (0, 64 - 56, 0, 64 - 40), value=255)[None]
    features = model.extract_features(batch)
    decode, aux = model.decode_head, model.auxiliary_heads[0]
    expected = {**decode.losses(decode(features), labels), **{"loss_aux_" + k[5:]: v for k, v in aux.losses(aux(features), labels).items()}}
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value, rtol=1e-4, atol=1e-5)


def test_several_auxiliary_heads_are_numbered():
    aux = [{"type": "TestSegLinearHead", "num_classes": NUM_CLASSES, "scale": 0.4},
           {"type": "TestSegTwoLossHead", "num_classes": NUM_CLASSES}]
    model = build("pointwise", auxiliary_head=aux).train()
    losses = model([random_image(20, 30)], [{"sem_seg": random_labels(20, 30)}])
    assert set(losses) == {"loss_seg", "loss_aux0_seg", "loss_aux1_seg", "loss_aux1_extra"}
    assert len(model.auxiliary_heads) == 2 and isinstance(model.auxiliary_heads, nn.ModuleList)


def test_padding_pixels_are_ignored_in_the_loss():
    image, labels = random_image(37, 50), random_labels(37, 50)
    losses = []
    for divisor in (1, 32, 128):
        model = build("pointwise", size_divisor=divisor).train()
        losses.append(model([image], [{"sem_seg": labels}])["loss_seg"])
    unpadded = model.preprocess([image])[0][..., :37, :50]
    reference = F.cross_entropy(model.decode_head(model.extract_features(unpadded))["seg_logits"], labels[None])
    for loss in losses:
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


def test_label_maps_are_padded_with_the_ignore_index():
    model = build("pointwise").train()
    seen = {}
    original = model.decode_head.losses

    def recording_losses(outputs, sem_seg):
        seen["sem_seg"] = sem_seg
        return original(outputs, sem_seg)

    model.decode_head.losses = recording_losses
    model([random_image(20, 30), random_image(40, 10)], [{"sem_seg": random_labels(20, 30)}, {"sem_seg": random_labels(40, 10)}])
    sem_seg = seen["sem_seg"]
    assert sem_seg.shape == (2, 64, 32) and sem_seg.dtype == torch.int64
    assert (sem_seg[0, :20, :30] < NUM_CLASSES).all() and (sem_seg[0, 20:] == 255).all() and (sem_seg[0, :, 30:] == 255).all()
    assert (sem_seg[1, 40:] == 255).all() and (sem_seg[1, :, 10:] == 255).all()


def test_sgd_steps_reduce_the_loss():
    model = build().train()
    image = random_image(64, 64)
    labels = torch.zeros(64, 64, dtype=torch.int64)
    labels[:, 32:] = 2
    image[:, :, 32:] = 0.9  # the right half is bright and class 2
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    history = []
    for _ in range(15):
        loss = sum(model([image], [{"sem_seg": labels}]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    assert history[-1] < 0.5 * history[0]


def test_label_map_of_another_size_names_the_image_and_both_sizes():
    model = build("pointwise").train()
    images = [random_image(20, 30), random_image(24, 24)]
    targets = [{"sem_seg": random_labels(20, 30)}, {"sem_seg": random_labels(24, 25)}]
    with pytest.raises(ValueError, match=r"targets\[1\]\['sem_seg'\] has size \(24, 25\) but images\[1\] has size \(24, 24\)"):
        model(images, targets)
    with pytest.raises(ValueError, match="training mode needs targets"):
        model(images)
    with pytest.raises(ValueError, match=r"holds the value 7, outside 0..3"):
        model(images[:1], [{"sem_seg": torch.full((20, 30), 7)}])


# ---------------------------------------------------------------------- inference
def test_slide_equals_whole_when_the_window_covers_the_image():
    model = build()
    image = random_image(50, 61)
    whole = probs_with(model, image)
    slide = probs_with(model, image, mode="slide", crop_size=64, stride=32)
    assert whole.shape == (NUM_CLASSES, 50, 61)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-6)


def test_slide_averages_overlapping_window_logits():
    model = build(test_cfg={"mode": "slide", "crop_size": [64, 48], "stride": [40, 30]})
    image = model.preprocessor.normalise(random_image(100, 90))
    with torch.no_grad():
        logits = model.slide_inference(image)
        # reference: windows as in MMSegmentation's slide inference, each inferred alone
        sums, counts = torch.zeros(NUM_CLASSES, 100, 90), torch.zeros(1, 100, 90)
        for row in range((100 - 64 + 39) // 40 + 1):
            for col in range((90 - 48 + 29) // 30 + 1):
                y2, x2 = min(row * 40 + 64, 100), min(col * 30 + 48, 90)
                y1, x1 = y2 - 64, x2 - 48
                window = image[:, y1:y2, x1:x2]
                sums[:, y1:y2, x1:x2] += model.whole_inference(F.pad(window, (0, 16, 0, 0))[None], [(64, 48)])[0]
                counts[:, y1:y2, x1:x2] += 1
    assert counts.min() >= 1 and counts.max() == 6
    assert logits.shape == (NUM_CLASSES, 100, 90)
    torch.testing.assert_close(logits, sums / counts, rtol=1e-4, atol=1e-5)


def test_slide_with_overlapping_windows_covers_every_pixel():
    model = build("pointwise")  # no context: every window gives a pixel the same logits
    image = random_image(70, 45)
    whole = probs_with(model, image)
    slide = probs_with(model, image, mode="slide", crop_size=[24, 16], stride=[16, 10])
    assert slide.shape == (NUM_CLASSES, 70, 45) and torch.isfinite(slide).all()
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-6)


def test_slide_pads_an_image_smaller_than_the_window():
    model = build()
    image = random_image(30, 20)
    slide = probs_with(model, image, mode="slide", crop_size=64, stride=48)
    whole = probs_with(model, image)  # pads to 32 x 32 only
    padded = F.pad(image, (0, 44, 0, 34))  # normalised zero padding equals raw pixel_mean
    padded[:, 30:, :] = model.pixel_mean
    padded[:, :, 20:] = model.pixel_mean
    reference = probs_with(model, padded)[:, :30, :20]
    assert slide.shape == whole.shape == (NUM_CLASSES, 30, 20)
    torch.testing.assert_close(slide, reference, rtol=1e-4, atol=1e-5)


def test_multiscale_flip_output_is_the_mean_of_each_view():
    model = build()
    image = random_image(45, 70)
    tta = probs_with(model, image, scales=[0.5, 1.25], flip=True)
    views = []
    for size in ((22, 35), (56, 88)):
        resized = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        for flip in (False, True):
            probs = probs_with(model, resized.flip(-1) if flip else resized)
            probs = probs.flip(-1) if flip else probs
            views.append(F.interpolate(probs[None], size=(45, 70), mode="bilinear", align_corners=False)[0])
    assert tta.shape == (NUM_CLASSES, 45, 70) and tta.dtype == torch.float32
    torch.testing.assert_close(tta, torch.stack(views).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tta.sum(0), torch.ones(45, 70))


def test_flip_of_a_flip_equivariant_model_changes_nothing():
    model = build("pointwise")
    image = random_image(33, 47)
    plain = probs_with(model, image, scales=[0.75, 1.0, 1.5])
    flipped = probs_with(model, image, scales=[0.75, 1.0, 1.5], flip=True)
    torch.testing.assert_close(flipped, plain, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(probs_with(model, image), plain, atol=1e-4)  # the scales do matter


def test_outputs_have_each_input_size_in_a_mixed_batch():
    model = build()
    images = [random_image(40, 70, 1), random_image(75, 33, 2)]
    with torch.no_grad():
        outputs = model(images)
    assert [tuple(o["sem_seg"].shape) for o in outputs] == [(NUM_CLASSES, 40, 70), (NUM_CLASSES, 75, 33)]
    for output in outputs:
        assert output["sem_seg"].dtype == torch.float32
        torch.testing.assert_close(output["sem_seg"].sum(0), torch.ones(output["sem_seg"].shape[1:]))
    # the batched pass equals per-image inference for a model without context
    pointwise = build("pointwise")
    with torch.no_grad():
        batched = pointwise(images)
    for image, output in zip(images, batched):
        torch.testing.assert_close(output["sem_seg"], probs_with(pointwise, image), rtol=1e-5, atol=1e-6)


def test_num_classes_and_features_with_a_resnet():
    model = build("resnet", neck=None)
    assert model.num_classes == NUM_CLASSES
    features = model.extract_features(torch.zeros(1, 3, 64, 64))
    assert list(features) == ["c2", "c3", "c4", "c5"] and features["c5"].shape == (1, 64, 2, 2)


# ---------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    ("options", "key", "message"),
    [
        ({"decode_head": None}, "model.decode_head", "needs a 'decode_head' section"),
        ({"sizes_divisor": 16}, "model.sizes_divisor", "Did you mean 'size_divisor'"),
        ({"auxiliary_heads": {"type": "TestSegLinearHead"}}, "model.auxiliary_heads", "'auxiliary_head'"),
        ({"test_cfg": {"mode": "slide"}}, "model.test_cfg.crop_size", "needs crop_size and stride"),
        ({"test_cfg": {"mode": "slide", "crop_size": 32, "stride": [16, 40]}}, "model.test_cfg.stride", "larger than crop_size"),
        ({"test_cfg": {"scales": [1.0, 0.0]}}, "model.test_cfg.scales", "positive"),
        ({"test_cfg": {"mode": "sliding"}}, "model.test_cfg.mode", "Did you mean 'slide'"),
        ({"test_cfg": {"crop": 32}}, "model.test_cfg.crop", "Did you mean 'crop_size'"),
        ({"test_cfg": {"flip": "yes"}}, "model.test_cfg.flip", "true or false"),
        ({"decode_head": {"type": "TestSegLinearHead", "num_classes": 0}}, "model.decode_head", "num_classes must be >= 1"),
        ({"auxiliary_head": [{"type": "TestSegLinearHead", "num_classes": 4}, {"type": "TestSegLinearHead", "num_classes": 3}]},
         "model", r"auxiliary_head\[1\] has num_classes=3"),
        ({"auxiliary_head": [{"type": "TestSegLinearHead", "num_classes": 4}, {"type": "TestSegLinearHead"}]},
         "model.auxiliary_head[1]", "num_classes"),
        ({"ignore_index": 0}, "model", "ignore_index=255 but the model pads labels with ignore_index=0"),
    ],
)
def test_config_errors_name_the_key(options, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        build("pointwise", **options)
    assert info.value.key == key


def test_slide_settings_accept_ints_and_pairs():
    settings = SegTestConfig.from_mapping({"mode": "slide", "crop_size": 512, "stride": [341, 300], "scales": 1.5})
    assert settings == SegTestConfig(mode="slide", crop_size=(512, 512), stride=(341, 300), scales=(1.5,), flip=False)
