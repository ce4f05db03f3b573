"""What deformable convolutions cost: a ResNet's forward pass with and without DCNv2 in chosen stages.

Both backbones (``ResNet(depth=...)`` and the same with ``dcn_stages``, randomly initialised, eval
mode) run on one random batch in inference mode, alternately, after one warm-up pass each, so
background load affects both alike. Prints the median, min and max per backbone and the ratio
deformable / plain of the medians.

Usage:
    .venv/bin/python tools/bench_dcn.py [--depth 50] [--dcn-stages 0,1,1,1] [--image-size 320x480]
        [--batch-size 1] [--iters 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from segkit_plugins.backbones.resnet import ResNet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--dcn-stages", default="0,1,1,1", help="one 0/1 per stage c2..c5 (default: c3..c5)")
    parser.add_argument("--image-size", default="320x480", help="HxW of the input")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    stages = tuple(s.strip() == "1" for s in args.dcn_stages.split(","))
    height, width = (int(v) for v in args.image_size.lower().split("x"))
    nets = {"plain": ResNet(depth=args.depth).eval(), "dcn": ResNet(depth=args.depth, dcn_stages=stages).eval()}
    x = torch.rand(args.batch_size, 3, height, width)
    times: dict[str, list[float]] = {name: [] for name in nets}
    with torch.inference_mode():
        for net in nets.values():
            net(x)
        for _ in range(args.iters):
            for name, net in nets.items():
                start = time.perf_counter()
                net(x)
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:6s} {medians[name]:.3f} [{min(values):.3f}-{max(values):.3f}] s")
    print(f"ratio dcn / plain: {medians['dcn'] / medians['plain']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
