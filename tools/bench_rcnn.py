"""Side-by-side timing of segkit's Faster / Mask R-CNN R50-FPN and torchvision's, with the same weights.

Both models are built in one process with identical settings (torchvision's random initialisation,
converted into segkit's model by ``segkit.models.convert_detectors``), then timed alternately,
so background load affects both alike. Reports the median, min and max per model and the
segkit / torchvision ratios.

Usage:
    .venv/bin/python tools/bench_rcnn.py [--model faster|mask] [--image-size 320x480] [--batch-size 2]
        [--iters 5] [--warmup 1] [--threads 2] [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

import segkit
from segkit.models.convert_detectors import convert_torchvision_detector

MODELS = {
    "faster": ("Faster R-CNN R50-FPN", "fasterrcnn_resnet50_fpn", "configs/faster_rcnn_r50_fpn_coco.yaml"),
    "mask": ("Mask R-CNN R50-FPN", "maskrcnn_resnet50_fpn", "configs/mask_rcnn_r50_fpn_coco.yaml"),
}


def build_models(kind: str, height: int, width: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    _, tv_name, config = MODELS[kind]
    size_kwargs = {"min_size": min(height, width), "max_size": max(height, width)}
    torch.manual_seed(0)
    # Built as torchvision builds its pretrained detectors (FrozenBatchNorm2d in the backbone, the
    # first stage and the stem frozen), which is what a user runs; weights=None alone would give
    # plain BatchNorm2d layers.
    backbone = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(backbone, trainable_layers=3)
    detector = {"fasterrcnn_resnet50_fpn": FasterRCNN, "maskrcnn_resnet50_fpn": MaskRCNN}[tv_name]
    reference = detector(backbone, num_classes=91, **size_kwargs)
    cfg = segkit.load_config(config, [
        "model.backbone.pretrained=null", "model.roi_head.num_classes=90",
        f"model.min_size={size_kwargs['min_size']}", f"model.max_size={size_kwargs['max_size']}",
    ])
    ours = segkit.build_model(cfg)
    ours.load_state_dict(convert_torchvision_detector(reference.state_dict())[0], strict=True)
    return ours, reference


def make_batch(batch_size: int, height: int, width: int, masks: bool) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, height, width, generator=gen) for _ in range(batch_size)]
    targets = []
    for _ in range(batch_size):
        xy = torch.rand(6, 2, generator=gen) * torch.tensor([width * 0.7, height * 0.7])
        wh = torch.rand(6, 2, generator=gen) * torch.tensor([width * 0.3, height * 0.3]) + 16
        target = {"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 91, (6,), generator=gen)}
        if masks:  # the boxes, filled
            ys, xs = torch.arange(height)[:, None], torch.arange(width)[None, :]
            b = target["boxes"]
            target["masks"] = ((xs >= b[:, 0, None, None]) & (xs < b[:, 2, None, None])
                               & (ys >= b[:, 1, None, None]) & (ys < b[:, 3, None, None])).to(torch.uint8)
        targets.append(target)
    return images, targets


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images, targets) -> None:
    model.train()
    losses = model(images, targets)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()


@torch.no_grad()
def infer(model: torch.nn.Module, images) -> None:
    model.eval()
    model(images)


def time_alternating(fns: dict[str, Callable[[], None]], iters: int, warmup: int) -> dict[str, list[float]]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="faster")
    parser.add_argument("--image-size", default="320x480", help="HxW of the input images")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.image_size.lower().split("x"))
    title = MODELS[args.model][0]
    ours, reference = build_models(args.model, height, width)
    images, targets = make_batch(args.batch_size, height, width, masks=args.model == "mask")
    opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-4, momentum=0.9)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=1e-4, momentum=0.9)
    # Inference first, while both models hold the same weights (training steps move them apart, and
    # the mask head's cost depends on how many detections pass the score threshold).
    inference = time_alternating({"segkit": lambda: infer(ours, images[:1]), "reference": lambda: infer(reference, images[:1])},
                                 args.iters, args.warmup)
    train = time_alternating({"segkit": lambda: train_step(ours, opt_ours, images, targets),
                              "reference": lambda: train_step(reference, opt_ref, images, targets)},
                             args.iters, args.warmup)
    result: dict[str, object] = {
        "model": title, "image_size": [height, width], "batch_size": args.batch_size,
        "threads": args.threads, "iters": args.iters, "torch": torch.__version__,
        "torchvision": torchvision.__version__, "cpu": platform.processor() or platform.machine(),
    }
    print(f"{title}, {height}x{width}, train batch {args.batch_size}, inference batch 1, "
          f"{args.threads} threads, {args.iters} iterations (median / min / max seconds)")
    for name in ("segkit", "reference"):
        t, i = train[name], inference[name]
        result[name] = {"train_step_s": statistics.median(t), "infer_s": statistics.median(i),
                        "train_step_all_s": t, "infer_all_s": i}
        print(f"  {name:<10} train step {statistics.median(t):6.3f} / {min(t):6.3f} / {max(t):6.3f}   "
              f"inference {statistics.median(i):6.3f} / {min(i):6.3f} / {max(i):6.3f}")
    result["ratio_train_step"] = statistics.median(train["segkit"]) / statistics.median(train["reference"])
    result["ratio_infer"] = statistics.median(inference["segkit"]) / statistics.median(inference["reference"])
    print(f"  ratio segkit/torchvision: train step {result['ratio_train_step']:.3f}, "
          f"inference {result['ratio_infer']:.3f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
