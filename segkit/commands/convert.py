"""`segkit convert`: other libraries' weights (through the registered converters) and datasets (voc2coco, coco2voc)."""

from __future__ import annotations

import argparse
import os
from typing import Any

__all__ = ["DATASET_CONVERTERS", "add_parsers", "dataset_converter_parsers"]


def add_parsers(sub: Any) -> None:
    """Add the parsers of ``segkit convert`` to ``sub`` (the ``segkit`` parser's sub-parsers)."""
    p = sub.add_parser("convert", help="convert weights (torchvision / timm) or datasets (voc2coco, coco2voc)",
                       description="Rename a torchvision or timm state dict for segkit with the weight converter "
                                   "that recognises it (`segkit list converters`). A ResNet-family backbone "
                                   "(resnet*, resnext*, seresnet*, seresnext*, legacy_senet154) is written with its "
                                   "architecture, {'state_dict': ..., 'segkit_backbone': {...}}, for use as "
                                   "model.backbone.pretrained; so is a Vision Transformer (torchvision vit_*, timm vit_*). A torchvision Faster / Mask R-CNN ResNet-FPN detector "
                                   "(fasterrcnn_resnet50_fpn[_v2], maskrcnn_resnet50_fpn[_v2]; --from torchvision) "
                                   "is written with a complete config and its class names, {'state_dict', "
                                   "'segkit_config', 'segkit_classes'}, so `segkit eval OUT` and "
                                   "segkit.load_model(OUT) need nothing else; so is a torchvision DeepLabV3 "
                                   "(deeplabv3_resnet50, deeplabv3_resnet101) as an EncoderDecoder with an "
                                   "ASPPHead. IN may also be a weight name, "
                                   "read from its library's cache (downloaded there when online): "
                                   "torchvision://resnet50.IMAGENET1K_V1, torchvision://maskrcnn_resnet50_fpn, "
                                   "timm://resnet50c.gluon_in1k. Datasets: `segkit convert voc2coco "
                                   "--help` and `segkit convert coco2voc --help`.")
    p.add_argument("--from", dest="source", choices=("timm", "torchvision"),
                   help="the library whose key names IN uses (needed for a file; a weight name says it itself)")
    p.add_argument("input", metavar="IN", help="state dict file (raw, or under 'state_dict' / 'model'), or a "
                                               "weight name SCHEME://NAME")
    p.add_argument("output", metavar="OUT", help="segkit checkpoint to write")
    p.set_defaults(handler=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from segkit.checkpoint import extract_state_dict, read_checkpoint
    from segkit.errors import UserError
    from segkit.weight_names import is_weight_name, resolve_weights
    from segkit.weights import convert_weights, save_converted

    if is_weight_name(args.input):
        named = resolve_weights(args.input)
        if args.source not in (None, named.source):
            raise UserError(f"{args.input} holds {named.source} weights, not {args.source}: leave out --from.")
        source, state = named.source, named.state_dict
    elif args.source is None:
        raise UserError(f"say which library's key names '{args.input}' uses: --from torchvision or --from timm.")
    else:
        source, state = args.source, extract_state_dict(read_checkpoint(args.input))
    converted = convert_weights(state, source)
    save_converted(converted, args.output, source=source, origin=args.input)
    print(f"wrote {args.output}: {converted.description}, {len(converted.state_dict)} tensors")
    if converted.kind == "model":
        print(f"evaluate with `segkit eval {args.output}`" + (f" ({converted.note})" if converted.note else ""))
    return 0


def dataset_converter_parsers() -> dict[str, argparse.ArgumentParser]:
    """The parsers of ``segkit convert voc2coco`` and ``segkit convert coco2voc``, by converter name."""
    return {"voc2coco": _voc2coco_parser(), "coco2voc": _coco2voc_parser()}


def _voc2coco_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segkit convert voc2coco",
                                description="Write VOC detection annotations (one or more year folders) as one "
                                            "COCO instances JSON. Boxes become [xmin - 1, ymin - 1, w, h] with "
                                            "w = xmax - xmin + 1; difficult objects are crowd regions (iscrowd 1) "
                                            "unless --use-difficult, and keep 'difficult' and 'truncated' flags; "
                                            "images keep their VOC name as 'voc_id'.")
    p.add_argument("roots", nargs="+", metavar="VOC_ROOT", help="year folder(s), e.g. VOCdevkit/VOC2007")
    p.add_argument("--split", action="append", metavar="NAME", help="image list per root (or one for all; "
                   "default trainval)")
    p.add_argument("--out", required=True, metavar="FILE", help="COCO JSON to write")
    p.add_argument("--classes", metavar="FILE|a,b,c", help="class names (default: the 20 VOC classes)")
    p.add_argument("--use-difficult", action="store_true", help="difficult objects as normal objects")
    p.add_argument("--skip-unknown", action="store_true", help="leave out objects of classes not listed")
    return p


def _convert_voc2coco(argv: list[str]) -> int:
    from segkit.data.voc import VOC_DETECTION_CLASSES, voc_to_coco
    from segkit.evaluation.score import read_class_names
    from segkit.fileio import atomic_write_json

    p = _voc2coco_parser()
    args = p.parse_args(argv)
    splits = args.split or ["trainval"]
    if len(splits) not in (1, len(args.roots)):
        p.error(f"give one --split, or one per root ({len(args.roots)})")
    data = voc_to_coco(args.roots, splits[0] if len(splits) == 1 else splits,
                       read_class_names(args.classes) or VOC_DETECTION_CLASSES, use_difficult=args.use_difficult,
                       unknown_classes="skip" if args.skip_unknown else "error", progress=None)
    atomic_write_json(args.out, data)
    img_root = os.path.join(args.roots[0], "JPEGImages") if len(args.roots) == 1 else \
        os.path.commonpath([os.path.abspath(r) for r in args.roots])
    print(f"wrote {args.out}: {len(data['images'])} images, {len(data['annotations'])} objects, "
          f"{len(data['categories'])} categories; file names are relative to {img_root}")
    return 0


def _coco2voc_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segkit convert coco2voc",
                                description="Write a COCO detection dataset in VOC's layout (JPEGImages/, "
                                            "Annotations/, ImageSets/Main/<split>.txt). Crowd annotations become "
                                            "difficult objects.")
    p.add_argument("ann_file", metavar="ANN_FILE", help="COCO instances JSON")
    p.add_argument("img_dir", metavar="IMG_DIR", help="folder the images' file_name entries are relative to")
    p.add_argument("out_root", metavar="OUT_ROOT", help="VOC year folder to write (created if needed)")
    p.add_argument("--split", required=True, metavar="NAME", help="name of the image list to write")
    return p


def _convert_coco2voc(argv: list[str]) -> int:
    from segkit.data.coco import read_coco
    from segkit.data.voc import coco_to_voc

    args = _coco2voc_parser().parse_args(argv)
    coco = read_coco(args.ann_file)
    ids = coco_to_voc(coco.dataset, args.img_dir, args.out_root, split=args.split, progress=None)
    print(f"wrote {len(ids)} images to {args.out_root} (split {args.split})")
    return 0


#: `segkit convert NAME ...` runs these with their own options.
DATASET_CONVERTERS = {"voc2coco": _convert_voc2coco, "coco2voc": _convert_coco2voc}
