"""CocoEvaluator gives pycocotools' own numbers for the results it builds from model outputs, with
either backend (pycocotools or faster-coco-eval)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segkit.evaluation.coco import (
    COCO_METRIC_NAMES,
    CocoEvaluator,
    encode_masks,
    evaluate_coco_results,
    format_metrics_table,
    resolve_backend,
)
from segkit.evaluation.distributed import all_gather_objects, broadcast_object, evaluate_distributed

FIXTURES = Path(__file__).parent / "fixtures" / "coco_eval"
GT_FILE = FIXTURES / "instances.json"
DETECTIONS_FILE = FIXTURES / "detections.json"


class FixtureDataset:
    """The parts of a COCO dataset the evaluator reads (category ids 3, 7, 12 → labels 1, 2, 3)."""

    def __init__(self, coco: COCO) -> None:
        self.coco = coco
        cat_ids = sorted(coco.getCatIds())
        self.label_to_cat_id = {label: cat_id for label, cat_id in enumerate(cat_ids, start=1)}
        self.cat_id_to_label = {cat_id: label for label, cat_id in self.label_to_cat_id.items()}
        self.classes = [coco.cats[c]["name"] for c in cat_ids]


def quiet_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


@pytest.fixture(scope="module")
def dataset() -> FixtureDataset:
    return FixtureDataset(quiet_coco(GT_FILE))


@pytest.fixture(scope="module")
def detections() -> list[dict]:
    return json.loads(DETECTIONS_FILE.read_text())


def reference_eval(coco: COCO, results: list[dict], iou_type: str, image_ids: list[int] | None = None) -> COCOeval:
    """pycocotools run directly, as its README shows."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco, coco.loadRes([dict(r) for r in results]), iouType=iou_type)
        if image_ids is not None:
            coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def batch_for(dataset: FixtureDataset, detections: list[dict], image_ids: list[int], *,
              scale: tuple[float, float] = (1.0, 1.0)) -> tuple[list[dict], list[dict]]:
    """Targets and model outputs (xyxy float32, labels 1..K) for ``image_ids``.

    ``scale`` = (sy, sx) resizes the image the model saw; boxes are given in its pixels.
    """
    targets, outputs = [], []
    for image_id in image_ids:
        info = dataset.coco.imgs[image_id]
        dets = [d for d in detections if d["image_id"] == image_id]
        xywh = torch.tensor([d["bbox"] for d in dets], dtype=torch.float64).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        boxes[:, 0::2] *= scale[1]
        boxes[:, 1::2] *= scale[0]
        target = {"image_id": torch.tensor(image_id), "orig_size": torch.tensor([info["height"], info["width"]])}
        if scale != (1.0, 1.0):
            target["image_size"] = torch.tensor([round(info["height"] * scale[0]), round(info["width"] * scale[1])])
        targets.append(target)
        outputs.append({
            "boxes": boxes.float(),
            "scores": torch.tensor([d["score"] for d in dets], dtype=torch.float32),
            "labels": torch.tensor([dataset.cat_id_to_label[d["category_id"]] for d in dets], dtype=torch.int64),
        })
    return targets, outputs


def run_evaluator(evaluator: CocoEvaluator, dataset: FixtureDataset, detections: list[dict],
                  image_ids: list[int], batch_size: int = 2, **kwargs) -> None:
    for start in range(0, len(image_ids), batch_size):
        evaluator.process(*batch_for(dataset, detections, image_ids[start:start + batch_size], **kwargs))


def stats_of(metrics: dict[str, float], iou_type: str) -> list[float]:
    return [metrics[f"{iou_type}/{name}"] for name in COCO_METRIC_NAMES]


def all_ids(dataset: FixtureDataset) -> list[int]:
    return sorted(dataset.coco.getImgIds())


# ------------------------------------------------------------------------ bbox
def test_bbox_metrics_equal_cocoeval_on_the_same_results(dataset, detections):
    evaluator = CocoEvaluator(dataset=dataset)
    run_evaluator(evaluator, dataset, detections, all_ids(dataset))
    metrics = evaluator.evaluate()
    reference = reference_eval(dataset.coco, detections, "bbox")
    assert list(metrics) == [f"bbox/{name}" for name in COCO_METRIC_NAMES]
    np.testing.assert_allclose(stats_of(metrics, "bbox"), reference.stats, rtol=0, atol=1e-12)
    assert evaluator.results("bbox") == detections


def test_fixture_scores_small_medium_and_large_objects_differently(dataset, detections):
    stats = reference_eval(dataset.coco, detections, "bbox").stats
    aps, apm, apl = stats[3:6]
    assert len({aps, apm, apl}) == 3 and min(aps, apm, apl) > 0


def test_noncontiguous_category_ids_map_from_labels(dataset):
    evaluator = CocoEvaluator(dataset=dataset)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    evaluator.process([{"image_id": 11, "orig_size": torch.tensor([200, 240])}],
                      [{"boxes": boxes, "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([1, 2, 3])}])
    assert [r["category_id"] for r in evaluator.results("bbox")] == [3, 7, 12]


def test_boxes_are_rescaled_from_image_size_to_orig_size(dataset, detections):
    plain, resized = CocoEvaluator(dataset=dataset), CocoEvaluator(dataset=dataset)
    run_evaluator(plain, dataset, detections, all_ids(dataset))
    run_evaluator(resized, dataset, detections, all_ids(dataset), scale=(2.0, 0.5))
    assert resized.results("bbox") == detections
    assert resized.evaluate() == plain.evaluate()


def test_only_processed_images_are_scored_and_empty_ones_count(dataset, detections):
    evaluator = CocoEvaluator(dataset=dataset)
    run_evaluator(evaluator, dataset, [d for d in detections if d["image_id"] != 14], [11, 12, 14])
    reference = reference_eval(dataset.coco, [d for d in detections if d["image_id"] in (11, 12)], "bbox", [11, 12, 14])
    np.testing.assert_allclose(stats_of(evaluator.evaluate(), "bbox"), reference.stats, rtol=0, atol=1e-12)
    without_14 = reference_eval(dataset.coco, [d for d in detections if d["image_id"] in (11, 12)], "bbox", [11, 12])
    assert without_14.stats[0] != reference.stats[0]


def test_merge_drops_distributed_sampler_duplicates(dataset, detections):
    single = CocoEvaluator(dataset=dataset)
    run_evaluator(single, dataset, detections, all_ids(dataset))
    ids = all_ids(dataset)
    padded = ids + ids[:1]  # DistributedSampler pads 5 images to 6 for 2 processes
    ranks = [CocoEvaluator(dataset=dataset) for _ in range(2)]
    for rank, evaluator in enumerate(ranks):
        run_evaluator(evaluator, dataset, detections, padded[rank::2])
    states = [pickle.loads(pickle.dumps(evaluator.state())) for evaluator in ranks]
    ranks[0].merge(states)
    assert ranks[0].image_ids == ids
    assert ranks[0].results("bbox") == single.results("bbox")
    assert ranks[0].evaluate() == single.evaluate()


def test_zero_detections_score_zero_where_ground_truth_exists(dataset):
    evaluator = CocoEvaluator(dataset=dataset, iou_types=("bbox", "segm"))
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 1, 200, 240)}
    targets = [{"image_id": i, "orig_size": torch.tensor([200, 240])} for i in all_ids(dataset)]
    evaluator.process(targets, [empty] * len(targets))
    metrics = evaluator.evaluate()
    assert len(metrics) == 24 and all(value == 0.0 for value in metrics.values())


def test_zero_detections_on_images_without_ground_truth_give_cocoeval_minus_one(dataset):
    evaluator = CocoEvaluator(dataset=dataset)
    evaluator.process([{"image_id": 13, "orig_size": torch.tensor([160, 200])}],
                      [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}])
    assert all(value == -1.0 for value in evaluator.evaluate().values())


def test_per_class_ap_averages_cocoeval_precision_of_each_category(dataset, detections):
    evaluator = CocoEvaluator(dataset=dataset, per_class=True)
    run_evaluator(evaluator, dataset, detections, all_ids(dataset))
    metrics = evaluator.evaluate()
    reference = reference_eval(dataset.coco, detections, "bbox")
    precision = reference.eval["precision"]
    for k, cat_id in enumerate(reference.params.catIds):
        expected = precision[:, :, k, 0, 2]
        expected = expected[expected > -1].mean()
        assert metrics[f"bbox/AP-{dataset.coco.cats[cat_id]['name']}"] == pytest.approx(expected, abs=1e-12)
    per_class = [metrics[f"bbox/AP-{name}"] for name in dataset.classes]
    assert np.mean(per_class) == pytest.approx(metrics["bbox/AP"], abs=1e-12)
    assert len({round(v, 9) for v in per_class}) == 3


def test_per_class_ap_is_nan_for_a_class_without_ground_truth(dataset, detections):
    evaluator = CocoEvaluator(dataset=dataset, per_class=True)
    run_evaluator(evaluator, dataset, detections, [14])  # image 14 has squares and triangles only
    metrics = evaluator.evaluate()
    assert math.isnan(metrics["bbox/AP-circle"])
    assert not math.isnan(metrics["bbox/AP-square"]) and not math.isnan(metrics["bbox/AP-triangle"])


# ------------------------------------------------------------------------ segm
def synthetic_masks(dataset: FixtureDataset, detections: list[dict], image_id: int, seed: int) -> torch.Tensor:
    """float32 [N, 1, H, W] probabilities: a noisy ellipse inside each detection's box."""
    info = dataset.coco.imgs[image_id]
    height, width = info["height"], info["width"]
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    rng = np.random.default_rng(seed)
    masks = []
    for d in (d for d in detections if d["image_id"] == image_id):
        x, y, w, h = d["bbox"]
        inside = ((xs - x - w / 2) / (w / 2)) ** 2 + ((ys - y - h / 2) / (h / 2)) ** 2 <= 1
        masks.append(np.where(inside, 0.75, 0.25) + rng.uniform(-0.3, 0.3, size=(height, width)))
    return torch.tensor(np.array(masks, dtype=np.float32).reshape(-1, 1, height, width))


def test_segm_metrics_equal_cocoeval_on_rle_results(dataset, detections):
    evaluator = CocoEvaluator(dataset=dataset, iou_types=("bbox", "segm"))
    segm_results = []
    for image_id in all_ids(dataset):
        targets, outputs = batch_for(dataset, detections, [image_id])
        masks = synthetic_masks(dataset, detections, image_id, seed=image_id)
        outputs[0]["masks"] = masks
        evaluator.process(targets, outputs)
        dets = [d for d in detections if d["image_id"] == image_id]
        for d, mask in zip(dets, masks[:, 0].numpy() >= 0.5):
            rle = mask_utils.encode(np.asfortranarray(mask[:, :, None].astype(np.uint8)))[0]
            segm_results.append({"image_id": image_id, "category_id": d["category_id"],
                                 "segmentation": rle, "score": d["score"]})
    metrics = evaluator.evaluate()
    np.testing.assert_allclose(stats_of(metrics, "segm"), reference_eval(dataset.coco, segm_results, "segm").stats,
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats_of(metrics, "bbox"), reference_eval(dataset.coco, detections, "bbox").stats,
                               rtol=0, atol=1e-12)
    assert stats_of(metrics, "segm") != stats_of(metrics, "bbox")


def test_labels_of_categories_absent_from_the_ground_truth_are_dropped(dataset, detections):
    """A model whose label space is wider than the ground truth's categories (torchvision's COCO
    models predict 90 ids, 10 of them unused) is scored on the categories that exist."""

    class WideLabelSpace(FixtureDataset):
        def __init__(self, coco):
            super().__init__(coco)
            self.label_to_cat_id = {**self.label_to_cat_id, 4: 99}  # label 4: a category not in the file
            self.classes = [*self.classes, "N/A"]

    wide = WideLabelSpace(dataset.coco)
    evaluator = CocoEvaluator(dataset=wide, iou_types=("bbox", "segm"), per_class=True)
    for image_id in all_ids(dataset):
        targets, outputs = batch_for(dataset, detections, [image_id])
        outputs[0]["masks"] = synthetic_masks(dataset, detections, image_id, seed=image_id)
        extra = {k: v[:1] for k, v in outputs[0].items()}  # a copy of the first detection...
        extra["labels"] = torch.tensor([4])  # ...under the unknown category, at the top score
        extra["scores"] = torch.tensor([1.0])
        outputs[0] = {k: torch.cat([v, extra[k]]) for k, v in outputs[0].items()}
        evaluator.process(targets, outputs)
    metrics = evaluator.evaluate()
    assert all(r["category_id"] != 99 for r in evaluator.results("bbox") + evaluator.results("segm"))
    np.testing.assert_allclose(stats_of(metrics, "bbox"), reference_eval(dataset.coco, detections, "bbox").stats,
                               rtol=0, atol=1e-12)
    assert "bbox/AP-N/A" not in metrics


def test_mask_threshold_decides_the_binary_masks(dataset, detections):
    image_id = all_ids(dataset)[0]
    areas = []
    for threshold in (0.3, 0.7):
        evaluator = CocoEvaluator(dataset=dataset, iou_types=("segm",), mask_threshold=threshold)
        targets, outputs = batch_for(dataset, detections, [image_id])
        outputs[0]["masks"] = synthetic_masks(dataset, detections, image_id, seed=image_id)
        evaluator.process(targets, outputs)
        expected = (outputs[0]["masks"][:, 0] >= threshold).flatten(1).sum(1).tolist()
        rles = [r["segmentation"] for r in evaluator.results("segm")]
        areas.append([int(mask_utils.area(rle)) for rle in rles])
        assert areas[-1] == expected
    assert sum(areas[0]) > sum(areas[1])
    with pytest.raises(ValueError, match="mask_threshold"):
        CocoEvaluator(dataset=dataset, mask_threshold=1.5)


def test_encode_masks_equals_encoding_each_instance():
    masks = torch.rand(4, 37, 53) > 0.6
    rles = encode_masks(masks)
    for mask, rle in zip(masks.numpy(), rles):
        expected = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert rle == {"size": [37, 53], "counts": expected["counts"].decode("ascii")}
        np.testing.assert_array_equal(mask_utils.decode(rle), mask)
    assert encode_masks(torch.zeros(0, 5, 5, dtype=torch.bool)) == []
    json.dumps(rles)


@pytest.mark.parametrize("with_image_size", [True, False], ids=["image_size", "size_of_masks"])
def test_masks_and_boxes_are_resized_to_orig_size(dataset, with_image_size):
    evaluator = CocoEvaluator(dataset=dataset, iou_types=("bbox", "segm"))
    masks = torch.zeros(1, 1, 100, 120)
    masks[0, 0, 10:30, 20:60] = 1.0
    target = {"image_id": 11, "orig_size": torch.tensor([200, 240])}
    if with_image_size:
        target["image_size"] = torch.tensor([100, 120])
    evaluator.process([target],
                      [{"boxes": torch.tensor([[20.0, 10.0, 60.0, 30.0]]), "scores": torch.tensor([0.9]),
                        "labels": torch.tensor([1]), "masks": masks}])
    (result,) = evaluator.results("segm")
    decoded = mask_utils.decode(result["segmentation"])
    expected = np.zeros((200, 240), dtype=np.uint8)
    expected[20:60, 40:120] = 1
    assert decoded.shape == (200, 240)
    assert np.logical_and(decoded, expected).sum() / np.logical_or(decoded, expected).sum() > 0.95
    assert evaluator.results("bbox")[0]["bbox"] == [40.0, 20.0, 80.0, 40.0]


# ------------------------------------------------------------------------ errors and output
def test_segm_without_output_masks_says_how_to_fix(dataset, detections):
    evaluator = CocoEvaluator(dataset=dataset, iou_types=["segm"])
    with pytest.raises(ValueError, match="iou_types"):
        evaluator.process(*batch_for(dataset, detections, [11]))


def test_background_label_is_rejected_with_the_class_count(dataset):
    evaluator = CocoEvaluator(dataset=dataset)
    with pytest.raises(ValueError, match=r"1\.\.3"):
        evaluator.process([{"image_id": 11, "orig_size": torch.tensor([200, 240])}],
                          [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([0])}])


def test_unknown_image_id_is_rejected(dataset):
    with pytest.raises(ValueError, match="not an image of the evaluator's ground truth"):
        CocoEvaluator(dataset=dataset).process([{"image_id": 99, "orig_size": torch.tensor([1, 1])}], [{}])


def test_evaluator_builds_from_the_registry(dataset):
    from segkit.registry import EVALUATORS

    evaluator = EVALUATORS.build({"type": "CocoEvaluator", "per_class": True}, path="evaluation", dataset=dataset)
    assert isinstance(evaluator, CocoEvaluator) and evaluator.iou_types == ("bbox",)


def test_metrics_table_names_every_metric(dataset, detections):
    evaluator = CocoEvaluator(dataset=dataset, per_class=True)
    run_evaluator(evaluator, dataset, detections, all_ids(dataset))
    table = format_metrics_table({**evaluator.evaluate(), "mIoU": 0.5})
    header = table.splitlines()[0].split()
    assert header == list(COCO_METRIC_NAMES)
    assert table.splitlines()[1].startswith("bbox")
    assert all(name in table for name in dataset.classes) and "mIoU" in table


# ------------------------------------------------------------------------ processes
def test_gather_and_broadcast_without_process_group_act_locally():
    assert all_gather_objects({"a": 1}) == [{"a": 1}]
    assert broadcast_object([1, 2]) == [1, 2]


def test_evaluate_distributed_in_a_one_process_group(dataset, detections, tmp_path):
    evaluator = CocoEvaluator(dataset=dataset)
    run_evaluator(evaluator, dataset, detections, all_ids(dataset))
    expected = evaluator.evaluate()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        assert all_gather_objects({"a": 1}) == [{"a": 1}]
        assert broadcast_object("metrics") == "metrics"
        assert evaluate_distributed(evaluator) == expected
    finally:
        dist.destroy_process_group()


def test_evaluate_distributed_raises_the_evaluation_error(dataset):
    with pytest.raises(RuntimeError, match="no processed images"):
        evaluate_distributed(CocoEvaluator(dataset=dataset))


def _evaluate_on_rank(rank: int, init_file: str, image_ids: list[int], out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        dataset = FixtureDataset(quiet_coco(GT_FILE))
        evaluator = CocoEvaluator(dataset=dataset)
        run_evaluator(evaluator, dataset, json.loads(DETECTIONS_FILE.read_text()), image_ids[rank::2])
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(evaluate_distributed(evaluator)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_evaluation_equals_single_process(dataset, detections, tmp_path):
    ids = all_ids(dataset)
    padded = ids + ids[:1]
    mp.spawn(_evaluate_on_rank, args=(str(tmp_path / "init"), padded, str(tmp_path)), nprocs=2, join=True)
    single = CocoEvaluator(dataset=dataset)
    run_evaluator(single, dataset, detections, ids)
    expected = single.evaluate()
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


# ------------------------------------------------------------------------ backends
BACKEND_NAMES = ["pycocotools", pytest.param("faster_coco_eval", marks=pytest.mark.skipif(
    importlib.util.find_spec("faster_coco_eval") is None, reason="faster-coco-eval is not installed"))]


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("subset", [False, True], ids=["all_images", "some_images"])
def test_every_backend_gives_pycocotools_numbers_and_per_class_ap(dataset, detections, backend, subset):
    image_ids = all_ids(dataset)[::2] if subset else all_ids(dataset)
    evaluator = CocoEvaluator(dataset=dataset, iou_types=("bbox", "segm"), per_class=True, backend=backend)
    assert evaluator.backend == backend
    segm_results = []
    for image_id in image_ids:
        targets, outputs = batch_for(dataset, detections, [image_id])
        outputs[0]["masks"] = masks = synthetic_masks(dataset, detections, image_id, seed=image_id)
        evaluator.process(targets, outputs)
        for d, rle in zip((d for d in detections if d["image_id"] == image_id), encode_masks(masks[:, 0] >= 0.5)):
            segm_results.append({"image_id": image_id, "category_id": d["category_id"], "segmentation": rle,
                                 "score": d["score"]})
    metrics = evaluator.evaluate()
    bbox_results = [d for d in detections if d["image_id"] in image_ids]
    for iou_type, results in (("bbox", bbox_results), ("segm", segm_results)):
        reference = reference_eval(dataset.coco, results, iou_type, image_ids)
        np.testing.assert_allclose(stats_of(metrics, iou_type), reference.stats, rtol=0, atol=1e-9)
        for k, cat_id in enumerate(reference.params.catIds):
            expected = reference.eval["precision"][:, :, k, 0, 2]
            expected = expected[expected > -1]
            name = dataset.coco.cats[cat_id]["name"]
            if expected.size:
                assert metrics[f"{iou_type}/AP-{name}"] == pytest.approx(expected.mean(), abs=1e-9)
            else:
                assert math.isnan(metrics[f"{iou_type}/AP-{name}"])


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_every_backend_scores_zero_detections_like_pycocotools(dataset, backend):
    ids = all_ids(dataset)
    metrics = evaluate_coco_results(dataset.coco, [], iou_type="bbox", image_ids=ids, backend=backend)
    reference = evaluate_coco_results(dataset.coco, [], iou_type="bbox", image_ids=ids, backend="pycocotools")
    assert metrics == reference
    assert metrics["bbox/AP"] == 0.0


def test_auto_backend_prefers_faster_coco_eval_and_falls_back_to_pycocotools(monkeypatch):
    installed = importlib.util.find_spec("faster_coco_eval") is not None
    assert resolve_backend("auto") == ("faster_coco_eval" if installed else "pycocotools")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "faster_coco_eval" else real_find_spec(name, *a))
    assert resolve_backend("auto") == "pycocotools"
    with pytest.warns(UserWarning, match=r"'faster_coco_eval' is not installed.*pip install 'segkit-cv\[fast-eval\]'"):
        assert resolve_backend("faster_coco_eval") == "pycocotools"


def test_unknown_backend_names_the_choices(dataset):
    with pytest.raises(ValueError, match=r"evaluation.backend must be one of 'auto', 'pycocotools', "
                                         r"'faster_coco_eval', got 'fast'"):
        CocoEvaluator(dataset=dataset, backend="fast")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_mask_areas_counted_at_encoding_equal_the_rle_areas_and_change_no_number(dataset, detections, backend):
    evaluator = CocoEvaluator(dataset=dataset, iou_types=("segm",), backend=backend)
    for image_id in all_ids(dataset):
        targets, outputs = batch_for(dataset, detections, [image_id])
        outputs[0]["masks"] = synthetic_masks(dataset, detections, image_id, seed=image_id)
        evaluator.process(targets, outputs)
    results, areas = evaluator.results("segm"), evaluator.mask_areas()
    assert areas == [float(mask_utils.area(r["segmentation"])) for r in results]
    assert sum(areas) > 0
    given = evaluate_coco_results(dataset.coco, results, iou_type="segm", backend=backend, mask_areas=areas)
    assert given == evaluate_coco_results(dataset.coco, results, iou_type="segm", backend=backend)
    with pytest.raises(ValueError, match=r"mask_areas has 1 values for \d+ results"):
        evaluate_coco_results(dataset.coco, results, iou_type="segm", backend=backend, mask_areas=[1.0])
