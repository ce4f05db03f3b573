"""Inference on images: :class:`Predictor` turns files and arrays into the model's outputs.

A :class:`Predictor` holds a model loaded with :func:`segkit.load_model` (eval mode, on its device)
together with the class names the checkpoint carries, and accepts images in the forms people have
at hand: a path, a uint8 ``[H, W, 3]`` RGB array, a PIL image or a float ``[3, H, W]`` tensor.
Outputs follow the model I/O contract (one dict per image, in the image's own pixels) and are
moved to the CPU: detections (``boxes``, ``labels``, ``scores``, ``masks``) for a detector, with
those below the predictor's ``score_threshold`` dropped, and class scores ``sem_seg`` for a
semantic segmentor (:func:`label_map` turns them into a label map).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from torch import Tensor

from segkit.errors import UserError
from segkit.models.base import ModelInfo, describe

if TYPE_CHECKING:
    import PIL.Image

__all__ = ["Predictor", "ImageInput", "SplitImages", "as_image_array", "as_image_tensor", "filter_detections", "label_map",
           "label_map_png", "save_label_map"]

#: What a :class:`Predictor` accepts as one image.
ImageInput = Union[str, os.PathLike, np.ndarray, Tensor, "PIL.Image.Image"]
# Output entries indexed by detection (filtered together by score).
_PER_DETECTION_KEYS = ("boxes", "labels", "scores", "masks")


class Predictor:
    """A model from a checkpoint, callable on images.

    Args:
        checkpoint: a checkpoint written by ``segkit train`` or ``segkit convert`` (it carries the
            config and the class names), or a weights file when ``config`` is given.
        config: a config file or mapping to build the model from instead of the stored config.
        overrides: dotted ``key=value`` overrides of the config (``model.roi_head.score_threshold=0.3``).
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``).
        score_threshold: drop detections scoring below this (``None``: keep what the model returns).
        batch_size: images per forward pass for lists of images.

    Attributes:
        model: the ``nn.Module`` in eval mode on ``device``.
        config: the config the model was built from.
        class_names: the checkpoint's ``segkit_classes`` (the dataset is never built for this). For
            a detector ``class_names[label - 1]`` names detection label ``label`` (default names
            ``class_1 .. class_K``); for a segmentor ``class_names[c]`` names class index ``c``,
            background included when it is a class (default ``class_0 .. class_{K-1}``).
        category_ids: the dataset category id of each label (``category_ids[label - 1]``) when the
            config's ``data.val`` (or ``data.test``) fixes them, else ``None`` (label = category id).

    Example:
        >>> predictor = segkit.Predictor("work_dirs/quickstart/checkpoints/best.ckpt", score_threshold=0.5)
        >>> out = predictor("demo.jpg")  # dict: boxes [N, 4] xyxy, labels [N], scores [N] (, masks)
        >>> names = [predictor.class_name(label) for label in out["labels"].tolist()]
        >>> segmenter = segkit.Predictor("work_dirs/quickstart_seg/checkpoints/best.ckpt")
        >>> labels = label_map(segmenter("demo.jpg"))  # int64 [H, W] class indices
    """

    def __init__(self, checkpoint: str | os.PathLike[str], *,
                 config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
                 overrides: Sequence[str] | None = None, device: str | torch.device = "cpu",
                 score_threshold: float | None = None, batch_size: int = 4) -> None:
        from segkit.api import load_model

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if score_threshold is not None and not 0.0 <= float(score_threshold) <= 1.0:
            raise ValueError(f"score_threshold is a score in [0, 1], got {score_threshold}")
        self.device = _check_device(device)
        self.config = _resolve_config(checkpoint, config, list(overrides or []))
        self.model = load_model(checkpoint, config=self.config).to(self.device).eval()
        self.score_threshold = None if score_threshold is None else float(score_threshold)
        self.batch_size = int(batch_size)
        self.info = describe(self.model)
        self.class_names = _class_names(checkpoint, self.info)
        self.category_ids = _category_ids(self.config)

    @property
    def is_segmentor(self) -> bool:
        """Whether the model is a semantic segmentor (its outputs hold ``sem_seg``, not detections)."""
        return not self.info.is_detector

    @property
    def mask_threshold(self) -> float:
        """Probability from which a mask pixel belongs to its object (the model's setting, else 0.5)."""
        value = self.info.mask_threshold
        return 0.5 if value is None else float(value)

    def class_name(self, label: int) -> str:
        """The name of detection label ``label`` (1..K) or, for a segmentor, of class index ``label``
        (0..K-1); ``class_<label>`` where none is known."""
        label = int(label)
        index = label - self.info.first_label
        return self.class_names[index] if 0 <= index < len(self.class_names) else f"class_{label}"

    def category_id(self, label: int) -> int:
        """The dataset category id of ``label`` (the label itself unless the config maps it)."""
        ids = self.category_ids
        return int(ids[label - 1]) if ids is not None and 1 <= label <= len(ids) else int(label)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Predict one image (returns a dict) or a list of images (returns a list of dicts).

        For a detector each dict has ``boxes`` (float32 ``[N, 4]``, xyxy pixels of the image),
        ``labels`` (int64 ``[N]``, 1..K), ``scores`` (float32 ``[N]``) and, for a model with a mask
        head, ``masks`` (float32 ``[N, 1, H, W]`` probabilities at the image's size); for a
        segmentor, ``sem_seg`` (float32 ``[C, H, W]`` class scores at the image's size, inferred
        with the config's ``model.test_cfg``); all on the CPU.
        """
        if _is_single(images):
            return self.predict_many([images])[0]  # type: ignore[list-item]
        return self.predict_many(images)  # type: ignore[arg-type]

    def predict_many(self, images: Sequence[ImageInput]) -> list[dict[str, Tensor]]:
        """Predict a list of images, ``batch_size`` at a time (files are read one batch at a time)."""
        return [out for batch in self.iter_batches(images) for out in batch]

    def iter_batches(self, images: Sequence[ImageInput]) -> Iterator[list[dict[str, Tensor]]]:
        """Yield the outputs of ``images`` one batch (``batch_size`` images) at a time."""
        images = list(images)
        for start in range(0, len(images), self.batch_size):
            tensors = [as_image_tensor(x) for x in images[start:start + self.batch_size]]
            yield self.predict_tensors(tensors)

    @torch.no_grad()
    def predict_tensors(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """One forward pass over float ``[3, H, W]`` tensors in ``[0, 1]``; outputs on the CPU, filtered."""
        outputs = self.model([image.to(self.device) for image in images])
        results = []
        for output in outputs:
            if self.score_threshold is not None:
                output = filter_detections(output, self.score_threshold)  # before the copy to the CPU
            results.append({k: v.cpu() if isinstance(v, Tensor) else v for k, v in output.items()})
        return results

    def __repr__(self) -> str:
        return (f"Predictor({type(self.model).__name__}, classes={len(self.class_names)}, device={self.device}, "
                f"score_threshold={self.score_threshold}, batch_size={self.batch_size})")


def filter_detections(output: Mapping[str, Any], score_threshold: float) -> dict[str, Any]:
    """Keep the detections of ``output`` scoring ``>= score_threshold`` (boxes, labels, scores and
    masks together); other entries (``sem_seg``) pass unchanged."""
    output = dict(output)
    scores = output.get("scores")
    if not isinstance(scores, Tensor):
        return output
    keep = scores >= score_threshold
    for key in _PER_DETECTION_KEYS:
        if isinstance(output.get(key), Tensor):
            output[key] = output[key][keep]
    return output


# ------------------------------------------------------------------------------- image inputs
def as_image_array(image: ImageInput) -> np.ndarray:
    """Any accepted image form as a uint8 ``[H, W, 3]`` RGB array (for drawing).

    Raises:
        DatasetError: a path that does not exist or is not a readable image.
        TypeError / ValueError: an object of another type, shape or dtype.
    """
    if isinstance(image, (str, os.PathLike)):
        from segkit.data.images import load_image

        return load_image(os.fspath(image))
    if isinstance(image, Tensor):
        tensor = as_image_tensor(image)
        return (tensor.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    array = _pil_to_array(image) if _is_pil(image) else image
    if not isinstance(array, np.ndarray):
        raise TypeError(f"an image is a path, a uint8 [H, W, 3] RGB array, a PIL image or a float [3, H, W] tensor "
                        f"in [0, 1]; got {type(image).__name__}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"an image array must be [H, W, 3] RGB (or [H, W] grey), got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8 (0..255), got {array.dtype}; pass floats in [0, 1] as a "
                         f"[3, H, W] tensor instead")
    return np.ascontiguousarray(array)


def as_image_tensor(image: ImageInput) -> Tensor:
    """Any accepted image form as the model's input: float32 ``[3, H, W]`` in ``[0, 1]``.

    A uint8 tensor ``[3, H, W]`` is divided by 255. Raises as :func:`as_image_array`.
    """
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be [3, H, W], got shape {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image.float().div_(255)
        if not image.is_floating_point():
            raise ValueError(f"an image tensor must be float in [0, 1] (or uint8), got {image.dtype}")
        return image.float()
    array = as_image_array(image)
    array = array if array.flags.writeable else array.copy()  # arrays of PIL images are read-only
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255)


def _is_single(images: Any) -> bool:
    return isinstance(images, (str, os.PathLike, np.ndarray, Tensor)) or _is_pil(images)


def _is_pil(obj: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    return isinstance(obj, Image.Image)


def _pil_to_array(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


# ------------------------------------------------------------------------------- setup helpers
def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"unknown device '{device}': use cpu, cuda or cuda:N.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}' was asked for but CUDA is not available here; use --device cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device '{device}' does not exist: {torch.cuda.device_count()} CUDA device(s) visible.")
    return dev


def _resolve_config(checkpoint: str | os.PathLike[str], config: Any, overrides: list[str]) -> Mapping[str, Any]:
    """The config :func:`segkit.load_model` would build from (kept, for class names and category ids)."""
    from segkit.api import config_from_checkpoint
    from segkit.config import Config, apply_overrides, load_config

    if isinstance(config, Mapping):
        if not overrides:
            return config
        cfg = Config(copy.deepcopy(dict(config)), filename=getattr(config, "filename", ""),
                     origins=getattr(config, "origins", None))
        apply_overrides(cfg, overrides)
        return cfg
    if config is not None:
        return load_config(config, overrides)
    return config_from_checkpoint(checkpoint, overrides)


def _class_names(checkpoint: str | os.PathLike[str], info: ModelInfo) -> list[str]:
    from segkit.checkpoint import CLASSES_KEY

    names = _read_checkpoint_entry(checkpoint, CLASSES_KEY)
    if isinstance(names, (list, tuple)) and names:
        return [str(n) for n in names]
    first = info.first_label  # segmentation class indices start at 0, detection labels at 1
    return [f"class_{i}" for i in range(first, info.num_classes + first)]


def label_map(output: Mapping[str, Any]) -> Tensor:
    """The class index of every pixel (int64 ``[H, W]``) of a segmentor's output (arg-max of ``sem_seg``).

    Raises:
        ValueError: the output has no ``sem_seg`` (a detector's output).
    """
    scores = output.get("sem_seg")
    if not isinstance(scores, Tensor) or scores.dim() != 3:
        raise ValueError("label_map() needs a segmentor's output with 'sem_seg' scores [C, H, W]; "
                         f"got an output with {sorted(output)}")
    return scores.argmax(0)


def _read_checkpoint_entry(checkpoint: str | os.PathLike[str], key: str) -> Any:
    """One entry of a checkpoint, memory-mapped where the file format allows (tensors are not read)."""
    from segkit.checkpoint import read_checkpoint

    path = os.fspath(checkpoint)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be mapped; read them normally
        ckpt = read_checkpoint(path)
    return ckpt.get(key) if isinstance(ckpt, Mapping) else None


def _category_ids(cfg: Mapping[str, Any]) -> list[int] | None:
    data = cfg.get("data") if isinstance(cfg, Mapping) else None
    if not isinstance(data, Mapping):
        return None
    for split in ("val", "test"):
        ids = (data.get(split) or {}).get("category_ids") if isinstance(data.get(split), Mapping) else None
        if isinstance(ids, Sequence) and not isinstance(ids, str) and ids:
            return [int(i) for i in ids]
    return None


# ------------------------------------------------------------------------------- files and results
#: File extensions taken from folders and glob patterns (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_GLOB_CHARS = frozenset("*?[")


def find_images(inputs: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The image files named by ``inputs``: files as given, folders' images (not recursive) and the
    images and folders' images a glob pattern matches (``**`` recurses), each sorted by name; a file
    named twice is kept once.

    Raises:
        UserError: an input that is neither a file, a folder with images nor a pattern matching images,
            or that holds a NUL character (which no path can).
    """
    import glob

    found: list[str] = []
    for item in map(os.fspath, inputs):
        if "\0" in item:  # the OS cannot look such a path up (glob raises on it)
            shown = item.replace("\0", "\\0")
            raise UserError(f"input '{shown}' holds a NUL character, which no file name can hold; check how the "
                            f"list of inputs was made.")
        if os.path.isfile(item):
            matches = [item]
        elif os.path.isdir(item):
            matches = _folder_images(item)
            if not matches:
                raise UserError(f"folder '{item}' holds no image ({', '.join(IMAGE_EXTENSIONS)}).")
        elif _GLOB_CHARS & set(item):
            matches = []
            for path in sorted(glob.glob(item, recursive=True)):
                matches.extend(_folder_images(path) if os.path.isdir(path) else [path] if _is_image_file(path) else [])
            if not matches:
                raise UserError(f"pattern '{item}' matches no image file or folder with images "
                                f"({', '.join(IMAGE_EXTENSIONS)}).")
        else:
            raise UserError(f"input '{item}' does not exist; give image files, folders or glob patterns.")
        found.extend(matches)
    unique: dict[str, str] = {}
    for path in found:
        unique.setdefault(os.path.realpath(path), path)
    if not unique:
        raise UserError("no input images given.")
    return list(unique.values())


def _folder_images(folder: str) -> list[str]:
    return sorted(p for p in (os.path.join(folder, n) for n in os.listdir(folder)) if _is_image_file(p))


def _is_image_file(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(IMAGE_EXTENSIONS)


def save_label_map(labels: Tensor | np.ndarray, path: str) -> None:
    """Write a label map as a PNG, atomically: 8-bit grayscale (mode ``L``) for class indices up to
    255, 16-bit (mode ``I;16``) above; pixel value = class index."""
    from segkit.fileio import atomic_open

    data = label_map_png(labels)
    with atomic_open(path, "wb") as f:
        f.write(data)


def label_map_png(labels: Tensor | np.ndarray) -> bytes:
    """A label map ``[H, W]`` encoded as PNG, as :func:`save_label_map` writes it.

    Raises:
        ValueError: values outside ``0..65535``.
    """
    import io

    from PIL import Image

    values = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"class indices must lie in [0, 65535] to be saved as PNG, got {values.min()}..{values.max()}")
    wide = values.size and values.max() > 255
    picture = Image.fromarray(values.astype(np.uint16 if wide else np.uint8))  # mode I;16 or L
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def picture_paths(files: Sequence[str], out_dir: str, *, label_dir: str | None = None) -> list[str]:
    """``out_dir/<stem>.png`` for each file; a stem seen before (or a name that is one of the inputs)
    gets ``_1``, ``_2``, ... so that no picture overwrites another or an input. With ``label_dir``
    (where a segmentor's label maps go, as ``label_dir/<picture name>``) a name is also chosen so
    that no label map overwrites an input."""
    taken = {os.path.realpath(f) for f in files}
    folders = [out_dir] if label_dir is None else [out_dir, label_dir]
    paths = []
    for file in files:
        stem = os.path.splitext(os.path.basename(file))[0]
        name, n = f"{stem}.png", 0
        while any(os.path.realpath(os.path.join(folder, name)) in taken for folder in folders):
            n += 1
            name = f"{stem}_{n}.png"
        taken.update(os.path.realpath(os.path.join(folder, name)) for folder in folders)
        paths.append(os.path.join(out_dir, name))
    return paths


def coco_results(output: Mapping[str, Any], *, file_name: str, image_id: int,
                 predictor: Predictor, category_ids: Mapping[int, int] | None = None) -> list[dict[str, Any]]:
    """One image's detections as COCO results entries.

    Each entry: ``file_name``, ``image_id``, ``category_id`` (the dataset category id of the label:
    ``category_ids[label]`` when given, else see :attr:`Predictor.category_ids`), ``label`` (1..K),
    ``category_name``, ``bbox`` (``[x, y, w, h]`` pixels), ``score`` and, with masks,
    ``segmentation`` (compressed RLE with ``str`` counts, thresholded at the model's mask threshold).
    A label that ``category_ids`` does not map is left out.
    """
    boxes = output["boxes"].reshape(-1, 4).tolist()
    labels = output["labels"].reshape(-1).tolist()
    scores = output["scores"].reshape(-1).tolist()
    segmentations: list[Any] = [None] * len(boxes)
    if output.get("masks") is not None and len(boxes):
        from segkit.evaluation.coco import encode_masks

        masks = output["masks"]
        masks = masks[:, 0] if masks.dim() == 4 else masks
        binary = masks >= predictor.mask_threshold if masks.is_floating_point() else masks > 0
        segmentations = encode_masks(binary)
    entries = []
    for (x0, y0, x1, y1), label, score, rle in zip(boxes, labels, scores, segmentations):
        if category_ids is not None and label not in category_ids:
            continue
        category = predictor.category_id(label) if category_ids is None else int(category_ids[label])
        entry = {"file_name": file_name, "image_id": image_id, "category_id": category,
                 "label": int(label), "category_name": predictor.class_name(label),
                 "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
        if rle is not None:
            entry["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"]}
        entries.append(entry)
    return entries


class SplitImages:
    """The images of a config's data split, with the ids and names the split's ground truth uses.

    Attributes:
        files: the image files, in dataset order.
        image_ids: each image's id (a COCO dataset's own ids; the position for label-map datasets).
        category_ids: ``{label: category id}`` of a COCO dataset, else ``None``.
        label_map_names: the name (without ``.png``) ``segkit eval --results`` gives each image's label map.
    """

    def __init__(self, dataset: Any) -> None:
        from segkit.evaluation.semseg import label_map_name

        self.dataset = dataset
        self.files = [dataset.image_path(i) for i in range(len(dataset))]
        ids = getattr(dataset, "image_ids", None)
        self.image_ids = [int(i) for i in ids] if ids is not None else list(range(len(dataset)))
        mapping = getattr(dataset, "label_to_cat_id", None)
        self.category_ids = {int(k): int(v) for k, v in mapping.items()} if mapping is not None else None
        folder = getattr(dataset, "img_dir", None)
        self.label_map_names = [label_map_name(os.path.relpath(f, folder) if folder else os.path.basename(f))
                                for f in self.files]
        raw_values = getattr(dataset, "raw_label_values", None)
        self._raw_values = raw_values() if callable(raw_values) else None

    @classmethod
    def of(cls, cfg: Mapping[str, Any], split: str) -> SplitImages:
        """The images of ``cfg``'s ``data.<split>``.

        Raises:
            UserError: the config has no such split.
        """
        from segkit.registry import DATASETS

        spec = (cfg.get("data") or {}).get(split) if isinstance(cfg.get("data"), Mapping) else None
        if not spec:
            raise UserError(f"--split {split}: the config has no data.{split} to take images from.")
        return cls(DATASETS.build(spec, path=f"data.{split}"))

    def label_values(self, labels: Tensor) -> np.ndarray:
        """Class indices ``[H, W]`` in the dataset's raw label values (its ``reduce_zero_label`` / ``label_map`` undone)."""
        values = labels.cpu().numpy()
        return values if self._raw_values is None else self._raw_values[values]
