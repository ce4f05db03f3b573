"""`segkit predict`, `segkit export` and `segkit cam`: a checkpoint run on images, and what it writes."""

from __future__ import annotations

import argparse
import os
from typing import Any

from segkit.commands.common import (add_config_or_ckpt, add_device_argument, add_image_inputs, make_output_folder,
                                    predict_arguments)
from segkit.errors import UserError

__all__ = ["add_parsers"]


def add_parsers(sub: Any) -> None:
    """Add the parsers of ``segkit predict``, ``export`` and ``cam`` to ``sub`` (the ``segkit`` parser's sub-parsers)."""
    _add_predict_parser(sub)
    _add_export_parser(sub)
    _add_cam_parser(sub)


def _add_predict_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="run a checkpoint on images and draw the results",
                       description="Predict image files, folders (their images, sorted) or glob patterns with a "
                                   "checkpoint (`segkit predict CKPT INPUT...` or `segkit predict CONFIG CKPT "
                                   "INPUT...`; key=value arguments override the config). A detector writes "
                                   "DIR/<image name>.png with the detections drawn and DIR/predictions.json, a list "
                                   "of COCO results (file_name, image_id = position of the image among the inputs, from 0, category_id, "
                                   "label, category_name, bbox [x, y, w, h], score, and segmentation as RLE for mask "
                                   "models). A semantic segmentor (inferring as `segkit eval` does, with the config's "
                                   "model.test_cfg) writes DIR/<image name>.png with the classes coloured and a "
                                   "legend, and DIR/labels/<image name>.png, the label map (pixel = class index; "
                                   "16-bit above 255 classes). --split val (or test) predicts the images of the "
                                   "config's data split instead of INPUTs: the JSON then carries the dataset's own "
                                   "image and category ids, and label maps are named after the image files in the "
                                   "dataset's label values, as `segkit eval --results` writes them, so `segkit score "
                                   "--config CKPT --pred ...` scores them.")
    add_config_or_ckpt(p)
    p.add_argument("rest", nargs="*", metavar="INPUT",
                   help="[CKPT] (after a config), then images, folders or glob patterns, and key=value overrides")
    p.add_argument("--out", metavar="DIR", required=True, help="output folder (created if needed)")
    p.add_argument("--split", choices=("val", "test"), default=None,
                   help="predict the images of the config's data.val or data.test instead of INPUTs")
    p.add_argument("--score-thr", type=float, default=0.3, metavar="F",
                   help="keep detections scoring at least F (default 0.3; 0 keeps all the model returns; "
                        "unused by segmentors)")
    add_device_argument(p)
    p.add_argument("--batch-size", type=int, default=4, metavar="N", help="images per forward pass (default 4)")
    p.set_defaults(handler=_cmd_predict)


def _add_export_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="export a checkpoint to TorchScript or ONNX and check it",
                       description="Export a detector or segmentor (`segkit export CKPT` or `segkit export CONFIG "
                                   "CKPT`; key=value arguments override the config) to a TorchScript archive or an "
                                   "ONNX model taking one RGB image Tensor[3, H, W] in [0, 1] of the size it was "
                                   "exported at, with the model's resizing, NMS and mask pasting inside. The file is "
                                   "then run beside the PyTorch model on sample images (--images, else the first "
                                   "--num-images images of the config's data.val) and refused if any output differs "
                                   "by more than --atol. ONNX needs `pip install 'segkit-cv[export]'` (onnx, onnxruntime).")
    add_config_or_ckpt(p)
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
    p.set_defaults(handler=_cmd_export)


def _add_cam_parser(sub: Any) -> None:
    p = sub.add_parser("cam", help="class activation maps of a backbone stage",
                       description="Draw which positions of a backbone output a checkpoint's prediction rests on "
                                   "(`segkit cam CKPT INPUT...` or `segkit cam CONFIG CKPT INPUT...`; key=value "
                                   "arguments override the config): for the best detection of each image (detectors; "
                                   "its box is drawn) or the most frequent predicted class other than 0 (segmentors), "
                                   "blended over the image as DIR/<image name>.png.")
    add_image_inputs(p)
    p.add_argument("--layer", default=None, metavar="NAME",
                   help="backbone output to explain, e.g. c4 (default: a detector's stride-8 output, a segmentor's "
                        "last one)")
    p.add_argument("--target", type=int, default=None, metavar="N",
                   help="detectors: the N-th best detection (default 0); segmentors: class index N")
    p.add_argument("--method", choices=("hirescam", "gradcam"), default="hirescam",
                   help="hirescam (gradient times activation at each position, default) or gradcam (channels "
                        "weighted by their mean gradient)")
    add_device_argument(p)
    p.set_defaults(handler=_cmd_cam)


def _cmd_predict(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image
    from tqdm import tqdm

    from segkit.data.images import load_image
    from segkit.fileio import atomic_open, atomic_write_json
    from segkit.predict import (Predictor, SplitImages, coco_results, find_images, label_map, picture_paths,
                                save_label_map)
    from segkit.visualize import draw_predictions

    if not 0.0 <= args.score_thr <= 1.0:
        raise UserError(f"--score-thr is a score in [0, 1], got {args.score_thr}.")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}.")
    ckpt, config, inputs, overrides = predict_arguments(args.config_or_ckpt, args.rest,
                                                        inputs_required=args.split is None)
    if args.split is not None and inputs:
        raise UserError(f"--split {args.split} predicts the images of the config's data.{args.split}; give either "
                        f"--split or input images ({' '.join(inputs[:3])}), not both.")
    files = find_images(inputs) if args.split is None else []
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    predictor = Predictor(ckpt, config=config, overrides=overrides, device=device, score_threshold=args.score_thr,
                          batch_size=args.batch_size)
    split = SplitImages.of(predictor.config, args.split) if args.split is not None else None
    if split is not None:
        files = split.files
    label_dir = os.path.join(args.out, "labels") if predictor.is_segmentor else None
    pictures = picture_paths(files, args.out, label_dir=label_dir)
    make_output_folder(args.out)
    if label_dir is not None:
        make_output_folder(label_dir)
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
                if label_dir is not None and split is not None:
                    save_label_map(split.label_values(label_map(output)),
                                   os.path.join(label_dir, split.label_map_names[index] + ".png"))
                elif label_dir is not None:
                    save_label_map(label_map(output), os.path.join(label_dir, os.path.basename(pictures[index])))
                else:
                    results.extend(coco_results(output, file_name=files[index], predictor=predictor,
                                                image_id=index if split is None else split.image_ids[index],
                                                category_ids=None if split is None else split.category_ids))
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


def _cmd_export(args: argparse.Namespace) -> int:
    from segkit.export import check_export, export_model
    from segkit.predict import Predictor

    if args.num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {args.num_images}.")
    ckpt, config, extra, overrides = predict_arguments(args.config_or_ckpt, args.rest, command="export",
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

    ckpt, config, inputs, overrides = predict_arguments(args.config_or_ckpt, args.rest, command="cam")
    files = find_images(inputs)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    predictor = Predictor(ckpt, config=config, overrides=overrides, device=device)
    pictures = picture_paths(files, args.out)
    make_output_folder(args.out)
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
