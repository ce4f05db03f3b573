"""DeepLabV3 (ASPPHead) and DeepLabV3+ (DeepLabV3PlusHead): torchvision parity after `segkit convert`,
output shapes at output stride 8 and 16, the image-pooling branch with one image, conversion errors and
a short fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

import segkit
from segkit.checkpoint import CheckpointError
from segkit.cli import main
from segkit.ops import ShapeSpec
from segkit.registry import HEADS, MODELS
from segkit.weights import convert_weights
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from segkit_plugins.heads.deeplab_weights import convert_torchvision_deeplabv3, rename_torchvision_deeplabv3_key
from tests.reference import overfit

CONFIGS = Path(__file__).parent.parent / "configs"
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_batch_norms(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial running statistics and affine parameters, so that a misplaced BatchNorm changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)


def _tiny_deeplab(head: dict, *, output_stride: int = 8, **model_options) -> torch.nn.Module:
    """An EncoderDecoder on a dilated ResNet-18 of base width 8 (c5: 64 channels) with ``head``."""
    strides, dilations = ((1, 2, 1, 1), (1, 1, 2, 4)) if output_stride == 8 else ((1, 2, 2, 1), (1, 1, 1, 2))
    torch.manual_seed(0)
    return MODELS.build({
        "type": "EncoderDecoder", **model_options,
        "backbone": {"type": "ResNet", "depth": 18, "base_channels": 8, "strides": list(strides),
                     "dilations": list(dilations), "contract_dilation": True},
        "decode_head": {"num_classes": 3, "channels": 16, **head},
    }, path="model")


# ------------------------------------------------------------------------------- torchvision parity
def test_converted_deeplabv3_resnet50_equals_torchvision(tmp_path: Path, capsys):
    torch.manual_seed(0)
    reference = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=True,
                                                                   num_classes=5)
    _randomise_batch_norms(reference, seed=1)
    reference.eval()
    src, dst = tmp_path / "deeplabv3.pth", tmp_path / "segkit.pth"
    torch.save(reference.state_dict(), src)
    assert main(["convert", "--from", "torchvision", str(src), str(dst)]) == 0
    printed = capsys.readouterr().out
    assert "deeplabv3_resnet50: dilated ResNet-50 (output stride 8) + ASPPHead + FCNHead on c4, 5 classes" in printed
    ours = segkit.load_model(dst)
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference((images - IMAGENET_MEAN) / IMAGENET_STD)
        batch, _ = ours.batch_images(list(images))
        features = ours.extract_features(batch)
        got = {name: F.interpolate(head(features)["seg_logits"], size=(64, 96), mode="bilinear", align_corners=False)
               for name, head in (("out", ours.decode_head), ("aux", ours.auxiliary_heads[0]))}
        probabilities = torch.stack([p["sem_seg"] for p in ours(list(images))])
    assert expected["out"].std() > 1.0  # logits that differ from pixel to pixel
    torch.testing.assert_close(got["out"], expected["out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["aux"], expected["aux"], atol=1e-5, rtol=0)
    torch.testing.assert_close(probabilities, expected["out"].softmax(1), atol=1e-5, rtol=0)


def test_converted_aspp_head_equals_torchvision_deeplab_head_on_a_map_wider_than_its_rates(meta_state):
    """The whole-model test's 8x12 map puts every atrous tap but the centre in the padding; on a 40x44 map
    the rates (12, 24, 36) of the converted config all reach inside."""
    torch.manual_seed(0)
    reference = DeepLabHead(16, 3)
    _randomise_batch_norms(reference, seed=4)
    reference.eval()
    renamed = {rename_torchvision_deeplabv3_key(f"classifier.{k}"): v for k, v in reference.state_dict().items()}
    head_cfg = convert_torchvision_deeplabv3(meta_state)[1]["model"]["decode_head"]
    ours = HEADS.build({**head_cfg, "num_classes": 3}, path="model.decode_head", in_shapes={"c5": ShapeSpec(16, 8)})
    ours.load_state_dict({k.removeprefix("decode_head."): v for k, v in renamed.items()}, strict=True)
    x = torch.randn(2, 16, 40, 44)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(ours.eval()({"c5": x})["seg_logits"], expected, atol=1e-5, rtol=0)
        conv = ours.aspp.branches[3][0]
        conv.dilation = conv.padding = (24, 24)  # a wrong rate shows
        assert not torch.allclose(ours({"c5": x})["seg_logits"], expected, atol=1e-3)


def test_the_checkpoint_carries_its_config_and_voc_class_names():
    with torch.device("meta"):
        state = torchvision.models.segmentation.deeplabv3_resnet101(weights=None, weights_backbone=None).state_dict()
    converted = convert_weights(state, "torchvision")
    cfg = converted.config
    assert converted.kind == "model" and converted.class_names[:2] == ["background", "aeroplane"]
    assert len(converted.class_names) == 21 and cfg["work_dir"] == "work_dirs/deeplabv3_resnet101"
    backbone, head = cfg["model"]["backbone"], cfg["model"]["decode_head"]
    assert (backbone["depth"], backbone["dilations"], backbone["contract_dilation"]) == (101, [1, 1, 2, 4], True)
    assert (head["type"], head["dilations"], head["channels"]) == ("ASPPHead", [12, 24, 36], 256)
    assert "auxiliary_head" not in cfg["model"]  # torchvision builds without aux_loss by default
    assert cfg["data"]["val"]["type"] == "VOCSegmentation" and cfg["evaluation"]["main_metric"] == "mIoU"


def test_the_shipped_config_has_torchvision_deeplabv3_resnet50_architecture():
    cfg = segkit.load_config(CONFIGS / "deeplabv3_r50_d8_voc.yaml", ["model.backbone.pretrained=null"])
    with torch.device("meta"):
        reference = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                                       aux_loss=True)
        model = segkit.build_model(cfg)
    state, converted = convert_torchvision_deeplabv3(reference.state_dict())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    for key in ("strides", "dilations", "contract_dilation"):
        assert cfg["model"]["backbone"][key] == converted["model"]["backbone"][key]
    fcn = segkit.load_config(CONFIGS / "fcn_r50_d8_voc.yaml")  # the same data, schedule and test windows
    for section in ("data", "optimizer", "scheduler", "trainer"):
        assert cfg[section] == fcn[section], section
    assert cfg["model"]["test_cfg"] == fcn["model"]["test_cfg"]


# ------------------------------------------------------------------------------- conversion errors
@pytest.fixture(scope="module")
def meta_state():
    with torch.device("meta"):
        return torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                                  aux_loss=True).state_dict()


def test_unmapped_keys_are_refused_by_name(meta_state):
    state = {**meta_state, "classifier.5.weight": torch.zeros(1, device="meta")}
    with pytest.raises(CheckpointError, match=r"1 key\(s\) that segkit cannot map, e.g. classifier.5.weight"):
        convert_torchvision_deeplabv3(state)


def test_an_aspp_with_other_rates_is_refused(meta_state):
    state = {k: v for k, v in meta_state.items() if not k.startswith("classifier.0.convs.3.")}
    with pytest.raises(CheckpointError, match=r"has 2 atrous branches.*\(12, 24, 36\)"):
        convert_torchvision_deeplabv3(state)


def test_a_mobilenet_deeplabv3_is_refused_naming_what_converts(tmp_path: Path, capsys):
    with torch.device("meta"):
        state = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None,
                                                                             weights_backbone=None).state_dict()
    with pytest.raises(CheckpointError, match=r"backbone is not a ResNet.*deeplabv3_resnet50, deeplabv3_resnet101"):
        convert_torchvision_deeplabv3(state)


# ------------------------------------------------------------------------------- heads
@pytest.mark.parametrize("output_stride, dilations", [(8, (12, 24, 36)), (16, (6, 12, 18))])
def test_aspp_head_keeps_the_resolution_of_its_map(output_stride: int, dilations: tuple[int, ...]):
    model = _tiny_deeplab({"type": "ASPPHead", "dilations": list(dilations)}, output_stride=output_stride).eval()
    head = model.decode_head
    assert [b[0].dilation[0] for b in head.aspp.branches] == [1, *dilations]
    assert model.backbone.output_shape()["c5"].stride == output_stride
    with torch.no_grad():
        batch, _ = model.batch_images([torch.rand(3, 64, 96)])
        logits = head(model.extract_features(batch))["seg_logits"]
        out = model([torch.rand(3, 50, 70)])[0]["sem_seg"]
    assert logits.shape == (1, 3, 64 // output_stride, 96 // output_stride)
    assert out.shape == (3, 50, 70)


@pytest.mark.parametrize("separable", [False, True])
def test_deeplabv3plus_head_predicts_at_the_low_level_resolution(separable: bool):
    shapes = {"c2": ShapeSpec(8, 4), "c5": ShapeSpec(32, 16)}
    torch.manual_seed(0)
    head = HEADS.build({"type": "DeepLabV3PlusHead", "num_classes": 4, "channels": 16, "low_level_channels": 6,
                        "dilations": [6, 12, 18], "separable": separable}, path="model.decode_head",
                       in_shapes=shapes).eval()
    c2, c5 = torch.rand(2, 8, 24, 32), torch.rand(2, 32, 6, 8)
    with torch.no_grad():
        logits = head({"c2": c2, "c5": c5})["seg_logits"]
        other = head({"c2": torch.rand(2, 8, 24, 32), "c5": c5})["seg_logits"]
    assert logits.shape == (2, 4, 24, 32) and not torch.allclose(logits, other)  # the decoder reads c2
    first_conv = head.decoder[0][0][0] if separable else head.decoder[0][0]
    assert head.low_level[0].out_channels == 6 and first_conv.in_channels == 16 + 6
    if separable:  # depthwise 3x3 convs, then pointwise ones
        assert head.aspp.branches[1][0][0].groups == 32 and first_conv.groups == 22
    with pytest.raises(ValueError, match=r"low_level_feature \['c3'\] are not among the input maps"):
        HEADS.build({"type": "DeepLabV3PlusHead", "num_classes": 4, "low_level_feature": "c3"},
                    path="model.decode_head", in_shapes=shapes)


def test_the_image_pooling_branch_with_one_image_in_training():
    """BatchNorm cannot normalise one value per channel: a clear error, GroupNorm trains, eval works."""
    shapes = {"c5": ShapeSpec(16, 8)}
    x = torch.rand(1, 16, 5, 5)
    head = HEADS.build({"type": "ASPPHead", "num_classes": 3, "channels": 8}, path="model.decode_head",
                       in_shapes=shapes)
    with pytest.raises(ValueError, match=r"cannot train on a batch of one image.*pool_norm to GN or null"):
        head({"c5": x})
    assert head({"c5": torch.rand(2, 16, 5, 5)})["seg_logits"].shape == (2, 3, 5, 5)
    assert head.eval()({"c5": x})["seg_logits"].shape == (1, 3, 5, 5)
    for pool_norm in ("GN", None):  # GroupNorm: 32 groups of two channels
        head = HEADS.build({"type": "ASPPHead", "num_classes": 3, "channels": 64, "pool_norm": pool_norm},
                           path="model.decode_head", in_shapes=shapes)
        loss = head.losses(head({"c5": x}), torch.randint(0, 3, (1, 5, 5)))["loss_seg"]
        loss.backward()
        assert torch.isfinite(loss) and head.aspp.pool.conv[0].weight.grad is not None
    assert len(head.aspp.pool.conv) == 2 and head.aspp.pool.conv[0].bias is not None  # conv + ReLU
    with pytest.raises(ValueError, match="one channel, so one value, per group"):
        HEADS.build({"type": "ASPPHead", "num_classes": 3, "channels": 32, "pool_norm": "GN"},
                    path="model.decode_head", in_shapes=shapes)


def test_bad_head_options_are_refused():
    shapes = {"c5": ShapeSpec(16, 8)}
    for options, message in (({"dilations": []}, "dilations must be one or more rates"),
                             ({"aspp_dropout": 1.0}, r"dropout is a probability in \[0, 1\)"),
                             ({"pool_norm": "IN"}, "pool_norm.*got 'IN'")):
        with pytest.raises(ValueError, match=message):
            HEADS.build({"type": "ASPPHead", "num_classes": 3, **options}, path="model.decode_head", in_shapes=shapes)


# ------------------------------------------------------------------------------- learning
def _blobs(count: int, size: int = 48) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Images with a bright square (class 1) and a dark disc (class 2) on grey noise, and their label maps."""
    g = torch.Generator().manual_seed(3)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, targets = [], []
    for _ in range(count):
        label = torch.zeros(size, size, dtype=torch.int64)
        x0, y0 = (int(v) for v in torch.randint(0, size - 16, (2,), generator=g))
        label[y0:y0 + 14, x0:x0 + 14] = 1
        cx, cy = (int(v) for v in torch.randint(8, size - 8, (2,), generator=g))
        label[(xx - cx) ** 2 + (yy - cy) ** 2 < 49] = 2
        image = 0.5 + 0.1 * torch.randn(3, size, size, generator=g)
        image[:, label == 1] += 0.4
        image[:, label == 2] -= 0.4
        images.append(image.clamp(0, 1))
        targets.append({"sem_seg": label})
    return images, targets


@pytest.mark.parametrize("head", [{"type": "ASPPHead", "dilations": [1, 2, 3]},
                                  {"type": "DeepLabV3PlusHead", "dilations": [1, 2, 3], "low_level_channels": 8}],
                         ids=["ASPPHead", "DeepLabV3PlusHead"])
def test_a_tiny_deeplab_lowers_its_loss_on_blobs(head: dict):
    model = _tiny_deeplab(head).train()
    images, targets = _blobs(4)
    history = overfit(model, images, targets, steps=25, lr=0.01)
    first, last = history[0]["loss_seg"], history[-1]["loss_seg"]
    assert last < 0.5 * first, [round(h["loss_seg"], 3) for h in history]
