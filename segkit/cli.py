"""The ``segkit`` command.

    segkit train CONFIG [key=value ...] [--resume CKPT]
    segkit eval CONFIG_OR_CKPT [CKPT] [key=value ...] [--split val|test] [--out FILE]
    segkit list [KIND]
    segkit config CONFIG [key=value ...]
    segkit convert --from timm|torchvision IN OUT

User errors (a bad config, a missing file, a checkpoint that does not fit) print one paragraph and
exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import textwrap
from collections.abc import Sequence

from segkit.errors import ConfigError, UserError

__all__ = ["main", "build_parser"]

_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segkit", description="Detection and segmentation with plugins.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train a model from a config",
                       description="Train the model of CONFIG; key=value pairs override config entries.")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.max_epochs=2")
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint ('auto': work_dir/checkpoints/last.ckpt)")

    p = sub.add_parser("eval", help="evaluate a checkpoint",
                       description="Evaluate a checkpoint. Either `segkit eval CKPT` (the checkpoint carries its config) "
                                   "or `segkit eval CONFIG CKPT`.")
    p.add_argument("config_or_ckpt", metavar="CONFIG_OR_CKPT")
    p.add_argument("rest", nargs="*", metavar="[CKPT] [key=value]", help="checkpoint (after a config) and overrides")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--out", metavar="FILE", help="write the metrics as JSON")

    p = sub.add_parser("list", help="list registered components",
                       description="List every registered component, where it comes from and its signature.")
    p.add_argument("kind", nargs="?", help="backbones, necks, heads, models, datasets, transforms or evaluators")
    p.add_argument("--all", action="store_true", help="also list every albumentations transform")

    p = sub.add_parser("config", help="print the merged config",
                       description="Print CONFIG after _base_ merging, overrides and interpolation.")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")

    p = sub.add_parser("convert", help="convert torchvision / timm weights to a segkit checkpoint",
                       description="Rename a torchvision or timm state dict for segkit. A ResNet-family backbone "
                                   "(resnet*, resnext*, seresnet*, seresnext*, legacy_senet154) is written with its "
                                   "architecture, {'state_dict': ..., 'segkit_backbone': {...}}, for use as "
                                   "model.backbone.pretrained. A torchvision Faster / Mask R-CNN ResNet-FPN detector "
                                   "(fasterrcnn_resnet50_fpn[_v2], maskrcnn_resnet50_fpn[_v2]; --from torchvision) "
                                   "is written with a complete config and its class names, {'state_dict', "
                                   "'segkit_config', 'segkit_classes'}, so `segkit eval OUT` and "
                                   "segkit.load_model(OUT) need nothing else.")
    p.add_argument("--from", dest="source", choices=("timm", "torchvision"), required=True,
                   help="the library whose key names IN uses")
    p.add_argument("input", metavar="IN", help="state dict file (raw, or under 'state_dict' / 'model')")
    p.add_argument("output", metavar="OUT", help="segkit checkpoint to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = {"train": _cmd_train, "eval": _cmd_eval, "list": _cmd_list, "config": _cmd_config,
               "convert": _cmd_convert}[args.command]
    try:
        return handler(args) or 0
    except (UserError, FileNotFoundError) as exc:
        if args.debug:
            raise
        _fail(str(exc))
    except KeyboardInterrupt:
        print("segkit: interrupted", file=sys.stderr)
        return 130
    return 0


def _fail(message: str) -> None:
    text = textwrap.fill(f"segkit: error: {message}", width=100, subsequent_indent="  ",
                         break_long_words=False, break_on_hyphens=False)
    print(text + "\n(run with --debug to see the traceback)", file=sys.stderr)
    sys.exit(2)


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' does not exist.")


def _cmd_train(args: argparse.Namespace) -> int:
    from segkit.config import load_config
    from segkit.engine.runner import resolve_work_dir, train

    cfg = load_config(args.config, args.overrides)
    resume = args.resume
    if resume == "auto":
        last = os.path.join(resolve_work_dir(cfg), "checkpoints", "last.ckpt")
        resume = last if os.path.isfile(last) else None
    elif resume is not None:
        _require_file(resume, "checkpoint")
    metrics = train(cfg, resume=resume)
    if metrics and _is_rank_zero():
        from segkit.evaluation.table import format_metrics_table

        print(f"\nFinal metrics ({resolve_work_dir(cfg)}):\n{format_metrics_table(metrics)}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from segkit.api import config_from_checkpoint
    from segkit.config import apply_overrides, load_config
    from segkit.engine.runner import evaluate
    from segkit.evaluation.table import format_metrics_table
    from segkit.fileio import atomic_write_json

    first, rest = args.config_or_ckpt, list(args.rest)
    if first.endswith(_CHECKPOINT_SUFFIXES):
        ckpt, overrides = first, rest
        cfg = config_from_checkpoint(ckpt)
        apply_overrides(cfg, overrides)
    else:
        if not rest or "=" in rest[0]:
            raise UserError(f"`segkit eval {first}` needs a checkpoint after the config: segkit eval CONFIG CKPT")
        ckpt, overrides = rest[0], rest[1:]
        _require_file(ckpt, "checkpoint")
        cfg = load_config(first, overrides)
    metrics = evaluate(cfg, ckpt, split=args.split)
    if not _is_rank_zero():
        return 0
    print(f"\nMetrics of {ckpt} ({args.split}):\n{format_metrics_table(metrics)}")
    if args.out:
        atomic_write_json(args.out, metrics)
        print(f"metrics written to {args.out}")
    return 0


def _is_rank_zero() -> bool:
    """Whether this process reports results (the first of a distributed run, or the only one)."""
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _cmd_list(args: argparse.Namespace) -> int:
    from segkit.registry import all_registries, plugin_errors

    registries = all_registries()
    kinds = list(registries)
    if args.kind:
        kind = args.kind if args.kind in registries else args.kind + "s"
        if kind not in registries:
            from segkit.errors import did_you_mean

            raise ConfigError(f"unknown component kind '{args.kind}'." + (did_you_mean(args.kind, kinds)
                                                                         or f" Kinds: {', '.join(kinds)}."))
        kinds = [kind]
    for kind in kinds:
        reg = registries[kind]
        print(f"{kind}:")
        for entry in reg.entries():
            source = entry.module + (f" (plugin {entry.plugin})" if entry.plugin else "")
            print(f"  {entry.name:<22} {_signature(entry.obj)}\n  {'':<22} from {source}")
        if kind == "transforms":
            extra = [n for n in reg.names(include_fallback=True) if n not in reg.names()]
            if args.all:
                for name in extra:
                    print(f"  {name:<22} (albumentations)")
            else:
                print(f"  ... and {len(extra)} albumentations transforms by class name (segkit list transforms --all)")
    errors = plugin_errors()
    if errors:
        print("plugins that failed to import:")
        for err in errors:
            print(f"  {err.source} ({err.module}): {err.error}")
    return 0


def _signature(obj: object) -> str:
    try:
        sig = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"
    params = [p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
              for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    text = "(" + ", ".join(params) + ")"
    return text if len(text) <= 160 else text[:157] + "...)"


def _cmd_config(args: argparse.Namespace) -> int:
    from segkit.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides, import_plugins=False)
    print(dump_config(cfg), end="")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from segkit.checkpoint import extract_state_dict, load_state_dict_checked, read_checkpoint
    from segkit.fileio import atomic_open
    from segkit.models.convert import BACKBONE_INFO_KEY, convert_timm_resnet, infer_resnet_arch
    from segkit.models.convert_detectors import is_torchvision_detector
    from segkit.registry import BACKBONES

    state = extract_state_dict(read_checkpoint(args.input))
    if args.source == "torchvision" and is_torchvision_detector(state):
        return _convert_detector(args, state)
    if args.source == "timm":
        state = convert_timm_resnet(state)
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "last_linear."))}
    arch = infer_resnet_arch(state)
    # Building the backbone proves that every key is used and every shape fits.
    model = BACKBONES.build({"type": "ResNet", **arch}, path="segkit convert")
    load_state_dict_checked(model, state, source=f"'{args.input}' ({args.source} format)", strict=True)
    with atomic_open(args.output, "wb") as f:
        torch.save({"state_dict": state, BACKBONE_INFO_KEY: {"type": "ResNet", **arch, "source": args.source}}, f)
    options = ", ".join(f"{k}: {v}" for k, v in arch.items())
    print(f"wrote {args.output}: ResNet backbone ({options}), {len(state)} tensors")
    return 0


def _convert_detector(args: argparse.Namespace, state: dict) -> int:
    """Write a torchvision Faster / Mask R-CNN as a self-contained segkit checkpoint."""
    import torch

    from segkit.api import build_model
    from segkit.checkpoint import CLASSES_KEY, CONFIG_KEY, load_state_dict_checked
    from segkit.fileio import atomic_open
    from segkit.models.convert_detectors import (convert_torchvision_detector, describe_detector_config,
                                                  detector_class_names)

    state, cfg = convert_torchvision_detector(state)
    # Building the model from the stored config proves that `segkit eval OUT` will load every tensor.
    model = build_model(cfg)
    load_state_dict_checked(model, state, source=f"'{args.input}' (torchvision detector)", strict=True)
    classes = detector_class_names(cfg["model"]["roi_head"]["num_classes"])
    with atomic_open(args.output, "wb") as f:
        torch.save({"state_dict": state, CONFIG_KEY: cfg, CLASSES_KEY: classes}, f)
    print(f"wrote {args.output}: {describe_detector_config(cfg)}, {len(state)} tensors; evaluate with "
          f"`segkit eval {args.output}` (COCO from $SEGKIT_COCO, default data/coco)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
