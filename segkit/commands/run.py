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
    # imported once the config has been read: a config's error comes without the training stack's import time
    from segkit.engine.runner import evaluate
    from segkit.evaluation.table import format_metrics_table
    from segkit.fileio import atomic_write_json

    metrics = evaluate(cfg, ckpt, split=args.split)
    if not is_rank_zero():
        return 0
    print(f"\nMetrics of {ckpt} ({args.split}):\n{format_metrics_table(metrics)}")
    if args.out:
        atomic_write_json(args.out, metrics)
        print(f"metrics written to {args.out}")
    return 0
