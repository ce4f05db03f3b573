"""`segkit train` and `segkit eval`."""

from __future__ import annotations

import argparse
import os
from typing import Any

from segkit.commands.common import CHECKPOINT_SUFFIXES, add_config_arguments, add_config_or_ckpt, is_rank_zero, require_file
from segkit.errors import UserError

__all__ = ["add_parsers"]


def add_parsers(sub: Any) -> None:
    """Add the parsers of ``segkit train`` and ``eval`` to ``sub`` (the ``segkit`` parser's sub-parsers)."""
    p = sub.add_parser("train", help="train a model from a config",
                       description="Train the model of CONFIG; key=value pairs override config entries.")
    add_config_arguments(p)
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint ('auto': work_dir/checkpoints/last.ckpt)")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint",
                       description="Evaluate a checkpoint. Either `segkit eval CKPT` (the checkpoint carries its config) "
                                   "or `segkit eval CONFIG CKPT`.")
    add_config_or_ckpt(p)
    p.add_argument("rest", nargs="*", metavar="[CKPT] [key=value]", help="checkpoint (after a config) and overrides")
    p.add_argument("--split", choices=("val", "test"), default="val", help="the data split to evaluate (default val)")
    p.add_argument("--out", metavar="FILE", help="write the metrics as JSON")
    p.add_argument("--results", metavar="PATH",
                   help="write the predictions: detectors a COCO results JSON FILE (the dataset's image and category "
                        "ids, bbox [x, y, w, h], score, and RLE segmentation when masks are evaluated), semantic "
                        "segmentors a folder of label maps <image file stem>.png in the dataset's label values. "
                        "`segkit score --config CKPT --pred PATH` scores them to the printed numbers")
    p.add_argument("--show", metavar="DIR", help="draw the --show-count worst and best images by their own score "
                   "(detection: F1 at IoU 0.5 of the detections scoring >= 0.3; semantic: the image's mIoU), ground "
                   "truth left, prediction right, as DIR/{worst,best}_<rank>_<score>_<image>.png")
    p.add_argument("--show-count", type=int, default=8, metavar="N",
                   help="how many worst and how many best images --show draws (default 8)")
    p.set_defaults(handler=_cmd_eval)


def _cmd_train(args: argparse.Namespace) -> int:
    from segkit.config import load_config

    cfg = load_config(args.config, args.overrides)
    from segkit.engine.runner import resolve_work_dir, train  # after the config: its errors come sooner

    resume = args.resume
    if resume == "auto":
        last = os.path.join(resolve_work_dir(cfg), "checkpoints", "last.ckpt")
        resume = last if os.path.isfile(last) else None
        if resume is None and is_rank_zero():
            print(f"--resume auto: no checkpoint at {last} yet, starting a new run", flush=True)
    elif resume is not None:
        require_file(resume, "checkpoint")
    metrics = train(cfg, resume=resume)
    if metrics and is_rank_zero():
        from segkit.evaluation.table import format_metrics_table

        print(f"\nFinal metrics ({resolve_work_dir(cfg)}):\n{format_metrics_table(metrics)}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from segkit.api import config_from_checkpoint
    from segkit.config import load_config

    first, rest = args.config_or_ckpt, list(args.rest)
    if first.endswith(CHECKPOINT_SUFFIXES):
        ckpt, overrides = first, rest
        cfg = config_from_checkpoint(ckpt, overrides)
    else:
        if not rest or "=" in rest[0]:
            raise UserError(f"`segkit eval {first}` needs a checkpoint after the config: segkit eval CONFIG CKPT")
        ckpt, overrides = rest[0], rest[1:]
        require_file(ckpt, "checkpoint")
        cfg = load_config(first, overrides)
    keep = args.results is not None or args.show is not None
    if keep:
        _check_eval_outputs(args, cfg)
    # imported once the config has been read: a config's error comes without the training stack's import time
    from segkit.engine.runner import evaluate_keeping_predictions
    from segkit.evaluation.table import format_metrics_table
    from segkit.fileio import atomic_write_json

    metrics, evaluator = evaluate_keeping_predictions(cfg, ckpt, split=args.split, keep_predictions=keep)
    if not is_rank_zero():
        return 0
    print(f"\nMetrics of {ckpt} ({args.split}):\n{format_metrics_table(metrics)}")
    if args.out:
        atomic_write_json(args.out, metrics)
        print(f"metrics written to {args.out}")
    if args.results is not None:
        what = evaluator.write_results(args.results)
        config = first if not first.endswith(CHECKPOINT_SUFFIXES) else ckpt
        again = " ".join([f"segkit score --config {config}", *([f"--override {' '.join(overrides)}"] if overrides else []),
                          *(["--split test"] if args.split == "test" else []), f"--pred {args.results}"])
        print(f"results written to {args.results}: {what}; `{again}` scores them to these numbers")
    if args.show is not None:
        from segkit.engine.datamodule import build_datamodule
        from segkit.evaluation.review import show_extremes

        datamodule = build_datamodule(cfg)
        split = args.split if args.split == "test" and datamodule.split_cfgs.get("test") else "val"
        paths = show_extremes(evaluator, datamodule.build_dataset(split), args.show, count=args.show_count)
        print(f"{len(paths)} picture(s) of the worst and best images (ground truth | prediction) in {args.show}")
    return 0


def _check_eval_outputs(args: argparse.Namespace, cfg: Any) -> None:
    """Refuse --results / --show that cannot be written before the evaluation runs, not after."""
    from segkit.evaluation.score_config import evaluator_type
    from segkit.fileio import make_folder
    from segkit.registry import EVALUATORS

    if args.show is not None:
        if args.show_count < 1:
            raise UserError(f"--show-count must be at least 1, got {args.show_count}.")
        make_folder(args.show, what="the --show folder")
    kind = evaluator_type(cfg)
    layout = getattr(EVALUATORS.get(kind, key="evaluation.type"), "results_layout", None)
    if args.show is not None and layout is None:
        raise UserError(f"--show: the {kind} of this config cannot draw its predictions; CocoEvaluator and "
                        f"SemSegEvaluator can.")
    if args.results is None:
        return
    if layout is None:
        raise UserError(f"--results: the {kind} of this config has no results format; CocoEvaluator (a COCO results "
                        f"JSON) and SemSegEvaluator (a folder of label maps) write one.")
    if layout == "folder":
        if os.path.exists(args.results) and not os.path.isdir(args.results):
            raise UserError(f"--results '{args.results}' is a file, but a semantic segmentor writes a folder of label "
                            f"maps there; give the path of a folder.")
        make_folder(args.results, what="the --results folder")
        return
    if os.path.isdir(args.results):
        raise UserError(f"--results '{args.results}' is a folder, but {kind} writes one COCO results JSON file; give "
                        f"a file name such as {os.path.join(args.results, 'results.json')}.")
    _check_writable_file(args.results)


def _check_writable_file(path: str) -> None:
    """A file can be created at ``path`` (its folder is made if needed); else a FileWriteError naming it."""
    import tempfile

    from segkit.fileio import FileWriteError, make_folder, why_not_writable

    folder = os.path.dirname(os.path.abspath(path))
    make_folder(folder, what=f"the folder of --results '{path}'")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".segkit-probe-"):
            pass
    except OSError as exc:
        reason, fix = why_not_writable(exc, folder)
        raise FileWriteError(f"cannot write --results '{path}': {reason}. To fix it, {fix}.", path=path,
                             errno=exc.errno) from exc
