"""Semantic-segmentation metrics against a numpy reference; distributed merging; errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segkit.evaluation.semseg import SemSegEvaluator, confusion_matrix, segmentation_metrics
from segkit.evaluation.table import format_metrics_table

K = 5


class _Dataset:
    classes = ("background", "a", "b", "c", "d")
    num_classes = K
    ignore_index = 255


def _reference(preds: list[np.ndarray], labels: list[np.ndarray]) -> dict[str, float]:
    """Per class by explicit counting; MMSegmentation's means and PyTorch-Encoding's."""
    pred = np.concatenate([p.ravel() for p in preds])
    label = np.concatenate([g.ravel() for g in labels])
    keep = label != 255
    pred, label = pred[keep], label[keep]
    ious, accs, inter_all, union_all = [], [], [], []
    for k in range(K):
        inter = np.sum((pred == k) & (label == k))
        union = np.sum((pred == k) | (label == k))
        gt = np.sum(label == k)
        ious.append(inter / union if union else math.nan)
        accs.append(inter / gt if gt else math.nan)
        inter_all.append(inter)
        union_all.append(union)
    eps = np.spacing(1)
    return {
        "aAcc": np.mean(pred == label), "mIoU": np.nanmean(ious), "mAcc": np.nanmean(accs),
        "fwIoU": sum(np.mean(label == k) * ious[k] for k in range(K) if not math.isnan(ious[k])),
        "mIoU_all": np.mean(np.array(inter_all) / (eps + np.array(union_all))),
        "pixAcc": np.sum(pred == label) / (eps + label.size),
        **{f"IoU-{n}": v for n, v in zip(_Dataset.classes, ious)},
        **{f"Acc-{n}": v for n, v in zip(_Dataset.classes, accs)},
    }


def _random_maps(seed: int, count: int = 4) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    preds, labels = [], []
    for _ in range(count):
        label = rng.integers(0, 3, (17, 23))  # classes 3 and 4 never in the ground truth
        label[rng.random(label.shape) < 0.2] = 255
        pred = np.where(rng.random(label.shape) < 0.7, np.where(label == 255, 0, label), rng.integers(0, 4, label.shape))
        preds.append(pred)  # class 3 predicted but absent, class 4 absent from both
        labels.append(label)
    return preds, labels


def _scores(pred: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(pred), K).permute(2, 0, 1).float()


def _assert_metrics_equal(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=1e-12), key


def test_metrics_equal_a_numpy_reference_with_ignored_and_absent_classes():
    preds, labels = _random_maps(0)
    cm = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(g), K) for p, g in zip(preds, labels))
    got = segmentation_metrics(cm, _Dataset.classes)
    expected = _reference(preds, labels)
    _assert_metrics_equal(got, expected)
    assert math.isnan(got["IoU-d"]) and got["IoU-c"] == 0.0 and math.isnan(got["Acc-c"])
    assert got["mIoU_all"] < got["mIoU"]  # the all-class mean counts the absent classes as 0


def test_evaluator_process_and_merge_over_two_processes_equals_one_pass_and_counts_duplicates_once():
    preds, labels = _random_maps(1, count=6)
    targets = [{"sem_seg": torch.from_numpy(g), "image_id": i} for i, g in enumerate(labels)]
    outputs = [{"sem_seg": _scores(p)} for p in preds]
    single = SemSegEvaluator(dataset=_Dataset())
    single.process(targets, outputs)
    ranks = [SemSegEvaluator(dataset=_Dataset()) for _ in range(2)]
    ranks[0].process(targets[:3], outputs[:3])
    ranks[1].process(targets[3:] + targets[:1], outputs[3:] + outputs[:1])  # padded with a duplicate
    ranks[0].merge([r.state() for r in ranks])
    _assert_metrics_equal(ranks[0].evaluate(), single.evaluate())
    _assert_metrics_equal(single.evaluate(), _reference(preds, labels))


def test_scores_of_another_size_are_resized_to_the_label():
    label = torch.zeros(8, 8, dtype=torch.int64)
    label[:, 4:] = 1
    scores = torch.zeros(K, 4, 4)
    scores[0, :, :2] = scores[1, :, 2:] = 1.0
    evaluator = SemSegEvaluator(dataset=_Dataset(), per_class=False)
    evaluator.process([{"sem_seg": label, "image_id": 0}], [{"sem_seg": scores}])
    assert evaluator.evaluate()["aAcc"] == 1.0


def test_bad_values_are_named():
    with pytest.raises(ValueError, match=r"label values \[7\] are outside the 5 classes"):
        confusion_matrix(torch.zeros(3, dtype=torch.int64), torch.tensor([0, 7, 255]), K)
    with pytest.raises(ValueError, match=r"prediction values \[-1\]"):
        confusion_matrix(torch.tensor([0, -1, 0]), torch.tensor([0, 1, 2]), K)
    evaluator = SemSegEvaluator(dataset=_Dataset())
    with pytest.raises(ValueError, match=r"Tensor\[K=5, H, W\]"):
        evaluator.process([{"sem_seg": torch.zeros(4, 4, dtype=torch.int64), "image_id": 0}],
                          [{"sem_seg": torch.zeros(3, 4, 4)}])


def test_table_lists_every_class_and_the_summary():
    preds, labels = _random_maps(2)
    cm = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(g), K) for p, g in zip(preds, labels))
    text = format_metrics_table(segmentation_metrics(cm, _Dataset.classes))
    lines = text.splitlines()
    assert lines[0].split() == ["class", "IoU", "Acc"]
    assert [line.split()[0] for line in lines[1:6]] == list(_Dataset.classes)
    assert "mIoU_all" in text and "pixAcc" in text and "IoU-a" not in text
