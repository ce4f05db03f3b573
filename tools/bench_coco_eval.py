"""COCO evaluation time of the two backends side by side, on synthetic results, with equal numbers.

Builds a ground truth of ``--images`` images of ``--size`` pixels (0-7 objects each, ``--categories``
categories, 5% crowd, box-shaped RLE masks) and ``--dets`` scored detections per image (80% of the
objects found, with boxes off by up to 10%; the rest false detections), then scores
them with :func:`segkit.evaluation.coco.evaluate_coco_results` under each backend (pycocotools and
faster-coco-eval; results loading, matching, accumulation and summary all timed, best of
``--repeats``), checks that the 12 numbers agree and prints the time ratio. Mask results come with
their pixel counts, as :class:`segkit.evaluation.CocoEvaluator` hands them over (it counts them in
the processes that encode the masks).

Usage:
    .venv/bin/python tools/bench_coco_eval.py [--images 500] [--dets 100] [--categories 80] [--size 480x640]
        [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segkit.evaluation.coco import COCO_METRIC_NAMES, evaluate_coco_results, resolve_backend


def synthetic(num_images: int, dets_per_image: int, seed: int, size: tuple[int, int] = (96, 96),
              categories: int = 5) -> tuple[COCO, list[dict], list[float]]:
    """A ground truth, results over it (boxes with box-shaped RLE masks, random scores) and the
    results' mask areas."""
    rng = np.random.default_rng(seed)
    height, width = size

    def box_and_rle(box: list[float] | None = None) -> tuple[list[float], dict, float]:
        if box is None:
            x, y = rng.uniform(0, width * 0.6), rng.uniform(0, height * 0.6)
            w, h = rng.uniform(4, width * 0.4), rng.uniform(4, height * 0.4)
        else:  # a detection of this object: its box moved and resized by up to 10%
            x, y, w, h = np.asarray(box) + rng.uniform(-0.1, 0.1, 4) * np.asarray(box)[[2, 3, 2, 3]]
        mask = np.zeros((height, width, 1), dtype=np.uint8, order="F")
        mask[max(int(y), 0):int(y + h), max(int(x), 0):int(x + w)] = 1
        rle = mask_utils.encode(mask)[0]
        rle["counts"] = rle["counts"].decode("ascii")
        return [float(x), float(y), float(w), float(h)], rle, float(mask.sum())

    images, annotations, results, areas = [], [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id:06d}.png"})
        found = []
        for _ in range(int(rng.integers(0, 8))):
            bbox, rle, area = box_and_rle()
            category = int(rng.integers(1, categories + 1))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": bbox, "segmentation": rle, "area": area, "iscrowd": int(rng.random() < 0.05)})
            if rng.random() < 0.8:  # 80% of the objects are found, the rest of the detections are false
                found.append((bbox, category))
        for k in range(dets_per_image):
            bbox, rle, area = box_and_rle(found[k][0] if k < len(found) else None)
            category = found[k][1] if k < len(found) else int(rng.integers(1, categories + 1))
            results.append({"image_id": image_id, "category_id": category, "bbox": bbox, "segmentation": rle,
                            "score": float(rng.random())})
            areas.append(area)
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": k, "name": f"class{k}"} for k in range(1, categories + 1)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt, results, areas


def _size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    return int(height), int(width or height)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--dets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--categories", type=int, default=80, help="number of categories (COCO has 80)")
    parser.add_argument("--size", type=_size, default=(480, 640), help="image size HxW (default 480x640)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if resolve_backend("auto") != "faster_coco_eval":
        parser.error("faster-coco-eval is not installed: pip install 'segkit-cv[fast-eval]'")
    gt, results, areas = synthetic(args.images, args.dets, args.seed, size=args.size, categories=args.categories)
    report: dict = {"images": args.images, "detections_per_image": args.dets, "categories": args.categories,
                    "image_size": list(args.size)}
    print(f"{args.images} images of {args.size[0]}x{args.size[1]}, {args.categories} categories, "
          f"{args.dets} detections each")
    print(f"{'iou type':<9}{'pycocotools s':>15}{'faster-coco-eval s':>20}{'speed-up':>10}{'max |diff|':>12}")
    for iou_type in ("bbox", "segm"):
        # as CocoEvaluator.results(iou_type) gives them: boxes or masks, not both
        typed = [{k: v for k, v in r.items() if k != ("segmentation" if iou_type == "bbox" else "bbox")}
                 for r in results]
        seconds, stats = {}, {}
        for backend in ("pycocotools", "faster_coco_eval"):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                metrics = evaluate_coco_results(gt, typed, iou_type=iou_type, backend=backend,
                                                mask_areas=areas if iou_type == "segm" else None)
                times.append(time.perf_counter() - start)
            seconds[backend] = min(times)
            stats[backend] = np.array([metrics[f"{iou_type}/{name}"] for name in COCO_METRIC_NAMES])
        diff = float(np.abs(stats["pycocotools"] - stats["faster_coco_eval"]).max())
        ratio = seconds["pycocotools"] / seconds["faster_coco_eval"]
        print(f"{iou_type:<9}{seconds['pycocotools']:>15.2f}{seconds['faster_coco_eval']:>20.2f}{ratio:>9.1f}x{diff:>12.1e}")
        report[iou_type] = {"pycocotools_s": seconds["pycocotools"], "faster_coco_eval_s": seconds["faster_coco_eval"],
                            "speedup": ratio, "max_abs_diff": diff}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
