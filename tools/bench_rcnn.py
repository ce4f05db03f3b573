"""Side-by-side timing of segkit's Faster / Mask R-CNN R50-FPN and torchvision's, with the same weights.

A shortcut for ``segkit bench CONFIG model.backbone.pretrained=null --compare torchvision --skip data,eval``
on configs/faster_rcnn_r50_fpn_coco.yaml or configs/mask_rcnn_r50_fpn_coco.yaml (see docs/benchmarks.md):
both models are built in one process, torchvision's randomly initialised weights converted into
segkit's model, and timed alternately (inference first, while the weights are identical, then
training steps with the config's optimizer), so background load affects both alike. Prints the
median, min and max per model and the segkit / torchvision ratios.

Usage:
    .venv/bin/python tools/bench_rcnn.py [--model faster|mask] [--image-size 320x480] [--batch-size 2]
        [--iters 5] [--warmup 1] [--threads 2] [--out bench.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segkit.cli import main as segkit_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODELS = {"faster": "faster_rcnn_r50_fpn_coco.yaml", "mask": "mask_rcnn_r50_fpn_coco.yaml"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="faster")
    parser.add_argument("--image-size", default="320x480", help="HxW of the input images")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args(argv)
    command = ["bench", str(CONFIGS / MODELS[args.model]), "model.backbone.pretrained=null", "--compare", "torchvision",
               "--image-size", args.image_size, "--batch-size", str(args.batch_size), "--iters", str(args.iters),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--skip", "data,eval"]
    return segkit_main(command + (["--out", args.out] if args.out else []))


if __name__ == "__main__":
    sys.exit(main())
