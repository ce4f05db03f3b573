"""Semantic-segmentation metrics against numpy references; distributed merging; errors; the table."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from segkit.evaluation.semseg import (
    SEMSEG_SUMMARY_NAMES,
    SemSegEvaluator,
    confusion_matrix,
    segmentation_metrics,
)
from segkit.registry import EVALUATORS

K = 6
IGNORE = 255
CLASSES = ("background", "road", "car", "tree", "sky", "boat")
# In the random maps: "tree" (3) is in the ground truth but never predicted, "sky" (4) is predicted
# but never in the ground truth, "boat" (5) is in neither.
NEVER_PREDICTED, NEVER_LABELLED, ABSENT = 3, 4, 5


class FakeDataset:
    """The attributes of a segmentation dataset the evaluator reads."""

    def __init__(self, classes=CLASSES, ignore_index=IGNORE) -> None:
        self.classes = tuple(classes)
        self.num_classes = len(self.classes)
        self.ignore_index = ignore_index


def random_maps(seed: int, count: int, shape=(13, 17)) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    preds, labels = [], []
    for _ in range(count):
        label = rng.integers(0, NEVER_PREDICTED + 1, shape)
        label[rng.random(shape) < 0.2] = IGNORE
        noise = rng.integers(0, NEVER_LABELLED + 1, shape)
        pred = np.where(rng.random(shape) < 0.6, label, noise)
        pred = np.where((pred == NEVER_PREDICTED) | (pred == IGNORE), 0, pred)
        preds.append(pred)
        labels.append(label)
    return preds, labels


def one_hot_scores(pred: np.ndarray) -> torch.Tensor:
    return F.one_hot(torch.from_numpy(pred), K).permute(2, 0, 1).float()


def reference_confusion(preds: list[np.ndarray], labels: list[np.ndarray]) -> np.ndarray:
    cm = np.zeros((K, K), dtype=np.int64)
    for pred, label in zip(preds, labels):
        for i in range(K):
            for j in range(K):
                cm[i, j] += np.sum((label == i) & (pred == j))
    return cm


def reference_metrics(preds: list[np.ndarray], labels: list[np.ndarray]) -> dict[str, float]:
    """MMSegmentation's convention, class by class: undefined values are NaN and left out of means."""
    pred = np.concatenate([p.ravel() for p in preds])
    label = np.concatenate([g.ravel() for g in labels])
    pred, label = pred[label != IGNORE], label[label != IGNORE]
    ious, accs, fw = [], [], 0.0
    for k in range(K):
        inter = np.sum((pred == k) & (label == k))
        union = np.sum((pred == k) | (label == k))
        in_gt = np.sum(label == k)
        ious.append(inter / union if union else math.nan)
        accs.append(inter / in_gt if in_gt else math.nan)
        fw += in_gt / label.size * inter / union if in_gt else 0.0
    defined_ious = [v for v in ious if not math.isnan(v)]
    defined_accs = [v for v in accs if not math.isnan(v)]
    return {
        "aAcc": np.sum(pred == label) / label.size,
        "mIoU": sum(defined_ious) / len(defined_ious),
        "mAcc": sum(defined_accs) / len(defined_accs),
        "fwIoU": fw,
        **{f"IoU-{n}": v for n, v in zip(CLASSES, ious)},
        **{f"Acc-{n}": v for n, v in zip(CLASSES, accs)},
    }


def encoding_reference(preds: list[np.ndarray], labels: list[np.ndarray]) -> tuple[float, float]:
    """PyTorch-Encoding's SegmentationMetric re-stated: classes shifted to 1..K with unlabelled
    pixels at 0, areas by histogram, summed over images, IoU = inter / (eps + union) averaged over
    every class; returns (pixAcc, mIoU)."""
    total_inter, total_union, correct, labelled = np.zeros(K), np.zeros(K), 0, 0
    for pred, label in zip(preds, labels):
        target = np.where(label == IGNORE, -1, label) + 1
        predict = pred + 1
        labelled += np.sum(target > 0)
        correct += np.sum((predict == target) * (target > 0))
        predict = predict * (target > 0)
        intersection = predict * (predict == target)
        area_inter = np.histogram(intersection, bins=K, range=(1, K))[0]
        area_pred = np.histogram(predict, bins=K, range=(1, K))[0]
        area_label = np.histogram(target, bins=K, range=(1, K))[0]
        total_inter += area_inter
        total_union += area_pred + area_label - area_inter
    eps = np.spacing(1)
    return correct / (eps + labelled), float(np.mean(total_inter / (eps + total_union)))


def assert_metrics_equal(got: dict[str, float], expected: dict[str, float]) -> None:
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def batch(preds, labels, ids) -> tuple[list[dict], list[dict]]:
    targets = [{"sem_seg": torch.from_numpy(labels[i]), "image_id": i} for i in ids]
    outputs = [{"sem_seg": one_hot_scores(preds[i])} for i in ids]
    return targets, outputs


# ------------------------------------------------------------------------ confusion_matrix
def test_confusion_matrix_counts_pairs_and_skips_ignored_pixels_for_any_shape():
    preds, labels = random_maps(0, count=2)
    got = confusion_matrix(torch.from_numpy(np.stack(preds)), torch.from_numpy(np.stack(labels)), K)
    assert got.dtype == torch.int64 and got.shape == (K, K)
    np.testing.assert_array_equal(got.numpy(), reference_confusion(preds, labels))
    assert int(got.sum()) == sum(int(np.sum(g != IGNORE)) for g in labels)


def test_confusion_matrix_reads_no_prediction_at_ignored_pixels():
    got = confusion_matrix(torch.tensor([1, 99, -3]), torch.tensor([1, 255, 255]), 2)
    np.testing.assert_array_equal(got.numpy(), [[0, 0], [0, 1]])


def test_confusion_matrix_names_out_of_range_labels_and_predictions():
    with pytest.raises(ValueError, match=r"label values \[-2, 7, 300\] are outside the 6 classes 0\.\.5 and are not "
                                         r"the ignore value 255"):
        confusion_matrix(torch.zeros(5, dtype=torch.int64), torch.tensor([0, 7, 255, 300, -2]), K)
    with pytest.raises(ValueError, match=r"prediction values \[-1, 6\] are outside the 6 classes"):
        confusion_matrix(torch.tensor([0, -1, 6]), torch.tensor([0, 1, 2]), K)


def test_confusion_matrix_rejects_mismatched_shapes_and_float_inputs():
    with pytest.raises(ValueError, match=r"shape \(2, 3\) but the label map \(3, 2\)"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64), K)
    with pytest.raises(ValueError, match="integer class indices, got dtype torch.float32; take argmax"):
        confusion_matrix(torch.zeros(4), torch.zeros(4, dtype=torch.int64), K)
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        confusion_matrix(torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), 0)


# ------------------------------------------------------------------------ segmentation_metrics
def test_metrics_equal_a_class_by_class_reference_with_ignored_and_absent_classes():
    preds, labels = random_maps(1, count=4)
    cm = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(g), K) for p, g in zip(preds, labels))
    got = segmentation_metrics(cm, CLASSES)
    assert_metrics_equal(got, reference_metrics(preds, labels))
    assert got["IoU-tree"] == 0.0 and got["Acc-tree"] == 0.0  # in the ground truth, never predicted
    assert got["IoU-sky"] == 0.0 and math.isnan(got["Acc-sky"])  # predicted, never in the ground truth
    assert math.isnan(got["IoU-boat"]) and math.isnan(got["Acc-boat"])  # in neither
    assert list(got) == [*SEMSEG_SUMMARY_NAMES, *(f"IoU-{n}" for n in CLASSES), *(f"Acc-{n}" for n in CLASSES)]


def test_all_class_numbers_follow_pytorch_encoding():
    preds, labels = random_maps(2, count=3)
    cm = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(g), K) for p, g in zip(preds, labels))
    got = segmentation_metrics(cm, CLASSES)
    pix_acc, miou = encoding_reference(preds, labels)
    assert got["pixAcc"] == pytest.approx(pix_acc, rel=1e-12)
    assert got["mIoU_all"] == pytest.approx(miou, rel=1e-12)
    # The absent class counts as 0 there, so the all-class mean is the defined mean scaled by 5/6.
    assert got["mIoU_all"] == pytest.approx(got["mIoU"] * 5 / 6, rel=1e-12)


def test_metrics_of_a_matrix_without_pixels_are_nan_except_the_encoding_ones():
    got = segmentation_metrics(np.zeros((2, 2), dtype=np.int64), per_class=False)
    assert set(got) == set(SEMSEG_SUMMARY_NAMES)
    assert all(math.isnan(got[k]) for k in ("aAcc", "mIoU", "mAcc", "fwIoU"))
    assert got["mIoU_all"] == 0.0 and got["pixAcc"] == 0.0


def test_metrics_reject_bad_matrices_and_names():
    with pytest.raises(ValueError, match=r"\[K, K\] with K >= 1, got shape \(2, 3\)"):
        segmentation_metrics(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="negative entries"):
        segmentation_metrics(np.array([[1, -1], [0, 1]]))
    with pytest.raises(ValueError, match="1 class names for a 2-class"):
        segmentation_metrics(np.eye(2), ["a"])
    with pytest.raises(ValueError, match=r"repeated: \['a'\]"):
        segmentation_metrics(np.eye(2), ["a", "a"])


# ------------------------------------------------------------------------ SemSegEvaluator
def test_evaluator_equals_the_reference_over_batches():
    preds, labels = random_maps(3, count=5)
    evaluator = SemSegEvaluator(dataset=FakeDataset())
    evaluator.process(*batch(preds, labels, [0, 1, 2]))
    evaluator.process(*batch(preds, labels, [3, 4]))
    np.testing.assert_array_equal(evaluator.confusion.numpy(), reference_confusion(preds, labels))
    assert_metrics_equal(evaluator.evaluate(), reference_metrics(preds, labels))
    assert evaluator.image_ids == [0, 1, 2, 3, 4]


def test_two_ranks_with_sampler_padding_merge_to_the_single_process_numbers():
    preds, labels = random_maps(4, count=7)
    single = SemSegEvaluator(dataset=FakeDataset())
    single.process(*batch(preds, labels, range(7)))
    ranks = []
    for rank in range(2):  # 7 images on 2 ranks: the sampler repeats image 0 to give each rank 4
        ids = list(DistributedSampler(range(7), num_replicas=2, rank=rank, shuffle=False))
        evaluator = SemSegEvaluator(dataset=FakeDataset())
        evaluator.process(*batch(preds, labels, ids))
        ranks.append(evaluator)
    assert sorted(ranks[0].image_ids + ranks[1].image_ids) == [0, 0, 1, 2, 3, 4, 5, 6]
    naive = ranks[0].confusion + ranks[1].confusion
    states = [pickle.loads(pickle.dumps(r.state())) for r in ranks]  # as all_gather_object sends them
    ranks[0].merge(states)
    assert torch.equal(ranks[0].confusion, single.confusion)
    assert not torch.equal(naive, single.confusion)
    assert_metrics_equal(ranks[0].evaluate(), single.evaluate())
    assert_metrics_equal(single.evaluate(), reference_metrics(preds, labels))


def test_an_image_id_seen_again_keeps_its_first_result():
    preds, labels = random_maps(5, count=2)
    evaluator = SemSegEvaluator(dataset=FakeDataset())
    evaluator.process(*batch(preds, labels, [0]))
    evaluator.process([{"sem_seg": torch.from_numpy(labels[1]), "image_id": torch.tensor(0)}],
                      [{"sem_seg": one_hot_scores(preds[1])}])
    np.testing.assert_array_equal(evaluator.confusion.numpy(), reference_confusion(preds[:1], labels[:1]))


def test_state_is_compact_cpu_numpy_and_rebuilds_the_same_confusion():
    preds, labels = random_maps(6, count=3)
    evaluator = SemSegEvaluator(dataset=FakeDataset())
    evaluator.process(*batch(preds, labels, [2, 0, 1]))
    state = evaluator.state()
    assert state["image_ids"] == [2, 0, 1] and state["num_classes"] == K
    assert all(isinstance(state[k], np.ndarray) and state[k].dtype == np.int64 for k in ("lengths", "indices", "counts"))
    assert (state["counts"] > 0).all() and len(state["indices"]) == int(state["lengths"].sum()) < 3 * K * K
    fresh = SemSegEvaluator(dataset=FakeDataset())
    fresh.merge([state])
    assert torch.equal(fresh.confusion, evaluator.confusion)


def test_scores_of_another_size_are_resized_bilinearly_to_the_label():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(K, 5, 7, generator=generator)
    label = torch.randint(0, K, (10, 13), generator=generator)
    evaluator = SemSegEvaluator(dataset=FakeDataset())
    evaluator.process([{"sem_seg": label, "image_id": 0}], [{"sem_seg": scores}])
    resized = F.interpolate(scores[None], size=(10, 13), mode="bilinear", align_corners=False)[0]
    assert torch.equal(evaluator.confusion, confusion_matrix(resized.argmax(0), label, K))
    halves = torch.zeros(K, 4, 4)
    halves[0, :, :2] = halves[1, :, 2:] = 1.0
    label = torch.zeros(8, 8, dtype=torch.int64)
    label[:, 4:] = 1
    evaluator.reset()
    evaluator.process([{"sem_seg": label, "image_id": 0}], [{"sem_seg": halves}])
    assert evaluator.evaluate()["aAcc"] == 1.0


def test_ignore_index_comes_from_the_dataset_else_255_and_can_be_overridden():
    label = torch.tensor([[0, 1, -1, 255]])
    scores = one_hot_scores(np.array([[0, 1, 0, 1]]))
    from_dataset = SemSegEvaluator(dataset=FakeDataset(ignore_index=-1))
    with pytest.raises(ValueError, match=r"image 3: label values \[255\]"):
        from_dataset.process([{"sem_seg": label, "image_id": 3}], [{"sem_seg": scores}])
    default = SemSegEvaluator(dataset=type("NoIgnore", (), {"classes": CLASSES})())
    assert default.ignore_index == 255 and default.num_classes == K
    overridden = SemSegEvaluator(dataset=FakeDataset(), ignore_index=-1)
    overridden.process([{"sem_seg": label.clamp(max=1), "image_id": 0}], [{"sem_seg": scores}])
    assert int(overridden.confusion.sum()) == 3


def test_evaluator_builds_from_the_registry_without_per_class_numbers():
    evaluator = EVALUATORS.build({"type": "SemSegEvaluator", "per_class": False}, path="evaluation",
                                 dataset=FakeDataset())
    preds, labels = random_maps(7, count=1)
    evaluator.process(*batch(preds, labels, [0]))
    assert list(evaluator.evaluate()) == list(SEMSEG_SUMMARY_NAMES)


def test_evaluator_errors_name_the_fix():
    evaluator = SemSegEvaluator(dataset=FakeDataset())
    label = torch.zeros(4, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"image 0 must have 'sem_seg' scores Tensor\[K=6, H, W\], got \(3, 4, 4\)"):
        evaluator.process([{"sem_seg": label, "image_id": 0}], [{"sem_seg": torch.zeros(3, 4, 4)}])
    with pytest.raises(ValueError, match="has no 'image_id'"):
        evaluator.process([{"sem_seg": label}], [{"sem_seg": torch.zeros(K, 4, 4)}])
    with pytest.raises(ValueError, match="1 targets but 0 outputs"):
        evaluator.process([{"sem_seg": label, "image_id": 0}], [])
    with pytest.raises(RuntimeError, match="no processed images"):
        evaluator.evaluate()
    with pytest.raises(ValueError, match="num_classes=5 but the dataset has 6 classes"):
        SemSegEvaluator(dataset=FakeDataset(), num_classes=5)
    with pytest.raises(ValueError, match="has neither 'num_classes' nor 'classes'; set evaluation.num_classes"):
        SemSegEvaluator(dataset=object())
    with pytest.raises(ValueError, match="merged state has num_classes=3 but this evaluator 6"):
        evaluator.merge([SemSegEvaluator(dataset=object(), num_classes=3).state()])


def test_num_classes_alone_names_classes_by_index():
    evaluator = SemSegEvaluator(dataset=object(), num_classes=2)
    evaluator.process([{"sem_seg": torch.tensor([[0, 1]]), "image_id": 0}], [{"sem_seg": torch.eye(2)[:, None]}])
    metrics = evaluator.evaluate()
    assert metrics["IoU-0"] == 1.0 and metrics["Acc-1"] == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_outputs_give_the_cpu_numbers_and_a_cpu_state():
    preds, labels = random_maps(8, count=3)
    cpu = SemSegEvaluator(dataset=FakeDataset())
    cpu.process(*batch(preds, labels, range(3)))
    targets, outputs = batch(preds, labels, range(3))
    cuda = SemSegEvaluator(dataset=FakeDataset())
    cuda.process(targets, [{"sem_seg": o["sem_seg"].cuda()} for o in outputs])
    assert cuda.state()["indices"].dtype == np.int64
    cuda.merge([cpu.state()])
    assert torch.equal(cuda.confusion, cpu.confusion)


# ------------------------------------------------------------------------ table
def test_table_lists_every_class_and_the_summary_row():
    from segkit.evaluation.table import format_metrics_table

    preds, labels = random_maps(9, count=2)
    cm = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(g), K) for p, g in zip(preds, labels))
    metrics = segmentation_metrics(cm, CLASSES)
    lines = format_metrics_table(metrics).splitlines()
    assert lines[0].split() == ["class", "IoU", "Acc"]
    rows = [line.split() for line in lines[1:1 + K]]
    assert [row[0] for row in rows] == list(CLASSES)
    assert rows[1][1:] == [f"{metrics['IoU-road']:.3f}", f"{metrics['Acc-road']:.3f}"]
    assert rows[ABSENT][1:] == ["nan", "nan"]
    assert lines[K + 1] == ""
    assert lines[K + 2].split() == list(SEMSEG_SUMMARY_NAMES)
    assert lines[K + 3].split() == [f"{metrics[name]:.3f}" for name in SEMSEG_SUMMARY_NAMES]
    assert "IoU-road" not in "\n".join(lines)