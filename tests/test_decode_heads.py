"""Encoding layer, Context Encoding Module, SE-loss targets and the FCN / Enc decode heads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segkit.errors import ConfigError
from segkit.ops.encoding import ContextEncoding, Encoding
from segkit.ops.shape_spec import ShapeSpec
from segkit.registry import HEADS
from segkit_plugins.heads.decode_heads import EncHead, FCNHead, se_loss_targets

pytestmark = pytest.mark.usefixtures("one_thread")


SHAPES = {"c3": ShapeSpec(24, 8), "c4": ShapeSpec(32, 8), "c5": ShapeSpec(48, 8)}


def _features(batch: int = 2, size: tuple[int, int] = (9, 11), shapes=SHAPES) -> dict[str, torch.Tensor]:
    return {name: torch.rand(batch, spec.channels, *size) for name, spec in shapes.items()}


def _reference_encoding(x: torch.Tensor, codewords: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Explicit loops over images, descriptors and codewords (float64)."""
    n, d = x.shape[:2]
    k = codewords.shape[0]
    desc = x.reshape(n, d, -1)
    out = []
    for b in range(n):
        e = [torch.zeros(d, dtype=torch.float64) for _ in range(k)]
        for i in range(desc.shape[2]):
            xi = desc[b, :, i]
            logits = torch.stack([scale[c] * ((xi - codewords[c]) ** 2).sum() for c in range(k)])
            weights = torch.softmax(logits, dim=0)
            for c in range(k):
                e[c] = e[c] + weights[c] * (xi - codewords[c])
        out.append(torch.stack(e))
    return torch.stack(out)


def _random_encoding(d: int, k: int) -> Encoding:
    enc = Encoding(channels=d, num_codes=k).double()
    with torch.no_grad():
        enc.codewords.copy_(torch.randn(k, d, dtype=torch.float64))
        enc.scale.uniform_(-1.0, 0.0)
    return enc


# ---------------------------------------------------------------- Encoding
def test_encoding_matches_loop_reference_in_float64():
    torch.manual_seed(0)
    enc = _random_encoding(5, 4)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    expected = _reference_encoding(x, enc.codewords.detach(), enc.scale.detach())
    torch.testing.assert_close(enc(x), expected, rtol=1e-9, atol=1e-9)


def test_encoding_gradients_match_loop_reference():
    torch.manual_seed(1)
    enc = _random_encoding(4, 3)
    x = torch.randn(2, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, 4, dtype=torch.float64)
    got = torch.autograd.grad((enc(x) * weights).sum(), [x, enc.codewords, enc.scale])
    codewords = enc.codewords.detach().clone().requires_grad_(True)
    scale = enc.scale.detach().clone().requires_grad_(True)
    ref = _reference_encoding(x, codewords, scale)
    expected = torch.autograd.grad((ref * weights).sum(), [x, codewords, scale])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-8)


def test_encoding_in_float32_is_close_to_reference():
    torch.manual_seed(2)
    enc = _random_encoding(8, 6)
    x = torch.rand(2, 8, 5, 5, dtype=torch.float64)
    expected = _reference_encoding(x, enc.codewords.detach(), enc.scale.detach())
    got = enc.float()(x.float())
    assert got.dtype == torch.float32 and got.shape == (2, 6, 8)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_encoding_initialisation_ranges():
    torch.manual_seed(3)
    enc = Encoding(channels=64, num_codes=32)
    bound = 1.0 / math.sqrt(64 * 32)
    codes, scale = enc.codewords.detach(), enc.scale.detach()
    assert codes.abs().max() <= bound and codes.abs().max() > 0.9 * bound
    assert codes.min() < 0 < codes.max()
    assert (scale < 0).all() and (scale >= -1).all() and scale.min() < -0.9 and scale.max() > -0.1


def test_encoding_rejects_wrong_channel_count_and_bad_sizes():
    with pytest.raises(ValueError, match=r"Tensor\[N, 8, H, W\].*\(1, 6, 4, 4\)"):
        Encoding(channels=8, num_codes=4)(torch.rand(1, 6, 4, 4))
    with pytest.raises(ValueError, match="num_codes must be >= 1"):
        Encoding(channels=8, num_codes=0)


def test_context_encoding_follows_conv_encoding_relu_mean_order():
    torch.manual_seed(4)
    module = ContextEncoding(in_channels=6, channels=5, num_codes=4, norm=None).double().eval()
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    reduced = F.relu(module.conv(x))
    expected = F.relu(_reference_encoding(reduced, module.encoding.codewords.detach(), module.encoding.scale.detach()))
    torch.testing.assert_close(module(x), expected.mean(dim=1), rtol=1e-8, atol=1e-8)


def test_context_encoding_normalises_over_codewords():
    module = ContextEncoding(in_channels=16, num_codes=8, norm="BN")
    assert isinstance(module.code_norm, torch.nn.BatchNorm1d) and module.code_norm.num_features == 8
    assert module(torch.rand(1, 16, 5, 5)).shape == (1, 16)
    with pytest.raises(ValueError, match="cannot normalise the codewords"):
        ContextEncoding(in_channels=16, norm="FrozenBN")


# ---------------------------------------------------------------- SE-loss targets
def test_se_loss_targets_mark_present_classes_without_ignore():
    sem_seg = torch.tensor(
        [
            [[0, 0, 2], [2, 255, 2]],
            [[255, 255, 255], [255, 255, 255]],
            [[3, 1, 1], [1, 1, 255]],
        ]
    )
    expected = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 1]])
    got = se_loss_targets(sem_seg, num_classes=4, ignore_index=255)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_se_loss_targets_honour_a_custom_ignore_index():
    sem_seg = torch.tensor([[[0, 1], [2, 2]]])
    torch.testing.assert_close(se_loss_targets(sem_seg, 3, ignore_index=2), torch.tensor([[1.0, 1.0, 0.0]]))


# ---------------------------------------------------------------- heads: outputs and losses
@pytest.mark.parametrize(
    ("options", "keys", "loss_keys"),
    [
        ({}, {"seg_logits", "se_logits"}, {"loss_seg", "loss_se"}),
        ({"use_se_loss": False}, {"seg_logits"}, {"loss_seg"}),
        ({"lateral": True}, {"seg_logits", "se_logits"}, {"loss_seg", "loss_se"}),
        (
            {"extra_encoding": True, "lateral": True},
            {"seg_logits", "se_logits", "se_logits_aux"},
            {"loss_seg", "loss_se", "loss_se_aux"},
        ),
    ],
)
def test_enc_head_outputs_and_loss_keys(options, keys, loss_keys):
    head = EncHead(in_shapes=SHAPES, num_classes=5, channels=16, num_codes=8, **options)
    outputs = head(_features())
    assert set(outputs) == keys
    assert outputs["seg_logits"].shape == (2, 5, 9, 11)
    for key in keys - {"seg_logits"}:
        assert outputs[key].shape == (2, 5)
    losses = head.losses(outputs, torch.randint(0, 5, (2, 72, 88)))
    assert set(losses) == loss_keys
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())


def test_enc_head_lateral_maps_of_other_resolutions_are_resized_to_c5():
    shapes = {"c3": ShapeSpec(8, 8), "c4": ShapeSpec(8, 16), "c5": ShapeSpec(8, 32)}
    feats = {"c3": torch.rand(1, 8, 16, 16), "c4": torch.rand(1, 8, 8, 8), "c5": torch.rand(1, 8, 4, 4)}
    head = EncHead(in_shapes=shapes, num_classes=3, channels=8, num_codes=4, lateral=True)
    assert head(feats)["seg_logits"].shape == (1, 3, 4, 4)


def test_enc_head_losses_match_reference_formulas():
    torch.manual_seed(5)
    head = EncHead(in_shapes=SHAPES, num_classes=4, channels=8, num_codes=4, se_loss_weight=0.3, loss_weight=0.7)
    outputs = {"seg_logits": torch.randn(2, 4, 3, 4), "se_logits": torch.randn(2, 4)}
    sem_seg = torch.randint(0, 4, (2, 12, 16))
    sem_seg[0, :5] = 255
    losses = head.losses(outputs, sem_seg)
    up = F.interpolate(outputs["seg_logits"], size=(12, 16), mode="bilinear", align_corners=False)
    log_probs = up.log_softmax(1).permute(0, 2, 3, 1)[sem_seg != 255]
    nll = -log_probs.gather(1, sem_seg[sem_seg != 255][:, None]).mean()
    torch.testing.assert_close(losses["loss_seg"], nll * 0.7)
    present = torch.stack([torch.isin(torch.arange(4), s[s != 255]) for s in sem_seg]).float()
    probs = outputs["se_logits"].sigmoid()
    bce = -(present * probs.log() + (1 - present) * (1 - probs).log()).mean()
    torch.testing.assert_close(losses["loss_se"], bce * 0.3)


@pytest.mark.parametrize("head_type", ["EncHead", "FCNHead"])
def test_losses_are_finite_and_connected_when_every_pixel_is_ignored(head_type):
    options = {"extra_encoding": True} if head_type == "EncHead" else {}
    head = HEADS.build({"type": head_type, "num_classes": 3, "channels": 8, **options}, in_shapes=SHAPES)
    losses = head.losses(head(_features()), torch.full((2, 72, 88), 255))
    assert losses["loss_seg"].item() == 0.0
    total = sum(losses.values())
    assert torch.isfinite(total) and total.requires_grad
    total.backward()
    assert head.classifier.weight.grad is not None


def test_fcn_head_defaults_to_a_quarter_width_single_conv():
    head = FCNHead(in_shapes=SHAPES, num_classes=7, in_features="c4")
    convs = [m for m in head.convs.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(32, 8, (3, 3))]
    assert head(_features())["seg_logits"].shape == (2, 7, 9, 11)
    assert set(head.losses(head(_features()), torch.zeros(2, 72, 88, dtype=torch.long))) == {"loss_seg"}


def test_fcn_head_concatenates_several_inputs_at_the_first_size():
    shapes = {"c4": ShapeSpec(8, 8), "c5": ShapeSpec(16, 16)}
    head = FCNHead(in_shapes=shapes, num_classes=3, in_features=["c4", "c5"], channels=12, num_convs=2)
    assert head.in_channels == 24
    out = head({"c4": torch.rand(2, 8, 10, 10), "c5": torch.rand(2, 16, 5, 5)})
    assert out["seg_logits"].shape == (2, 3, 10, 10)


def test_fcn_head_without_convs_classifies_the_input():
    head = FCNHead(in_shapes=SHAPES, num_classes=3, num_convs=0, dropout=0.0)
    x = _features()
    expected = F.conv2d(x["c5"], head.classifier.weight, head.classifier.bias)
    torch.testing.assert_close(head(x)["seg_logits"], expected)


@pytest.mark.parametrize("head_type", ["EncHead", "FCNHead"])
def test_a_few_optimisation_steps_reduce_the_loss(head_type):
    torch.manual_seed(6)
    feats = _features(batch=2, size=(6, 6))
    # Learnable labels: the class is where a fixed projection of c5 is largest.
    projection = torch.randn(3, SHAPES["c5"].channels)
    sem_seg = torch.einsum("kc,nchw->nkhw", projection, feats["c5"]).argmax(1)
    sem_seg = sem_seg.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)
    head = HEADS.build({"type": head_type, "num_classes": 3, "channels": 16, "dropout": 0.0}, in_shapes=SHAPES)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    totals = []
    for _ in range(15):
        total = sum(head.losses(head(feats), sem_seg).values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert totals[-1] < 0.7 * totals[0]


# ---------------------------------------------------------------- constructor errors
def test_unknown_in_features_names_the_available_maps():
    with pytest.raises(ConfigError, match=r"model\.decode_head.*\['c5'\].*\['p2', 'p3'\]"):
        HEADS.build_child(
            {"type": "EncHead", "num_classes": 3},
            path="model.decode_head",
            in_shapes={"p2": ShapeSpec(16, 4), "p3": ShapeSpec(16, 8)},
        )
    with pytest.raises(ValueError, match=r"FCNHead in_features \['c9'\].*\['c3', 'c4', 'c5'\]"):
        FCNHead(in_shapes=SHAPES, num_classes=3, in_features="c9")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lateral": True, "lateral_features": ["c2"]}, r"lateral_features \['c2'\]"),
        ({"extra_encoding": True, "extra_in_feature": "c9"}, r"extra_in_feature \['c9'\]"),
        ({"extra_encoding": True, "use_se_loss": False}, "needs use_se_loss: true"),
        ({"num_codes": 0}, "num_codes must be >= 1"),
        ({"dropout": 1.0}, r"dropout is a probability in \[0, 1\)"),
        ({"se_loss_weight": -1.0}, "se_loss_weight must be >= 0"),
        ({"norm": "IN"}, "norm must be null or one of"),
        ({"num_classes": 0}, "num_classes must be >= 1"),
    ],
)
def test_enc_head_rejects_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        EncHead(in_shapes=SHAPES, **{"num_classes": 3, "channels": 8, **options})


def test_fcn_head_rejects_bad_values():
    with pytest.raises(ValueError, match="num_convs must be >= 0"):
        FCNHead(in_shapes=SHAPES, num_classes=3, num_convs=-1)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        FCNHead(in_shapes=SHAPES, num_classes=3, kernel_size=2)
    with pytest.raises(ValueError, match="leave channels unset"):
        FCNHead(in_shapes=SHAPES, num_classes=3, num_convs=0, channels=8)


def test_losses_reject_label_maps_of_the_wrong_shape():
    head = FCNHead(in_shapes=SHAPES, num_classes=3)
    with pytest.raises(ValueError, match=r"Tensor\[N, H, W\] with N=2"):
        head.losses(head(_features()), torch.zeros(72, 88, dtype=torch.long))
