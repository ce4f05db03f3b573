"""`segkit bench`: timing a config's model, data and evaluation (and torchvision's, side by side)."""

from __future__ import annotations

import argparse
from typing import Any

from segkit.commands.common import add_config_arguments, add_device_argument

__all__ = ["add_parsers"]


def add_parsers(sub: Any) -> None:
    """Add the parsers of ``segkit bench`` to ``sub`` (the ``segkit`` parser's sub-parsers)."""
    p = sub.add_parser("bench", help="time training, inference, data loading and evaluation of a config",
                       description="Measure the model of CONFIG after warm-up over several iterations (median, min, "
                                   "max): inference latency at batch 1, throughput at --batch-size, a training step "
                                   "(forward, backward, the config's optimizer), peak memory, images/s through the "
                                   "train DataLoader and the evaluator's time on validation batches. With --compare "
                                   "torchvision the equivalent torchvision model (Faster / Mask R-CNN, RetinaNet and "
                                   "FCOS R50-FPN, SSD300 VGG-16, FCN R50-D8; same weights) is timed alternately in the same process and the "
                                   "segkit/torchvision ratios are printed. See docs/benchmarks.md.")
    add_config_arguments(p)
    p.add_argument("--iters", type=int, default=10, metavar="N", help="timed iterations per phase (default 10)")
    p.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed iterations first (default 2)")
    p.add_argument("--batch-size", type=int, metavar="N", help="training and throughput batch (default data.batch_size)")
    p.add_argument("--image-size", metavar="HxW", help="synthetic images of this size, which the network sees "
                   "unresized (default: the config's data, synthetic 512x512 where it cannot be read)")
    add_device_argument(p)
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's setting)")
    p.add_argument("--compare", choices=("torchvision",), help="also time the equivalent torchvision model")
    p.add_argument("--skip", metavar="PHASES", help="comma-separated phases to leave out: infer, throughput, train, "
                   "data, eval")
    p.add_argument("--out", metavar="FILE", help="write the results as JSON")
    p.set_defaults(handler=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from segkit.bench import BenchOptions, format_report, parse_image_size, parse_skip, run_bench
    from segkit.config import load_config
    from segkit.fileio import atomic_write_json

    options = BenchOptions(iters=args.iters, warmup=args.warmup, batch_size=args.batch_size,
                           image_size=parse_image_size(args.image_size) if args.image_size else None,
                           device=args.device, threads=args.threads, compare=args.compare, skip=parse_skip(args.skip))
    from segkit.engine.config_check import check_run_config

    cfg = load_config(args.config, args.overrides)
    check_run_config(cfg, trainer=False)  # the device is --device's, not the trainer's
    report = run_bench(cfg, options)
    print(format_report(report))
    if args.out:
        atomic_write_json(args.out, report)
        print(f"results written to {args.out}")
    return 0
