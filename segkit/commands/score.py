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
                                   "folders of label maps (PNG, pixel = class index) matched by file stem.")
    p.add_argument("--task", required=True, choices=("bbox", "segm", "voc", "semseg"),
                   help="COCO boxes or masks, VOC detection AP, or semantic segmentation")
    p.add_argument("--gt", required=True, metavar="PATH", help="ground truth: COCO JSON, VOC year folder or label folder")
    p.add_argument("--pred", required=True, metavar="PATH", help="predictions: results JSON, detection-file folder "
                   "or label folder")
    p.add_argument("--out", metavar="FILE", help="write the metrics as JSON")
    p.add_argument("--per-class", action="store_true", help="bbox/segm: also print the AP of every category")
    p.add_argument("--backend", default="pycocotools", choices=("auto", "pycocotools", "faster_coco_eval"),
                   help="bbox/segm: COCO evaluation backend (default pycocotools, whose numbers are the reference; "
                        "faster_coco_eval agrees to about 1e-15 and is several times faster)")
    p.add_argument("--split", default="test", help="voc: the image list ImageSets/Main/<split>.txt (default test)")
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

    classes = score.read_class_names(args.classes)
    if args.task in ("bbox", "segm"):
        metrics = score.score_coco(args.gt, args.pred, iou_type=args.task, per_class=args.per_class,
                                   backend=args.backend)
    elif args.task == "voc":
        method = args.method or score.guess_voc_method(args.gt)
        metrics, missing = score.score_voc(args.gt, args.pred, split=args.split, classes=classes, method=method,
                                           iou_thrs=args.iou_thr, plus_one=args.plus_one)
        if missing:
            print(f"no detection file for {len(missing)} class(es) ({', '.join(missing)}): scored as no detections",
                  file=sys.stderr)
        print(f"VOC AP ({method}, IoU > {', '.join(f'{t:g}' for t in args.iou_thr)}, split {args.split})")
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
