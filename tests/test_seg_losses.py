"""Segmentation losses a decode head's ``loss:`` chooses: class-weighted cross-entropy, Dice, their sums,
and median-frequency class weights computed from the training labels."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segkit.data.class_weights import class_pixel_counts, median_frequency_weights, resolve_class_weights
from segkit.ops.seg_losses import SegLoss, dice_loss, weighted_cross_entropy
from segkit.ops.shape_spec import ShapeSpec
from segkit_plugins.heads.decode_heads import FCNHead


def _batch(seed: int = 0, k: int = 4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, k, 9, 11, generator=g)
    labels = torch.randint(0, k, (2, 9, 11), generator=g)
    labels[0, :3] = 255
    return logits, labels


def test_weighted_cross_entropy_is_torch_s_weighted_mean_over_labelled_pixels():
    logits, labels = _batch()
    weight = torch.tensor([0.2, 1.0, 3.0, 0.5])
    expected = F.cross_entropy(logits, labels, weight=weight, ignore_index=255)
    assert torch.allclose(weighted_cross_entropy(logits, labels, ignore_index=255, class_weight=weight), expected)
    plain = F.cross_entropy(logits, labels, ignore_index=255)
    assert torch.allclose(weighted_cross_entropy(logits, labels, ignore_index=255), plain)
    nothing = torch.full_like(labels, 255)
    assert weighted_cross_entropy(logits.requires_grad_(), nothing, ignore_index=255, class_weight=weight) == 0


def _dice_by_loops(logits: torch.Tensor, labels: torch.Tensor, smooth: float, exponent: int) -> float:
    probs = logits.softmax(1).numpy()
    labels = labels.numpy()
    scores = []
    for k in range(probs.shape[1]):
        inter = p_sum = t_sum = 0.0
        for n, y, x in np.ndindex(labels.shape):
            if labels[n, y, x] == 255:
                continue
            p, t = probs[n, k, y, x], float(labels[n, y, x] == k)
            inter += p * t
            p_sum += p ** exponent
            t_sum += t ** exponent
        scores.append(1 - (2 * inter + smooth) / (p_sum + t_sum + smooth))
    return float(np.mean(scores))


@pytest.mark.parametrize("exponent", [1, 2])
def test_dice_loss_matches_its_definition_and_vanishes_on_a_perfect_prediction(exponent: int):
    logits, labels = _batch(1)
    got = dice_loss(logits, labels, ignore_index=255, smooth=1.0, exponent=exponent)
    assert got.item() == pytest.approx(_dice_by_loops(logits, labels, 1.0, exponent), abs=1e-6)
    perfect = F.one_hot(labels.clamp(max=3), 4).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, labels, ignore_index=255).item() < 1e-3
    assert dice_loss(-perfect, labels, ignore_index=255).item() > 0.9


def test_a_head_sums_the_terms_its_loss_option_names():
    logits, labels = _batch(2)
    loss = SegLoss([{"type": "CrossEntropy", "class_weight": [1, 2, 3, 4]}, {"type": "Dice", "weight": 0.5}],
                   num_classes=4, ignore_index=255, owner="FCNHead")
    values = loss(logits, labels)
    assert set(values) == {"loss_seg", "loss_dice"}
    ce = F.cross_entropy(logits, labels, weight=torch.tensor([1.0, 2, 3, 4]), ignore_index=255)
    assert torch.allclose(values["loss_seg"], ce)
    assert torch.allclose(values["loss_dice"], 0.5 * dice_loss(logits, labels, ignore_index=255))

    head = FCNHead(in_shapes={"c4": ShapeSpec(8, 8)}, num_classes=4, in_features="c4", loss_weight=2.0,
                   loss={"type": "Dice"})
    features = torch.randn(2, 8, 5, 6, requires_grad=True)
    losses = head.losses(head({"c4": features}), labels)
    assert set(losses) == {"loss_dice"}
    losses["loss_dice"].backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


@pytest.mark.parametrize("spec, words", [
    ({"type": "Dise"}, ["'Dise' is not a segmentation loss", "Did you mean 'Dice'"]),
    ({"type": "CrossEntropy", "class_weigth": [1, 1]}, ["no option 'class_weigth'", "Did you mean 'class_weight'"]),
    ({"type": "CrossEntropy", "class_weight": [1, 1]}, ["a list of 4 numbers"]),
    ({"type": "CrossEntropy", "class_weight": "median_frequncy"}, ["Did you mean 'median_frequency'"]),
    ([{"type": "Dice"}, {"type": "Dice"}], ["several terms named 'loss_dice'"]),
    ({"type": "Dice", "smooth": 0}, ["smooth must be > 0"]),
    ([], ["non-empty list"]),
])
def test_a_wrong_loss_option_is_named_with_a_fix(spec, words):
    with pytest.raises(ValueError) as raised:
        SegLoss(spec, num_classes=4, ignore_index=255, owner="FCNHead")
    for word in words:
        assert word in str(raised.value)


def test_a_head_built_with_median_frequency_predicts_but_does_not_train_without_the_numbers():
    head = FCNHead(in_shapes={"c4": ShapeSpec(8, 8)}, num_classes=4, in_features="c4",
                   loss={"type": "CrossEntropy", "class_weight": "median_frequency"})
    outputs = head({"c4": torch.randn(1, 8, 4, 4)})
    assert outputs["seg_logits"].shape == (1, 4, 4, 4)
    with pytest.raises(ValueError, match="median_frequency of the loss_seg term was not computed"):
        head.losses(outputs, torch.zeros(1, 4, 4, dtype=torch.long))


class _Labels:
    """Three 2x2 label maps: class 2 occurs in one image only, class 3 in none."""

    num_classes = 4
    ignore_index = 255
    maps = [np.array([[0, 0], [0, 1]]), np.array([[0, 1], [255, 1]]), np.array([[2, 0], [0, 0]])]

    def __len__(self):
        return len(self.maps)

    def load_label(self, index):
        return self.maps[index]


def test_median_frequency_weights_follow_eigen_and_fergus():
    class_pixels, image_pixels = class_pixel_counts(_Labels(), progress=False)
    assert class_pixels.tolist() == [7, 3, 1, 0]
    assert image_pixels.tolist() == [11, 7, 4, 0]  # labelled pixels of the images each class occurs in
    weights = median_frequency_weights(class_pixels, image_pixels)
    frequency = np.array([7 / 11, 3 / 7, 1 / 4])
    assert weights[:3] == pytest.approx(list(np.median(frequency) / frequency))
    assert weights[3] == 0.0  # absent: nothing to weight

    cfg = {"model": {"decode_head": {"loss": [{"type": "CrossEntropy", "class_weight": "median_frequency"},
                                              {"type": "Dice"}]}}}
    resolved = resolve_class_weights(cfg, _Labels(), progress=False)
    assert resolved["model"]["decode_head"]["loss"][0]["class_weight"] == pytest.approx(weights)
    assert cfg["model"]["decode_head"]["loss"][0]["class_weight"] == "median_frequency"  # a copy


TRAIN_CONFIG = """
seed: 0
model:
  type: EncoderDecoder
  backbone: {{type: ResNet, depth: 18, base_channels: 8, strides: [1, 2, 2, 2]}}
  decode_head:
    type: FCNHead
    in_features: c3
    channels: 16
    num_classes: 4
    loss: [{{type: CrossEntropy, class_weight: median_frequency}}, {{type: Dice, weight: 0.5}}]
data:
  batch_size: 4
  train: {{type: ShapesSegmentation, split: train, num_images: 8, image_size: 64, root: "{root}", progress: false}}
  val: {{type: ShapesSegmentation, split: val, num_images: 2, image_size: 64, root: "{root}", progress: false}}
optimizer: {{type: AdamW, lr: 0.005}}
evaluation: {{type: SemSegEvaluator, main_metric: mIoU}}
trainer:
  max_epochs: 1
  log_every_n_steps: 1
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
work_dir: "{work_dir}"
"""


def test_training_computes_median_frequency_weights_and_logs_every_term(tmp_path: Path, capsys):
    from segkit.cli import main
    from segkit.config import load_config

    cfg = tmp_path / "unet.yaml"
    cfg.write_text(TRAIN_CONFIG.format(root=tmp_path / "data", work_dir=tmp_path / "work"))
    assert main(["train", str(cfg)]) == 0
    stored = load_config(tmp_path / "work" / "config.yaml")
    weights = stored["model"]["decode_head"]["loss"][0]["class_weight"]
    assert len(weights) == 4 and weights[0] < 1 < weights[3]  # background is common, triangles are rare
    with open(tmp_path / "work" / "logs" / "version_0" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/loss")]
    assert {"train/loss_seg", "train/loss_dice"} <= set(rows[0])

    capsys.readouterr()
    assert main(["data", "check", str(cfg), "--split", "train", "--class-weights"]) == 0
    printed = capsys.readouterr().out
    line = next(row for row in printed.splitlines() if row.startswith("class_weight: ["))
    assert [float(w) for w in line.split("[")[1].rstrip("]").split(",")] == pytest.approx(weights, abs=1e-4)

    # The run resumes from its checkpoint with the same config: the stored numbers stand for median_frequency.
    last = tmp_path / "work" / "checkpoints" / "last.ckpt"
    assert main(["train", str(cfg), "--resume", str(last)]) == 0
