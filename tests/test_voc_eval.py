"""VOC AP against hand-computed cases, for the 11-point (VOC2007) and the area (VOC2010+) definitions."""

from __future__ import annotations

import numpy as np
import pytest

from segkit.evaluation.voc import evaluate_voc, voc_ap

A = [0.0, 0.0, 10.0, 10.0]        # ground-truth boxes
B = [20.0, 20.0, 30.0, 30.0]
C = [40.0, 40.0, 50.0, 50.0]
NEAR_A = [0.0, 0.0, 10.0, 9.0]    # IoU 0.9 with A
FAR = [60.0, 60.0, 70.0, 70.0]    # overlaps nothing


def gt(*objects: tuple[list[float], int, bool]) -> dict:
    return {"boxes": [o[0] for o in objects], "labels": [o[1] for o in objects], "difficult": [o[2] for o in objects]}


def dets(*items: tuple[list[float], float, int]) -> dict:
    return {"boxes": [d[0] for d in items], "scores": [d[1] for d in items], "labels": [d[2] for d in items]}


def ap(ground_truth: dict, detections: dict, method: str, classes: tuple[str, ...] = ("cat",), **kw) -> dict:
    return evaluate_voc(ground_truth, detections, classes, method=method, **kw)


def test_voc_ap_of_curves():
    # recall 0.5 at precision 1, recall 1 at precision 0.5
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 0.5]), method="area") == pytest.approx(0.75)
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 0.5]), method="11points") == pytest.approx((6 * 1 + 5 * 0.5) / 11)
    # the envelope: a later, higher precision lifts the earlier recall levels
    assert voc_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 0.667]), method="area") == pytest.approx(0.8335)
    # recall never reaching a level contributes 0 there
    assert voc_ap(np.array([0.25]), np.array([1.0]), method="11points") == pytest.approx(3 / 11)
    assert voc_ap(np.array([0.25]), np.array([1.0]), method="area") == pytest.approx(0.25)
    assert voc_ap(np.array([]), np.array([]), method="area") == 0.0
    with pytest.raises(ValueError, match="method"):
        voc_ap(np.array([1.0]), np.array([1.0]), method="coco")


@pytest.mark.parametrize("method, expected", [("area", 0.5 * 1 + 0.5 * (2 / 3)), ("11points", (6 + 5 * (2 / 3)) / 11)])
def test_duplicate_detection_of_one_object_is_a_false_positive(method, expected):
    # A found at 0.9, found again at 0.8 (duplicate), B found at 0.7:
    # tp 1 0 1, fp 0 1 0 -> recall .5 .5 1, precision 1 .5 .667
    g = {"img": gt((A, 1, False), (B, 1, False))}
    d = {"img": dets((A, 0.9, 1), (NEAR_A, 0.8, 1), (B, 0.7, 1))}
    m = ap(g, d, method)
    assert m["voc/AP-cat"] == pytest.approx(expected)
    assert m["voc/mAP"] == pytest.approx(expected)


@pytest.mark.parametrize("method", ["area", "11points"])
def test_class_with_only_difficult_objects_has_no_ap_and_is_left_out_of_the_mean(method):
    g = {"img": gt((A, 1, False), (B, 2, True))}
    # detecting the difficult object is neither right nor wrong; the dog class has nothing to find
    d = {"img": dets((A, 0.9, 1), (B, 0.8, 2))}
    m = ap(g, d, method, classes=("cat", "dog"))
    assert m["voc/AP-dog"] == -1.0
    assert m["voc/AP-cat"] == pytest.approx(1.0)
    assert m["voc/mAP"] == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["area", "11points"])
def test_detection_on_a_difficult_object_is_ignored(method):
    # ranked: difficult hit (ignored), then the true positive: precision stays 1
    g = {"img": gt((A, 1, False), (B, 1, True))}
    d = {"img": dets((B, 0.9, 1), (A, 0.8, 1))}
    assert ap(g, d, method)["voc/AP-cat"] == pytest.approx(1.0)
    # counted as an object, the difficult box would halve recall until found: check the flag matters
    g_plain = {"img": gt((A, 1, False), (B, 1, False))}
    assert ap(g_plain, {"img": dets((A, 0.8, 1))}, method)["voc/AP-cat"] < 1.0


@pytest.mark.parametrize("method", ["area", "11points"])
def test_no_detections_gives_zero(method):
    g = {"img": gt((A, 1, False), (B, 2, False))}
    m = ap(g, {"img": dets((A, 0.9, 1))}, method, classes=("cat", "dog"))
    assert m["voc/AP-dog"] == 0.0
    assert m["voc/mAP"] == pytest.approx(0.5)
    assert ap(g, {}, method, classes=("cat", "dog"))["voc/mAP"] == 0.0


@pytest.mark.parametrize("method", ["area", "11points"])
def test_equal_scores_keep_the_order_given(method):
    # one object; a false and a true detection with the same score: ranked in the order given
    g = {"img": gt((A, 1, False),)}
    fp_first = {"img": dets((FAR, 0.5, 1), (A, 0.5, 1))}      # precision 0 then .5 at recall 1
    tp_first = {"img": dets((A, 0.5, 1), (FAR, 0.5, 1))}
    assert ap(g, fp_first, method)["voc/AP-cat"] == pytest.approx(0.5)
    assert ap(g, tp_first, method)["voc/AP-cat"] == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["area", "11points"])
def test_detections_on_an_image_without_ground_truth_are_false_positives(method):
    g = {"img1": gt((A, 1, False),), "img2": gt()}
    d = {"img2": dets((A, 0.9, 1)), "img1": dets((A, 0.8, 1))}
    assert ap(g, d, method)["voc/AP-cat"] == pytest.approx(0.5)


def test_iou_must_exceed_the_threshold():
    g = {"img": gt((A, 1, False),)}
    half = [0.0, 0.0, 10.0, 5.0]  # IoU exactly 0.5
    assert ap(g, {"img": dets((half, 0.9, 1))}, "area")["voc/AP-cat"] == 0.0
    assert ap(g, {"img": dets((half, 0.9, 1))}, "area", iou_thrs=[0.49])["voc/AP-cat"] == 1.0


def test_several_thresholds_are_reported_and_averaged():
    g = {"img": gt((A, 1, False),)}
    d = {"img": dets(([0.0, 0.0, 10.0, 7.0], 0.9, 1))}  # IoU 0.7
    m = ap(g, d, "area", iou_thrs=[0.5, 0.75])
    assert m["voc/mAP50"] == 1.0 and m["voc/mAP75"] == 0.0
    assert m["voc/mAP"] == pytest.approx(0.5)


def test_plus_one_on_voc_indices_equals_continuous_boxes():
    # VOC's inclusive pixel indices with the +1 convention == the same boxes shifted to
    # continuous coordinates without it: the two ways of reading the same devkit rule.
    rng = np.random.default_rng(0)
    ground_truth, det_voc, det_cont, gt_cont = {}, {}, {}, {}
    for i in range(20):
        xy = rng.integers(1, 80, size=(4, 2))
        wh = rng.integers(0, 30, size=(4, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(float)  # xmin ymin xmax ymax, inclusive
        labels = rng.integers(1, 3, size=4)
        jitter = boxes + rng.integers(-3, 4, size=boxes.shape)
        jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2])
        scores = rng.random(4)
        ground_truth[i] = {"boxes": boxes, "labels": labels}
        det_voc[i] = {"boxes": jitter, "scores": scores, "labels": labels}
        shift = np.array([1.0, 1.0, 0.0, 0.0])
        gt_cont[i] = {"boxes": boxes - shift, "labels": labels}
        det_cont[i] = {"boxes": jitter - shift, "scores": scores, "labels": labels}
    for method in ("area", "11points"):
        a = evaluate_voc(ground_truth, det_voc, ["a", "b"], method=method, plus_one=True)
        b = evaluate_voc(gt_cont, det_cont, ["a", "b"], method=method, plus_one=False)
        assert a == pytest.approx(b, abs=1e-12)
        assert 0.0 < a["voc/mAP"] < 1.0
        c = evaluate_voc(ground_truth, det_voc, ["a", "b"], method=method, plus_one=False)
        assert c != a  # the convention changes IoUs of small boxes


def test_bad_input_is_named():
    g = {"img": gt((A, 1, False),)}
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_voc(g, {"other": dets((A, 0.9, 1))}, ["cat"])
    with pytest.raises(ValueError, match="label 2, but labels must be 1..1"):
        evaluate_voc(g, {"img": dets((A, 0.9, 2))}, ["cat"])
