"""`segkit score`: metrics of existing predictions, without a model."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from segkit.errors import UserError

__all__ = ["add_parsers"]


def add_parsers(sub: Any) -> None:
    """Add the parsers of ``segkit score`` to ``sub`` (the ``segkit`` parser's sub-parsers)."""
    p = sub.add_parser("score", help="score existing predictions (COCO, VOC, label maps) without a model",
                       description="Score predictions against ground truth and print the metrics under the names "
                                   "training uses. bbox/segm: --gt a COCO instances JSON, --pred a COCO results JSON "
                                   "(every ground-truth image is scored, as pycocotools does). voc: --gt a VOC year "
                                   "folder, --split its image list, --pred a folder of per-class files "
                                   "comp4_det_<split>_<class>.txt or a COCO results JSON. semseg: --gt and --pred "
                                   "folders of label maps (PNG, pixel = class index) matched by file stem. "
                                   "--config CONFIG_OR_CKPT instead of --gt takes the ground truth and the settings "
                                   "from a config's data split, as `segkit eval` does, so that the predictions of "
                                   "`segkit eval CKPT --results PATH` score to the numbers it printed: "
                                   "`segkit score --config CKPT --pred PATH`.")
    p.add_argument("--task", choices=("bbox", "segm", "voc", "semseg"),
                   help="COCO boxes or masks, VOC detection AP, or semantic segmentation (required without --config; "
                        "with it, default: what the config evaluates, e.g. bbox and segm)")
    p.add_argument("--gt", metavar="PATH", help="ground truth: COCO JSON, VOC year folder or label folder "
                   "(or --config)")
    p.add_argument("--config", metavar="CONFIG_OR_CKPT", help="take the ground truth of the config's data split "
                   "(--split, default val) and the evaluation settings (evaluator, iou types, per_class, backend, "
                   "classes, ignore index, label mapping) from a config file or the config a checkpoint carries")
    p.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="with --config: config overrides, the same as given to segkit eval")
    p.add_argument("--pred", required=True, metavar="PATH", help="predictions: results JSON, detection-file folder "
                   "or label folder")
    p.add_argument("--out", metavar="FILE", help="write the metrics as JSON")
    p.add_argument("--per-class", action="store_true", help="bbox/segm: also print the AP of every category")
    p.add_argument("--backend", default=None, choices=("auto", "pycocotools", "faster_coco_eval"),
                   help="bbox/segm: COCO evaluation backend (default pycocotools, whose numbers are the reference, or "
                        "with --config the config's evaluation.backend; faster_coco_eval agrees to about 1e-15 and is "
                        "several times faster)")
    p.add_argument("--split", default=None, help="voc: the image list ImageSets/Main/<split>.txt (default test); "
                   "with --config: the data split, val or test (default val)")
    p.add_argument("--method", choices=("area", "11points"), default=None,
                   help="voc: AP definition (default: 11points for a VOC2007 folder, area otherwise)")
    p.add_argument("--iou-thr", type=float, nargs="+", default=[0.5], metavar="T", help="voc: IoU threshold(s) (0.5)")
    p.add_argument("--plus-one", action="store_true", help="voc: the +1 pixel convention on the boxes as given "
                   "(see docs/evaluation.md; the default already equals the devkit on VOC files)")
    p.add_argument("--classes", metavar="FILE|a,b,c", help="voc/semseg: class names (voc default: the 20 VOC classes)")
    p.add_argument("--num-classes", type=int, metavar="N", help="semseg: number of classes (required; at most "
                   "4096, the confusion matrix has N*N cells)")
    p.add_argument("--ignore-index", type=int, default=255, metavar="V", help="semseg: ignored label value (255)")
    p.add_argument("--reduce-zero-label", action="store_true", help="semseg: raw 0 is ignored, raw v is class v-1")
    p.set_defaults(handler=_cmd_score)


def _cmd_score(args: argparse.Namespace) -> int:
    from segkit.evaluation import score
    from segkit.evaluation.table import format_metrics_table
    from segkit.fileio import atomic_write_json

    if args.config is not None:
        metrics = _score_with_config(args)
        print(format_metrics_table(metrics))
        if args.out:
            atomic_write_json(args.out, metrics)
            print(f"metrics written to {args.out}")
        return 0
    if args.gt is None or args.task is None:
        raise UserError("segkit score needs --task and --gt (the ground truth), or --config CONFIG_OR_CKPT to take "
                        "them from a config's data split.")
    if args.override:
        raise UserError("--override changes the config given with --config; there is none.")
    classes = score.read_class_names(args.classes)
    if args.task in ("bbox", "segm"):
        metrics = score.score_coco(args.gt, args.pred, iou_type=args.task, per_class=args.per_class,
                                   backend=args.backend or "pycocotools")
    elif args.task == "voc":
        split = args.split or "test"
        method = args.method or score.guess_voc_method(args.gt)
        metrics, missing = score.score_voc(args.gt, args.pred, split=split, classes=classes, method=method,
                                           iou_thrs=args.iou_thr, plus_one=args.plus_one)
        if missing:
            print(f"no detection file for {len(missing)} class(es) ({', '.join(missing)}): scored as no detections",
                  file=sys.stderr)
        print(f"VOC AP ({method}, IoU > {', '.join(f'{t:g}' for t in args.iou_thr)}, split {split})")
    else:
        if args.num_classes is None:
            raise UserError("--task semseg needs --num-classes N (the number of classes, background included "
                            "when it is a class).")
        metrics = score.score_semseg(args.gt, args.pred, num_classes=args.num_classes, ignore_index=args.ignore_index,
                                     reduce_zero_label=args.reduce_zero_label, class_names=classes)
    print(format_metrics_table(metrics))
    if args.out:
        atomic_write_json(args.out, metrics)
        print(f"metrics written to {args.out}")
    return 0


def _score_with_config(args: argparse.Namespace) -> dict[str, float]:
    """``segkit score --config``: the ground truth and settings of a config's data split."""
    from segkit.commands.common import CHECKPOINT_SUFFIXES, require_file
    from segkit.evaluation.score_config import score_config

    if args.gt is not None:
        raise UserError("give the ground truth either with --gt or with --config, not both.")
    split = args.split or "val"
    if split not in ("val", "test"):
        raise UserError(f"--split with --config is the data split that segkit eval evaluated, val or test; got {split!r}.")
    if args.config.endswith(CHECKPOINT_SUFFIXES):
        from segkit.api import config_from_checkpoint

        require_file(args.config, "checkpoint")
        cfg = config_from_checkpoint(args.config, args.override)
    else:
        from segkit.config import load_config

        cfg = load_config(args.config, args.override)
    return score_config(cfg, args.pred, split=split, task=args.task, per_class=args.per_class, backend=args.backend)
