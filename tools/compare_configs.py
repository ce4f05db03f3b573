"""Side-by-side training-step timing of two or more configs on the same batches of their training data.

The models are built in one process (same seed) and their training steps (forward, backward,
optimizer step with the config's optimizer) are timed alternately on the
same fixed batches, so background load affects all alike. Reports the median, min and max per
config and the median ratio of each to the first; with ``--profile`` also prints the operators that take the most
time in one step of each.

With ``--synthetic HxW`` the batches are random images of that size with random boxes (and
filled-box masks; for semantic segmentors, label maps of random rectangles), so configs whose data
is not on this machine (COCO, VOC) can be compared;
``--set KEY=VALUE`` overrides both configs (e.g. ``model.backbone.pretrained=null``).

Usage:
    .venv/bin/python tools/compare_configs.py configs/quickstart_mask.yaml configs/quickstart_panet.yaml
        [--iters 10] [--warmup 2] [--batches 4] [--threads 2] [--profile] [--out FILE]
    .venv/bin/python tools/compare_configs.py configs/mask_rcnn_r50_fpn_coco.yaml configs/panet_r50_fpn_coco.yaml
        --synthetic 320x480 --batch-size 2 --set model.backbone.pretrained=null
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import segkit
from segkit.data.class_weights import without_median_frequency
from segkit.data.collate import collate
from segkit.engine.optim import build_optimizer
from segkit.registry import DATASETS


def build(config: str, seed: int, overrides: list[str]) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    cfg = without_median_frequency(segkit.load_config(config, overrides))  # the weights do not change the timings
    torch.manual_seed(seed)
    model = segkit.build_model(cfg).train()
    opt_cfg = cfg.get("optimizer", {})
    optimizer = build_optimizer(model, opt_cfg)
    return model, optimizer, cfg


def batches(cfg: dict, count: int, batch_size: int) -> list:
    dataset = DATASETS.build(cfg["data"]["train"], path="data.train")
    return [collate([dataset[i * batch_size + j] for j in range(batch_size)]) for i in range(count)]


def synthetic_label_batches(size: str, count: int, batch_size: int, num_classes: int, seed: int) -> list:
    """Random images with label maps of rectangles of random classes (semantic segmentors)."""
    height, width = (int(v) for v in size.lower().split("x"))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        images, targets = [], []
        for _ in range(batch_size):
            images.append(torch.rand(3, height, width, generator=gen))
            labels = torch.zeros(height, width, dtype=torch.int64)
            for _ in range(6):
                y, x = int(torch.randint(0, height - 16, (1,), generator=gen)), int(torch.randint(0, width - 16, (1,), generator=gen))
                h, w = int(torch.randint(16, height // 2, (1,), generator=gen)), int(torch.randint(16, width // 2, (1,), generator=gen))
                labels[y:y + h, x:x + w] = int(torch.randint(1, num_classes, (1,), generator=gen))
            targets.append({"sem_seg": labels})
        out.append((images, targets))
    return out


def synthetic_batches(size: str, count: int, batch_size: int, num_classes: int, seed: int) -> list:
    height, width = (int(v) for v in size.lower().split("x"))
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.arange(height)[:, None], torch.arange(width)[None, :]
    out = []
    for _ in range(count):
        images, targets = [], []
        for _ in range(batch_size):
            images.append(torch.rand(3, height, width, generator=gen))
            xy = torch.rand(6, 2, generator=gen) * torch.tensor([width * 0.7, height * 0.7])
            boxes = torch.cat([xy, xy + torch.rand(6, 2, generator=gen) * torch.tensor([width * 0.3, height * 0.3]) + 16], 1)
            masks = ((xs >= boxes[:, 0, None, None]) & (xs < boxes[:, 2, None, None])
                     & (ys >= boxes[:, 1, None, None]) & (ys < boxes[:, 3, None, None])).to(torch.uint8)
            targets.append({"boxes": boxes, "labels": torch.randint(1, num_classes + 1, (6,), generator=gen), "masks": masks})
        out.append((images, targets))
    return out


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch) -> float:
    images, targets = batch
    start = time.perf_counter()
    losses = model(images, targets)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", metavar="CONFIG", help="two or more configs; ratios are to the first")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's data.batch_size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", default=None, metavar="HxW", help="random images of this size instead of the data")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override in both configs")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if len(args.configs) < 2:
        parser.error("give at least two configs to compare")
    runs = {}
    for index, config in enumerate(args.configs):
        name = "ab"[index] if index < 2 else f"c{index}"
        model, optimizer, cfg = build(config, args.seed, args.set)
        batch_size = args.batch_size or cfg["data"].get("batch_size", 2)
        if args.synthetic and "decode_head" in cfg["model"]:
            num_classes = cfg["model"]["decode_head"]["num_classes"]
            data = synthetic_label_batches(args.synthetic, args.batches, batch_size, num_classes, args.seed)
        elif args.synthetic:
            num_classes = cfg["model"]["roi_head"]["num_classes"]
            data = synthetic_batches(args.synthetic, args.batches, batch_size, num_classes, args.seed)
        else:
            data = batches(cfg, args.batches, batch_size)
        runs[name] = {"config": config, "model": model, "optimizer": optimizer, "batches": data, "times": []}
    for it in range(args.warmup + args.iters):
        for run in runs.values():
            elapsed = step(run["model"], run["optimizer"], run["batches"][it % args.batches])
            if it >= args.warmup:
                run["times"].append(elapsed)

    result = {"threads": args.threads, "torch": torch.__version__, "python": platform.python_version()}
    print(f"{'config':<45} {'median s':>9} {'min s':>8} {'max s':>8} {'params M':>9}")
    for name, run in runs.items():
        times = run["times"]
        params = sum(p.numel() for p in run["model"].parameters()) / 1e6
        result[name] = {"config": run["config"], "train_step_s": statistics.median(times),
                        "min_s": min(times), "max_s": max(times), "params_m": params}
        print(f"{run['config']:<45} {statistics.median(times):9.3f} {min(times):8.3f} {max(times):8.3f} {params:9.2f}")
    result["ratio_train_step"] = result["b"]["train_step_s"] / result["a"]["train_step_s"]
    for name in list(runs)[1:]:
        ratio = result[name]["train_step_s"] / result["a"]["train_step_s"]
        result[f"ratio_train_step_{name}"] = ratio
        print(f"ratio {result[name]['config']} / {args.configs[0]} (median step time): {ratio:.3f}")

    if args.profile:
        for run in runs.values():
            with torch.autograd.profiler.profile() as prof:
                step(run["model"], run["optimizer"], run["batches"][0])
            print(f"\n{run['config']}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
