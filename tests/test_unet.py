"""U-Net: the encoder with same and valid padding, the decoder head over it and over a ResNet, and a
segmentor built from them that trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segkit.ops.shape_spec import ShapeSpec
from segkit.registry import MODELS, discover_plugins
from segkit_plugins.backbones.unet import UNet, ValidGeometry, mirror_pad
from segkit_plugins.heads.unet_head import UNetHead

discover_plugins()


def test_valid_padding_reproduces_the_paper_s_geometry():
    # Figure 1 of the paper: a 572x572 tile gives a 388x388 map; the skip maps 568, 280, 136, 64 are cut
    # to 392, 200, 104, 56 at the upsampled maps.
    geometry = ValidGeometry.of(5)
    assert geometry.margin == 92 and geometry.padded_size(388) == 572
    net = UNet(depth=5, base_channels=2, padding="valid", norm=None)
    maps = net(torch.rand(1, 3, 388, 388))
    assert [m.shape[-1] for m in maps.values()] == [568, 280, 136, 64, 28]
    assert [geometry.skip_offset(level) for level in range(4)] == [(568 - 392) // 2, (280 - 200) // 2,
                                                                    (136 - 104) // 2, (64 - 56) // 2]
    head = UNetHead(in_shapes=net.output_shape(), num_classes=2, padding="valid", norm=None)
    assert head(maps)["seg_logits"].shape == (1, 2, 388, 388)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("size", [(64, 64), (70, 53), (17, 40)])
def test_the_output_has_the_input_s_size_whatever_the_size(padding: str, size: tuple[int, int]):
    net = UNet(depth=4, base_channels=4, padding=padding)
    head = UNetHead(in_shapes=net.output_shape(), num_classes=3, padding=padding)
    maps = net(torch.rand(2, 3, *size))
    shapes = net.output_shape()
    assert list(maps) == ["s1", "s2", "c2", "c3"] and [s.stride for s in shapes.values()] == [1, 2, 4, 8]
    assert [m.shape[1] for m in maps.values()] == [s.channels for s in shapes.values()] == [4, 8, 16, 32]
    if padding == "same":  # the real strides are the reported ones
        assert [m.shape[-2] for m in maps.values()] == [size[0] // s.stride for s in shapes.values()]
    assert head(maps)["seg_logits"].shape == (2, 3, *size)


def _mirror_symmetric(module: nn.Module) -> None:
    """Weights unchanged by a horizontal flip, so a network aligned with its input commutes with flips."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)


@pytest.mark.parametrize("padding, side", [("same", 64), ("valid", 36)])
def test_the_output_is_aligned_with_the_input(padding: str, side: int):
    # With flip-symmetric weights, flipping the image flips the output exactly when every map and crop is
    # centred where it should be: a crop off by a pixel would break it. 36 + 2 * 92 pools evenly.
    torch.manual_seed(0)
    net = UNet(depth=5, base_channels=4, padding=padding, norm=None)
    head = UNetHead(in_shapes=net.output_shape(), num_classes=2, padding=padding, norm=None)
    _mirror_symmetric(net), _mirror_symmetric(head)
    image = torch.rand(1, 3, side, side)
    out = head(net(image))["seg_logits"]
    flipped = head(net(image.flip(-1)))["seg_logits"]
    assert torch.allclose(flipped, out.flip(-1), atol=1e-5)
    assert not torch.allclose(out, out.flip(-1), atol=1e-3)  # the test is not vacuous


def test_mirror_padding_extends_beyond_the_image_side():
    x = torch.arange(3.0).view(1, 1, 1, 3)
    assert mirror_pad(x, 0, 0, 5, 0)[0, 0, 0].tolist() == [1, 0, 1, 2, 1, 0, 1, 2]


def test_the_head_decodes_a_resnet_s_maps_and_the_model_learns():
    cfg = {
        "type": "EncoderDecoder",
        "backbone": {"type": "ResNet", "depth": 18, "base_channels": 8},
        "decode_head": {"type": "UNetHead", "in_features": ["c2", "c3", "c4", "c5"], "channels": 16,
                        "upsample": "bilinear", "num_classes": 2,
                        "loss": [{"type": "CrossEntropy"}, {"type": "Dice", "weight": 0.5}]},
    }
    torch.manual_seed(0)
    model = MODELS.build(cfg, path="model")
    assert [b[0][0].out_channels for b in model.decode_head.blocks] == [64, 32, 16]
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    for image in images:
        image[:, 16:48, 16:48] += 1.0
    label = torch.zeros(64, 64, dtype=torch.long)
    label[16:48, 16:48] = 1
    targets = [{"sem_seg": label}, {"sem_seg": label}]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    first = None
    for _ in range(15):
        losses = model(images, targets)
        total = sum(losses.values())
        first = first if first is not None else total.item()
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert set(losses) == {"loss_seg", "loss_dice"} and total.item() < 0.5 * first


@pytest.mark.parametrize("kwargs, shapes, words", [
    ({}, {"c2": ShapeSpec(8, 4), "c4": ShapeSpec(16, 16)}, "strides doubling"),
    ({"channels": [8, 8, 8]}, {"c2": ShapeSpec(8, 4), "c3": ShapeSpec(16, 8)}, "one width per decoder level"),
    ({"padding": "valid"}, {"c2": ShapeSpec(8, 4), "c3": ShapeSpec(16, 8)}, "start at stride 1"),
    ({"upsample": "nearest"}, {"c2": ShapeSpec(8, 4), "c3": ShapeSpec(16, 8)}, "'deconv' or 'bilinear'"),
])
def test_a_head_that_cannot_decode_its_maps_says_why(kwargs, shapes, words):
    with pytest.raises(ValueError, match=words):
        UNetHead(in_shapes=shapes, num_classes=2, **kwargs)


def test_a_valid_head_on_a_same_padding_encoder_says_what_to_use():
    net = UNet(depth=3, base_channels=4, padding="same")
    head = UNetHead(in_shapes=net.output_shape(), num_classes=2, padding="valid")
    with pytest.raises(ValueError, match="UNet backbone of padding: valid"):
        head(net(torch.rand(1, 3, 32, 32)))


def test_the_encoder_starts_from_a_trained_run_s_weights(tmp_path):
    from segkit.checkpoint import CheckpointError

    trained = UNet(depth=3, base_channels=4)
    with torch.no_grad():
        for p in trained.parameters():
            p.uniform_()
    path = tmp_path / "run.ckpt"  # what segkit train writes: the model's weights under "model."
    torch.save({"state_dict": {f"model.backbone.{k}": v for k, v in trained.state_dict().items()}}, path)
    loaded = UNet(depth=3, base_channels=4, pretrained=str(path))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))
    with pytest.raises(CheckpointError, match="check depth and base_channels"):
        UNet(depth=3, base_channels=8, pretrained=str(path))
    with pytest.raises(CheckpointError, match="no published weights"):
        UNet(depth=3, pretrained="torchvision://unet")
