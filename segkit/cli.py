"""The ``segkit`` command.

    segkit train CONFIG [key=value ...] [--resume CKPT]
    segkit eval CONFIG_OR_CKPT [CKPT] [key=value ...] [--split val|test] [--out FILE]
    segkit predict CONFIG_OR_CKPT [CKPT] INPUT... [key=value ...] --out DIR [--score-thr F] [--device D]
    segkit list [KIND]
    segkit config CONFIG [key=value ...]
    segkit data check CONFIG [key=value ...] [--split train|val|test|all] [--max-images N]
    segkit data show CONFIG [key=value ...] --out DIR [--split S] [--n N] [--seed S] [--grid]
    segkit score --task bbox|segm|voc|semseg --gt GT --pred PRED [--out FILE] [options]
    segkit plot WORK_DIR [--out FILE.png]
    segkit bench CONFIG [key=value ...] [--compare torchvision] [--image-size HxW] [--out FILE] [options]
    segkit convert --from timm|torchvision IN OUT
    segkit convert voc2coco VOC_ROOT [VOC_ROOT ...] --split NAME [--split NAME ...] --out FILE
    segkit convert coco2voc ANN_FILE IMG_DIR OUT_ROOT --split NAME

``predict`` draws each image's results as DIR/<image name>.png; a detector also writes its
detections as COCO results (DIR/predictions.json), a semantic segmentor its label maps
(DIR/labels/<image name>.png, pixel = class index).

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
from typing import Any

from segkit.errors import ConfigError, UserError
from segkit.registry import RegistryEntry

__all__ = ["main", "build_parser", "dataset_converter_parsers", "list_components", "component_signature",
           "component_source"]

_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``segkit`` command and its sub-commands (``convert voc2coco`` and ``convert coco2voc``
    have their own: :func:`dataset_converter_parsers`)."""
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
    _add_config_or_ckpt(p)
    p.add_argument("rest", nargs="*", metavar="[CKPT] [key=value]", help="checkpoint (after a config) and overrides")
    p.add_argument("--split", choices=("val", "test"), default="val", help="the data split to evaluate (default val)")
    p.add_argument("--out", metavar="FILE", help="write the metrics as JSON")

    p = sub.add_parser("predict", help="run a checkpoint on images and draw the results",
                       description="Predict image files, folders (their images, sorted) or glob patterns with a "
                                   "checkpoint (`segkit predict CKPT INPUT...` or `segkit predict CONFIG CKPT "
                                   "INPUT...`; key=value arguments override the config). A detector writes "
                                   "DIR/<image name>.png with the detections drawn and DIR/predictions.json, a list "
                                   "of COCO results (file_name, image_id = position of the image, category_id, "
                                   "label, category_name, bbox [x, y, w, h], score, and segmentation as RLE for mask "
                                   "models). A semantic segmentor (inferring as `segkit eval` does, with the config's "
                                   "model.test_cfg) writes DIR/<image name>.png with the classes coloured and a "
                                   "legend, and DIR/labels/<image name>.png, the label map (pixel = class index; "
                                   "16-bit above 255 classes).")
    _add_image_inputs(p)
    p.add_argument("--score-thr", type=float, default=0.3, metavar="F",
                   help="keep detections scoring at least F (default 0.3; 0 keeps all the model returns; "
                        "unused by segmentors)")
    p.add_argument("--device", default=None, metavar="cpu|cuda[:N]", help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, default=4, metavar="N", help="images per forward pass (default 4)")

    p = sub.add_parser("export", help="export a checkpoint to TorchScript or ONNX and check it",
                       description="Export a detector or segmentor (`segkit export CKPT` or `segkit export CONFIG "
                                   "CKPT`; key=value arguments override the config) to a TorchScript archive or an "
                                   "ONNX model taking one RGB image Tensor[3, H, W] in [0, 1] of the size it was "
                                   "exported at, with the model's resizing, NMS and mask pasting inside. The file is "
                                   "then run beside the PyTorch model on sample images (--images, else the first "
                                   "--num-images images of the config's data.val) and refused if any output differs "
                                   "by more than --atol. ONNX needs `pip install segkit[export]` (onnx, onnxruntime).")
    _add_config_or_ckpt(p)
    p.add_argument("rest", nargs="*", metavar="ARG", help="[CKPT] (after a config), then key=value overrides")
    p.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript",
                   help="torchscript (a .pt archive for torch.jit.load) or onnx (default torchscript)")
    p.add_argument("--out", metavar="FILE", required=True, help="the file to write")
    p.add_argument("--images", nargs="+", metavar="INPUT", help="images, folders or glob patterns to export and "
                   "check with (the first one fixes the input size; the others are resized to it)")
    p.add_argument("--num-images", type=int, default=8, metavar="N",
                   help="sample images taken from data.val without --images (default 8)")
    p.add_argument("--atol", type=float, default=1e-4, metavar="F",
                   help="largest difference allowed between exported and PyTorch outputs (default 1e-4)")

    p = sub.add_parser("cam", help="class activation maps of a backbone stage",
                       description="Draw which positions of a backbone output a checkpoint's prediction rests on "
                                   "(`segkit cam CKPT INPUT...` or `segkit cam CONFIG CKPT INPUT...`; key=value "
                                   "arguments override the config): for the best detection of each image (detectors; "
                                   "its box is drawn) or the most frequent predicted class other than 0 (segmentors), "
                                   "blended over the image as DIR/<image name>.png.")
    _add_image_inputs(p)
    p.add_argument("--layer", default=None, metavar="NAME",
                   help="backbone output to explain, e.g. c4 (default: a detector's stride-8 output, a segmentor's "
                        "last one)")
    p.add_argument("--target", type=int, default=None, metavar="N",
                   help="detectors: the N-th best detection (default 0); segmentors: class index N")
    p.add_argument("--method", choices=("hirescam", "gradcam"), default="hirescam",
                   help="hirescam (gradient times activation at each position, default) or gradcam (channels "
                        "weighted by their mean gradient)")
    p.add_argument("--device", default=None, metavar="cpu|cuda[:N]", help="default: cuda if available, else cpu")

    p = sub.add_parser("list", help="list registered components",
                       description="List every registered component, where it comes from and its signature.")
    p.add_argument("kind", nargs="?", help="backbones, necks, heads, models, datasets, transforms or evaluators")
    p.add_argument("--all", action="store_true", help="also list every albumentations transform")

    p = sub.add_parser("config", help="print the merged config",
                       description="Print CONFIG after _base_ merging, overrides and interpolation. With --check, "
                                   "also check every value as `segkit train` does before it reads data (sections, "
                                   "ranges, the trainer's accelerator, the evaluator's main_metric, the model's "
                                   "components) and exit 2 naming the first problem.")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--check", action="store_true", help="check every value and build the model (imports the "
                   "config's imports:), reading no data")

    p = sub.add_parser("data", help="check a config's datasets, or draw their samples",
                       description="`segkit data check` reads every split of CONFIG (images, annotations, label "
                                   "maps) and lists each problem found; exit status 1 if any is an error. "
                                   "`segkit data show` draws samples after the split's transforms, as the model "
                                   "sees them.")
    data = p.add_subparsers(dest="action", metavar="ACTION")
    data.required = True
    q = data.add_parser("check", help="find every problem in a config's datasets",
                        description="Check every split of CONFIG: missing, corrupt or resized images, boxes outside "
                                    "the image or of zero size, unknown categories, masks that disagree with their "
                                    "box, label-map values outside the classes and label maps of the wrong size; "
                                    "images without annotations are warnings. Prints the count and first records of "
                                    "each problem and a summary; exit status 0 if no errors, 1 otherwise.")
    q.add_argument("config", help="YAML config file")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    q.add_argument("--split", choices=("train", "val", "test", "all"), default="all",
                   help="the split to check (default: every split the config defines)")
    q.add_argument("--max-images", type=int, metavar="N", help="check only the first N images of each split")
    q = data.add_parser("show", help="draw samples after the transforms",
                        description="Draw N random samples of a split after its transforms: boxes with class names "
                                    "and masks, or the label map coloured by class with a legend. Writes "
                                    "DIR/<image id>.png (label-map datasets: DIR/<image name>.png) and, with "
                                    "--grid, a contact sheet DIR/grid.png.")
    q.add_argument("config", help="YAML config file")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    q.add_argument("--split", choices=("train", "val", "test"), default="train", help="default train")
    q.add_argument("--n", type=int, default=16, metavar="N", help="number of samples (default 16)")
    q.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    q.add_argument("--seed", type=int, default=0, metavar="S", help="chooses the samples and their random "
                   "transforms (default 0)")
    q.add_argument("--grid", action="store_true", help="also write all samples as one picture, DIR/grid.png")

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

    p = sub.add_parser("plot", help="draw the training curves of a run as a PNG",
                       description="Read WORK_DIR/logs/version_*/metrics.csv (every run in the folder, in order, so "
                                   "a resumed run's curves continue) and draw one panel per training loss (lightly "
                                   "smoothed), the learning rate, the seconds per iteration and the evaluation "
                                   "metrics against the step.")
    p.add_argument("work_dir", metavar="WORK_DIR", help="the run's folder (the config's work_dir)")
    p.add_argument("--out", metavar="FILE.png", help="the picture to write (default WORK_DIR/curves.png)")

    p = sub.add_parser("convert", help="convert weights (torchvision / timm) or datasets (voc2coco, coco2voc)",
                       description="Rename a torchvision or timm state dict for segkit with the weight converter "
                                   "that recognises it (`segkit list converters`). A ResNet-family backbone "
                                   "(resnet*, resnext*, seresnet*, seresnext*, legacy_senet154) is written with its "
                                   "architecture, {'state_dict': ..., 'segkit_backbone': {...}}, for use as "
                                   "model.backbone.pretrained. A torchvision Faster / Mask R-CNN ResNet-FPN detector "
                                   "(fasterrcnn_resnet50_fpn[_v2], maskrcnn_resnet50_fpn[_v2]; --from torchvision) "
                                   "is written with a complete config and its class names, {'state_dict', "
                                   "'segkit_config', 'segkit_classes'}, so `segkit eval OUT` and "
                                   "segkit.load_model(OUT) need nothing else. Datasets: `segkit convert voc2coco "
                                   "--help` and `segkit convert coco2voc --help`.")
    p.add_argument("--from", dest="source", choices=("timm", "torchvision"), required=True,
                   help="the library whose key names IN uses")
    p.add_argument("input", metavar="IN", help="state dict file (raw, or under 'state_dict' / 'model')")
    p.add_argument("output", metavar="OUT", help="segkit checkpoint to write")

    p = sub.add_parser("bench", help="time training, inference, data loading and evaluation of a config",
                       description="Measure the model of CONFIG after warm-up over several iterations (median, min, "
                                   "max): inference latency at batch 1, throughput at --batch-size, a training step "
                                   "(forward, backward, the config's optimizer), peak memory, images/s through the "
                                   "train DataLoader and the evaluator's time on validation batches. With --compare "
                                   "torchvision the equivalent torchvision model (Faster / Mask R-CNN R50-FPN, FCN "
                                   "R50-D8; same weights) is timed alternately in the same process and the "
                                   "segkit/torchvision ratios are printed. See docs/benchmarks.md.")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--iters", type=int, default=10, metavar="N", help="timed iterations per phase (default 10)")
    p.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed iterations first (default 2)")
    p.add_argument("--batch-size", type=int, metavar="N", help="training and throughput batch (default data.batch_size)")
    p.add_argument("--image-size", metavar="HxW", help="synthetic images of this size, which the network sees "
                   "unresized (default: the config's data, synthetic 512x512 where it cannot be read)")
    p.add_argument("--device", metavar="cpu|cuda[:N]", help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's setting)")
    p.add_argument("--compare", choices=("torchvision",), help="also time the equivalent torchvision model")
    p.add_argument("--skip", metavar="PHASES", help="comma-separated phases to leave out: infer, throughput, train, "
                   "data, eval")
    p.add_argument("--out", metavar="FILE", help="write the results as JSON")
    return parser


def _add_config_or_ckpt(parser: argparse.ArgumentParser) -> None:
    """The first argument of the commands that load a checkpoint (eval, predict, export, cam)."""
    parser.add_argument("config_or_ckpt", metavar="CONFIG_OR_CKPT", help="a checkpoint, or a YAML config followed by CKPT")


def _add_image_inputs(parser: argparse.ArgumentParser) -> None:
    """The arguments of the commands that run a checkpoint on images: CONFIG_OR_CKPT [CKPT] INPUT... --out DIR."""
    _add_config_or_ckpt(parser)
    parser.add_argument("rest", nargs="+", metavar="INPUT",
                        help="[CKPT] (after a config), then images, folders or glob patterns, and key=value overrides")
    parser.add_argument("--out", metavar="DIR", required=True, help="output folder (created if needed)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    words = [a for a in argv if a != "--debug"]
    if len(words) >= 2 and words[0] == "convert" and words[1] in _DATASET_CONVERTERS:
        # `segkit convert voc2coco ...`: a dataset converter with its own options.
        converter = _DATASET_CONVERTERS[words[1]]
        try:
            return converter(words[2:])
        except (UserError, FileNotFoundError) as exc:
            if "--debug" in argv:
                raise
            _fail(str(exc))
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        _quiet_peer_disconnects()
    handler = {"train": _cmd_train, "eval": _cmd_eval, "predict": _cmd_predict, "export": _cmd_export, "cam": _cmd_cam,
               "list": _cmd_list,
               "config": _cmd_config, "convert": _cmd_convert, "score": _cmd_score, "plot": _cmd_plot,
               "data": _cmd_data, "bench": _cmd_bench}[args.command]
    try:
        return handler(args) or 0
    except (UserError, FileNotFoundError) as exc:
        if args.debug:
            raise
        _fail(str(exc))
    except RuntimeError as exc:
        from segkit.engine.workdir import is_worker_death

        if args.debug or not is_worker_death(exc):
            raise
        _fail(f"a data-loading worker process died ({exc}). The operating system ends a worker that runs out of "
              f"memory, and a crash in a dataset's or transform's native code ends it too. Rerun with "
              f"data.num_workers=0 to see the error in the main process, or with fewer workers or a smaller "
              f"data.batch_size if memory is short; a training run continues with --resume auto.")
    except KeyboardInterrupt:
        print("segkit: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:
        # Lightning ends training after a SIGTERM (cluster schedulers send it before killing a job) by
        # raising SIGTERMException, a SystemExit without a status: exit as a process ended by SIGTERM does.
        lightning = sys.modules.get("pytorch_lightning.utilities.exceptions")
        if lightning is None or not isinstance(exc, lightning.SIGTERMException):
            raise
        print("segkit: stopped by SIGTERM", file=sys.stderr)
        return 128 + 15
    return 0


def _quiet_peer_disconnects() -> None:
    """Keep a dead worker's broken connections out of the output of the process that reports its death.

    When a DataLoader worker is killed while it hands a tensor over, multiprocessing's resource-sharing
    thread in the main process sees the connection reset and prints that through ``sys.excepthook``
    before the main thread can report the death in one paragraph. Connection errors raised in helper
    threads are dropped here; everything else still reaches the original hook.
    """
    import threading

    original = sys.excepthook

    def hook(exc_type, exc, tb):
        if threading.current_thread() is not threading.main_thread() and issubclass(exc_type,
                                                                                    (ConnectionError, EOFError)):
            return
        original(exc_type, exc, tb)

    sys.excepthook = hook


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

    cfg = load_config(args.config, args.overrides)
    from segkit.engine.runner import resolve_work_dir, train  # after the config: its errors come sooner

    resume = args.resume
    if resume == "auto":
        last = os.path.join(resolve_work_dir(cfg), "checkpoints", "last.ckpt")
        resume = last if os.path.isfile(last) else None
        if resume is None and _is_rank_zero():
            print(f"--resume auto: no checkpoint at {last} yet, starting a new run", flush=True)
    elif resume is not None:
        _require_file(resume, "checkpoint")
    metrics = train(cfg, resume=resume)
    if metrics and _is_rank_zero():
        from segkit.evaluation.table import format_metrics_table

        print(f"\nFinal metrics ({resolve_work_dir(cfg)}):\n{format_metrics_table(metrics)}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from segkit.api import config_from_checkpoint
    from segkit.config import load_config

    first, rest = args.config_or_ckpt, list(args.rest)
    if first.endswith(_CHECKPOINT_SUFFIXES):
        ckpt, overrides = first, rest
        cfg = config_from_checkpoint(ckpt, overrides)
    else:
        if not rest or "=" in rest[0]:
            raise UserError(f"`segkit eval {first}` needs a checkpoint after the config: segkit eval CONFIG CKPT")
        ckpt, overrides = rest[0], rest[1:]
        _require_file(ckpt, "checkpoint")
        cfg = load_config(first, overrides)
    # imported once the config has been read: a config's error comes without the training stack's import time
    from segkit.engine.runner import evaluate
    from segkit.evaluation.table import format_metrics_table
    from segkit.fileio import atomic_write_json

    metrics = evaluate(cfg, ckpt, split=args.split)
    if not _is_rank_zero():
        return 0
    print(f"\nMetrics of {ckpt} ({args.split}):\n{format_metrics_table(metrics)}")
    if args.out:
        atomic_write_json(args.out, metrics)
        print(f"metrics written to {args.out}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image
    from tqdm import tqdm

    from segkit.data.images import load_image
    from segkit.fileio import atomic_open, atomic_write_json
    from segkit.predict import Predictor, coco_results, find_images, label_map, picture_paths, save_label_map
    from segkit.visualize import draw_predictions

    if not 0.0 <= args.score_thr <= 1.0:
        raise UserError(f"--score-thr is a score in [0, 1], got {args.score_thr}.")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}.")
    ckpt, config, inputs, overrides = _predict_arguments(args.config_or_ckpt, args.rest)
    files = find_images(inputs)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    predictor = Predictor(ckpt, config=config, overrides=overrides, device=device, score_threshold=args.score_thr,
                          batch_size=args.batch_size)
    label_dir = os.path.join(args.out, "labels") if predictor.is_segmentor else None
    pictures = picture_paths(files, args.out, label_dir=label_dir)
    _make_folder(args.out)
    if label_dir is not None:
        _make_folder(label_dir)
    results: list[dict] = []
    with tqdm(total=len(files), unit="img", desc="segkit predict", disable=None) as progress:
        for start in range(0, len(files), args.batch_size):
            images = [load_image(f) for f in files[start:start + args.batch_size]]
            outputs = predictor.predict_many(images)
            for offset, (image, output) in enumerate(zip(images, outputs)):
                index = start + offset
                picture = draw_predictions(image, output, predictor.class_names, score_threshold=args.score_thr,
                                           mask_threshold=predictor.mask_threshold)
                with atomic_open(pictures[index], "wb") as f:
                    Image.fromarray(picture).save(f, format="PNG")
                if label_dir is not None:
                    save_label_map(label_map(output), os.path.join(label_dir, os.path.basename(pictures[index])))
                else:
                    results.extend(coco_results(output, file_name=files[index], image_id=index, predictor=predictor))
                progress.update(1)
    if label_dir is not None:
        print(f"predicted {len(files)} image(s) on {predictor.device}: pictures in {args.out}, label maps "
              f"(PNG, pixel = class index) in {label_dir}")
        return 0
    json_path = os.path.join(args.out, "predictions.json")
    atomic_write_json(json_path, results)
    print(f"predicted {len(files)} image(s) on {predictor.device}: {len(results)} detection(s) with score >= "
          f"{args.score_thr:g}; pictures and predictions.json in {args.out}")
    return 0


def _make_folder(path: str) -> None:
    """Create an output folder (and its parents) unless it exists; a UserError if that is impossible."""
    from segkit.fileio import make_folder

    make_folder(path, what="the output folder")


def _cmd_export(args: argparse.Namespace) -> int:
    from segkit.export import check_export, export_model
    from segkit.predict import Predictor

    if args.num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {args.num_images}.")
    ckpt, config, extra, overrides = _predict_arguments(args.config_or_ckpt, args.rest, command="export",
                                                        inputs_required=False)
    if extra:
        raise UserError(f"unexpected argument(s) {' '.join(extra)}: segkit export CKPT [key=value ...] --format F "
                        f"--out FILE (sample images go after --images).")
    predictor = Predictor(ckpt, config=config, overrides=overrides, device="cpu")
    images = _export_images(args, predictor.config)
    example = _example_image(predictor.model, images)
    description = export_model(predictor.model, args.out, args.format, example, class_names=predictor.class_names)
    report = check_export(args.out, predictor.model, images, atol=args.atol)
    size = "x".join(str(v) for v in description["input"]["shape"][1:])
    detections = f", {report['detections']} detections" if report["detections"] is not None else ""
    print(f"exported {type(predictor.model).__name__} to {args.out} ({args.format}, input 3x{size}, outputs "
          f"{', '.join(description['outputs'])}); checked on {report['images']} image(s){detections}: largest "
          f"difference from PyTorch {report['max_abs_diff']:.1e} (tolerance {args.atol:.0e})")
    return 0


def _cmd_cam(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image, ImageDraw
    from tqdm import tqdm

    from segkit.cam import UnknownLayerError, class_activation_map, overlay_heatmap
    from segkit.data.images import load_image
    from segkit.fileio import atomic_open
    from segkit.predict import Predictor, as_image_tensor, find_images, picture_paths

    ckpt, config, inputs, overrides = _predict_arguments(args.config_or_ckpt, args.rest, command="cam")
    files = find_images(inputs)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    predictor = Predictor(ckpt, config=config, overrides=overrides, device=device)
    pictures = picture_paths(files, args.out)
    _make_folder(args.out)
    lines = []
    for file, picture in tqdm(list(zip(files, pictures)), unit="img", desc="segkit cam", disable=None):
        image = load_image(file)
        try:
            cam = class_activation_map(predictor.model, as_image_tensor(image), layer=args.layer,
                                       target=args.target, method=args.method)
        except UnknownLayerError as exc:
            raise UserError(f"--layer: {exc}.") from exc
        except ValueError as exc:
            lines.append(f"{file}: no map ({exc})")
            continue
        canvas = Image.fromarray(overlay_heatmap(image, cam.heatmap))
        if cam.box is not None:
            ImageDraw.Draw(canvas).rectangle(cam.box, outline=(255, 255, 255), width=2)
        with atomic_open(picture, "wb") as f:
            canvas.save(f, format="PNG")
        name = predictor.class_name(cam.label)
        what = (f"detection {cam.target} ({name}, score {cam.score:.2f})" if cam.box is not None
                else f"class {cam.label} ({name})")
        lines.append(f"{file}: {what}, {cam.layer} -> {picture}")
    print("\n".join(lines))
    return 0


def _export_images(args: argparse.Namespace, cfg: Any) -> list:
    """Sample images for `segkit export`: --images, else the first --num-images of data.val, at one size."""
    import torch.nn.functional as F

    from segkit.data.images import load_image
    from segkit.predict import as_image_tensor, find_images

    if args.images:
        images = [as_image_tensor(load_image(f)) for f in find_images(args.images)]
    else:
        from segkit.registry import DATASETS

        val = (cfg.get("data") or {}).get("val")
        if not val:
            raise UserError("the config has no data.val to take sample images from; give some with --images.")
        dataset = DATASETS.build(val, path="data.val")
        images = [dataset[i][0] for i in range(min(args.num_images, len(dataset)))]
        if not images:
            raise UserError("data.val holds no images; give sample images with --images.")
    size = tuple(images[0].shape[-2:])
    return [img if tuple(img.shape[-2:]) == size else
            F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0] for img in images]


def _example_image(model: Any, images: list) -> Any:
    """The image to trace with: for a detector the first one it detects something in (every branch runs)."""
    import torch

    from segkit.models.base import describe

    if not describe(model).is_detector:
        return images[0]
    with torch.no_grad():
        for image in images:
            if len(model([image])[0]["boxes"]):
                return image
    return images[0]


def _predict_arguments(first: str, rest: list[str], *, command: str = "predict",
                       inputs_required: bool = True) -> tuple[str, str | None, list[str], list[str]]:
    """Split `segkit predict`'s (or `export`'s) positional arguments into (checkpoint, config or None,
    inputs, overrides)."""
    import re

    override = re.compile(r"^[A-Za-z_][\w.]*=")
    overrides = [a for a in rest if override.match(a) and not os.path.exists(a)]
    positional = [a for a in rest if a not in overrides]
    if first.endswith(_CHECKPOINT_SUFFIXES):
        ckpt, config = first, None
    else:
        if not positional or not positional[0].endswith(_CHECKPOINT_SUFFIXES):
            usage = "--out FILE" if command == "export" else "INPUT... --out DIR"
            raise UserError(f"`segkit {command} {first}` needs a checkpoint after the config: "
                            f"segkit {command} CONFIG CKPT {usage}")
        ckpt, config, positional = positional[0], first, positional[1:]
    _require_file(ckpt, "checkpoint")
    if not positional and inputs_required:
        raise UserError(f"no input images given: segkit {command} CKPT INPUT... --out DIR (INPUT: image files, "
                        "folders or glob patterns).")
    return ckpt, config, positional, overrides


def _is_rank_zero() -> bool:
    """Whether this process reports results (the first of a distributed run, or the only one)."""
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from segkit.engine.plot import plot_curves

    print(f"curves of {args.work_dir} written to {plot_curves(args.work_dir, args.out)}")
    return 0


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


def list_components(kind: str | None = None) -> dict[str, list[RegistryEntry]]:
    """The registered components, by plural kind name, as ``segkit list [KIND]`` shows them.

    Args:
        kind: one kind (``"backbones"`` or ``"backbone"``), or None for every registry.

    Returns:
        ``{kind: entries sorted by name}``; albumentations transforms reached by class name only are not
        entries.

    Raises:
        ConfigError: ``kind`` is not a kind of component (with the nearest kind).
    """
    from segkit.registry import all_registries

    registries = all_registries()
    kinds = list(registries)
    if kind:
        plural = kind if kind in registries else kind + "s"
        if plural not in registries:
            from segkit.errors import did_you_mean

            raise ConfigError(f"unknown component kind '{kind}'." + (did_you_mean(kind, kinds)
                                                                    or f" Kinds: {', '.join(kinds)}."))
        kinds = [plural]
    return {name: registries[name].entries() for name in kinds}


def component_source(entry: RegistryEntry) -> str:
    """Where a component was registered: its module, and the plugin (entry point) that loaded it."""
    return entry.module + (f" (plugin {entry.plugin})" if entry.plugin else "")


def _cmd_list(args: argparse.Namespace) -> int:
    from segkit.registry import TRANSFORMS, plugin_errors

    for kind, entries in list_components(args.kind).items():
        print(f"{kind}:")
        for entry in entries:
            print(f"  {entry.name:<22} {component_signature(entry.obj)}\n  {'':<22} from {component_source(entry)}")
        if kind == "transforms":
            extra = [n for n in TRANSFORMS.names(include_fallback=True) if n not in TRANSFORMS.names()]
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


def component_signature(obj: object, *, max_length: int | None = 160) -> str:
    """A component's constructor arguments with their defaults, ``(depth=50, ...)``, cut to ``max_length``
    characters (None: never cut)."""
    try:
        sig = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"
    params = [p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
              for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    text = "(" + ", ".join(params) + ")"
    return text if max_length is None or len(text) <= max_length else text[:max_length - 3] + "...)"


def _cmd_config(args: argparse.Namespace) -> int:
    from segkit.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides, import_plugins=args.check)
    if args.check:
        from segkit.api import build_model
        from segkit.engine.config_check import check_run_config

        check_run_config(cfg)
        model = build_model(cfg)
        parameters = sum(p.numel() for p in model.parameters())
        print(f"{args.config}: every value checked; the model builds ({type(model).__name__}, {parameters:,} "
              f"parameters)")
        return 0
    print(dump_config(cfg), end="")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from segkit.config import config_errors, load_config

    from segkit.engine.config_check import check_data_section

    cfg = load_config(args.config, args.overrides)
    check_data_section(cfg)
    if args.action == "check":
        from segkit.data.check import check_config, format_report

        if args.max_images is not None and args.max_images < 1:
            raise UserError(f"--max-images must be at least 1, got {args.max_images}.")
        with config_errors(cfg):
            reports = check_config(cfg, splits=None if args.split == "all" else [args.split],
                                   max_images=args.max_images)
        print(format_report(reports))
        return 1 if any(report.errors for report in reports) else 0
    from segkit.data.show import show_samples

    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}.")
    with config_errors(cfg):
        rendered = show_samples(cfg, split=args.split, num_samples=args.n, out_dir=args.out, seed=args.seed,
                                grid=args.grid)
    print(f"drew {len(rendered)} {args.split} sample(s) after the transforms into {args.out}"
          + (" (all of them in grid.png)" if args.grid else ""))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from segkit.checkpoint import extract_state_dict, read_checkpoint
    from segkit.weights import convert_weights, save_converted

    converted = convert_weights(extract_state_dict(read_checkpoint(args.input)), args.source)
    save_converted(converted, args.output, source=args.source, origin=args.input)
    print(f"wrote {args.output}: {converted.description}, {len(converted.state_dict)} tensors")
    if converted.kind == "model":
        print(f"evaluate with `segkit eval {args.output}`" + (f" ({converted.note})" if converted.note else ""))
    return 0


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


_DATASET_CONVERTERS = {"voc2coco": _convert_voc2coco, "coco2voc": _convert_coco2voc}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
