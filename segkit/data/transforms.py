"""Albumentations pipelines that move the image, its boxes, labels and instance masks together.

A pipeline is declared as a list of ``{type, **kwargs}`` items; every albumentations transform is
available by its class name through :data:`segkit.registry.TRANSFORMS`. Wrappers that take
children (``OneOf``, ``SomeOf``, ``Sequential``) accept their ``transforms`` as the same kind of list.

Boxes use the ``pascal_voc`` format (absolute ``x1, y1, x2, y2`` pixels). Each box carries its
label and its index in the input, so the masks of the boxes that survive a crop are kept and the
others are dropped with their box.

Box filtering policy:
    * ``clip=True``: a box that a geometric transform moves partly outside the image is clipped to
      it instead of raising an error.
    * ``min_visibility=0.0``: an object that is cut by a crop keeps its (clipped) box however little
      of it remains, as torchvision and MMDetection do for random crops;
    * ``min_size=1.0`` pixel: a box left thinner or shorter than one pixel (for example an object
      that a crop removes entirely) is dropped together with its label and mask.

Semantic segmentation uses a second path: :func:`build_seg_transforms` builds a pipeline without
box handling and :func:`apply_seg_transforms` moves an image and its label map (class indices,
``ignore_index`` for unlabelled pixels) through it together. Label maps are always resampled with
nearest-neighbour interpolation (a transform configured otherwise is rejected), and every transform
that pads or fills the map (``PadIfNeeded``, ``RandomCrop`` with ``pad_if_needed``, ``Affine``,
``Rotate``...) gets ``fill_mask: ignore_index`` unless the config sets ``fill_mask`` itself, so
padding never invents background pixels. Three transforms fill gaps in albumentations:
:class:`SegRandomCrop` (pad with ``fill`` / ``ignore_index`` up to the crop size, then crop at random,
retrying so that no class covers more than ``cat_max_ratio`` of the crop, as MMSegmentation does), and
the aspect-keeping random resizes of :mod:`segkit.data.resize_transforms`, which move boxes and instance
masks too: :class:`RandomShortSideResize` (short side chosen from a list or drawn from a range, long side
capped) and :class:`BaseSizeJitter` (PyTorch-Encoding's scale jitter). EncNet's training pipeline as
PyTorch-Encoding runs it (long side 0.5-2.0 times a 520 px base size, 480 px crop with ignore padding,
flip) reads, in a dataset config::

    transforms:
      - {type: BaseSizeJitter, base_size: 520, ratio_range: [0.5, 2.0]}
      - {type: SegRandomCrop, height: 480, width: 480}
      - {type: HorizontalFlip, p: 0.5}

Scaling the image by a ratio instead is albumentations' ``{type: RandomScale, scale_limit: [-0.5, 1.0],
p: 1.0}`` (factor 0.5 .. 2.0); ``PadIfNeeded`` + ``RandomCrop`` pad the map with ``ignore_index`` (the
default ``fill_mask``) like ``SegRandomCrop``.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from segkit.errors import ArgumentError, ConfigError
from segkit.registry import TRANSFORMS

__all__ = [
    "build_transforms", "apply_transforms", "follow_torch_seed", "to_tensor_image",
    "build_seg_transforms", "apply_seg_transforms", "RandomShortSideResize", "BaseSizeJitter", "SegRandomCrop",
]

# Transforms that would break the dataset contract (float image in [0, 1], numpy in, tensors out).
_FORBIDDEN = {
    "Normalize": "the model normalises its input itself; datasets return images in [0, 1]",
    "ToTensorV2": "the dataset converts to tensors itself after the pipeline",
    "ToFloat": "the dataset converts the image to float in [0, 1] itself",
}
_CONTAINER_KEY = "transforms"

# Wrappers of other transforms are not ``BasicTransform`` subclasses, so the registry's
# albumentations fallback does not list them; register them here by their class names.
for _name in ("OneOf", "SomeOf", "Sequential", "OneOrOther", "RandomOrder", "SelectiveChannelTransform"):
    if hasattr(A, _name):
        TRANSFORMS.add(getattr(A, _name), name=_name)


def build_transforms(
    cfgs: Sequence[Mapping[str, Any]] | None,
    *,
    path: str = "transforms",
    min_visibility: float = 0.0,
    min_size: float = 1.0,
) -> A.Compose:
    """Build an albumentations pipeline that keeps boxes, labels and masks consistent.

    Args:
        cfgs: list of ``{"type": name, **kwargs}``; ``None`` or ``[]`` gives the identity pipeline.
        path: dotted config path of the list (``"data.train.transforms"``), used in errors.
        min_visibility: fraction of a box's area that must remain after the pipeline for it to be
            kept (see the module docstring).
        min_size: minimum width and height in pixels of a kept box after the pipeline.

    Returns:
        ``A.Compose`` with ``pascal_voc`` box parameters and the label fields ``labels`` and
        ``ann_index``; apply it with :func:`apply_transforms`.

    Raises:
        ConfigError: a malformed item, an unknown transform or argument (with the item's key, e.g.
            ``data.train.transforms[1].p``), or a transform that would break the dataset contract.

    Example:
        >>> pipeline = build_transforms([{"type": "HorizontalFlip", "p": 0.5}], path="data.train.transforms")
    """
    if cfgs is None:
        cfgs = []
    if isinstance(cfgs, Mapping) or isinstance(cfgs, str) or not isinstance(cfgs, Sequence):
        raise ConfigError(
            f"transforms must be a list of {{type: Name, ...}} items, got {type(cfgs).__name__} {cfgs!r}",
            key=path,
        )
    transforms = [_build_one(item, path=f"{path}[{i}]") for i, item in enumerate(cfgs)]
    bbox_params = A.BboxParams(
        format="pascal_voc",
        label_fields=["labels", "ann_index"],
        min_visibility=min_visibility,
        min_width=min_size,
        min_height=min_size,
        clip=True,
    )
    with warnings.catch_warnings():
        # A pipeline of pixel-level transforms leaves boxes unchanged, which is what we want.
        warnings.filterwarnings("ignore", message="Got processor for .*, but no transform to process it")
        return A.Compose(transforms, bbox_params=bbox_params)


def _build_one(item: Any, *, path: str) -> Any:
    if not isinstance(item, Mapping):
        raise ConfigError(
            f"a transform must be a mapping like {{type: HorizontalFlip, p: 0.5}}, got {item!r}", key=path
        )
    name = item.get("type")
    if name in _FORBIDDEN:
        raise ConfigError(f"remove the '{name}' transform: {_FORBIDDEN[name]}.", key=f"{path}.type")
    cfg = dict(item)
    children = cfg.get(_CONTAINER_KEY)
    if isinstance(children, Sequence) and not isinstance(children, str):
        cfg[_CONTAINER_KEY] = [
            _build_one(child, path=f"{path}.{_CONTAINER_KEY}[{j}]") if isinstance(child, Mapping) else child
            for j, child in enumerate(children)
        ]
    try:
        return TRANSFORMS.build(cfg, path=path)
    except ConfigError:
        raise
    except ArgumentError as exc:
        raise ConfigError(str(exc), key=f"{path}.{exc.argument}") from exc
    except Exception as exc:  # noqa: BLE001 - albumentations validates values with its own errors
        raise ConfigError(f"cannot build transform '{name}': {type(exc).__name__}: {exc}", key=path) from exc


def follow_torch_seed(pipeline: A.Compose | None, last_seed: int | None) -> int:
    """Reseed ``pipeline`` from ``torch.initial_seed()`` when that seed differs from ``last_seed``.

    An albumentations pipeline owns its random generator, so the copies forked into DataLoader
    workers would all draw the same augmentations, and the same again every epoch. PyTorch gives
    each worker of each epoch its own ``torch.initial_seed()`` (and Lightning's ``seed_everything``
    makes it depend on the rank), so following it gives every worker its own reproducible stream.
    Call before each sample; returns the seed to pass next time.
    """
    seed = torch.initial_seed()
    if pipeline is not None and seed != last_seed:
        pipeline.set_random_seed(seed % 2**32)
    return seed


def to_tensor_image(image: np.ndarray) -> torch.Tensor:
    """Convert an ``HWC`` uint8 RGB array to a float32 ``[3, H, W]`` tensor in ``[0, 1]``."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    if tensor.dtype == torch.uint8:
        return tensor.to(torch.float32).div_(255.0)
    return tensor.to(torch.float32)


def apply_transforms(
    pipeline: A.Compose | None,
    *,
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Apply ``pipeline`` to an image and its instances, and convert the result to tensors.

    Args:
        pipeline: from :func:`build_transforms`, or ``None`` for no transform.
        image: uint8 ``[H, W, 3]`` RGB.
        boxes: float ``[N, 4]`` absolute xyxy pixels inside the image.
        labels: int ``[N]``.
        masks: uint8 ``[N, H, W]`` binary instance masks in the order of ``boxes``, or ``None``.

    Returns:
        ``(image, boxes, labels, masks)``: float32 ``[3, H', W']`` in ``[0, 1]``, float32
        ``[M, 4]`` xyxy pixels of the transformed image, int64 ``[M]``, and uint8 ``[M, H', W']``
        (``None`` when ``masks`` is ``None``). ``M <= N``: instances whose box the pipeline removed
        are removed with their label and mask.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if pipeline is not None:
        inputs: dict[str, Any] = {
            "image": image,
            "bboxes": boxes,
            "labels": labels,
            "ann_index": np.arange(len(boxes), dtype=np.int64),
        }
        if masks is not None and len(masks) > 0:  # albumentations cannot stack an empty mask list
            inputs["masks"] = masks
        out = pipeline(**inputs)
        image = out["image"]
        keep = np.asarray(out["ann_index"], dtype=np.int64).reshape(-1)
        boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        if masks is not None:
            if len(masks) > 0:
                masks = np.asarray(out["masks"])[keep]
            else:
                masks = np.zeros((0, *image.shape[:2]), dtype=np.uint8)
    image_t = to_tensor_image(image)
    masks_t = None
    if masks is not None:
        masks_t = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8))
    return image_t, torch.from_numpy(boxes.copy()), torch.from_numpy(labels.copy()), masks_t


# ---------------------------------------------------------------------- label-map pipelines
_NEAREST = (cv2.INTER_NEAREST, cv2.INTER_NEAREST_EXACT)


def build_seg_transforms(
    cfgs: Sequence[Mapping[str, Any]] | None,
    *,
    path: str = "transforms",
    ignore_index: int = 255,
) -> A.Compose:
    """Build an albumentations pipeline for an image and its semantic label map.

    Transforms that fill the label map get ``fill_mask=ignore_index`` (and :class:`SegRandomCrop`
    its ``ignore_index``) unless the item sets them; see the module docstring.

    Args:
        cfgs: list of ``{"type": name, **kwargs}``; ``None`` or ``[]`` gives the identity pipeline.
        path: dotted config path of the list, used in errors.
        ignore_index: label of unlabelled pixels, used to pad and fill the map.

    Returns:
        ``A.Compose`` (no box handling); apply it with :func:`apply_seg_transforms`.

    Raises:
        ConfigError: as :func:`build_transforms`, or an item that sets a ``mask_interpolation``
            other than nearest-neighbour (it would blend class indices into other classes).

    Example:
        >>> pipeline = build_seg_transforms([{"type": "PadIfNeeded", "min_height": 480, "min_width": 480},
        ...                                  {"type": "RandomCrop", "height": 480, "width": 480}])
    """
    if cfgs is None:
        cfgs = []
    if isinstance(cfgs, (Mapping, str)) or not isinstance(cfgs, Sequence):
        raise ConfigError(
            f"transforms must be a list of {{type: Name, ...}} items, got {type(cfgs).__name__} {cfgs!r}",
            key=path,
        )
    items = [_seg_defaults(item, path=f"{path}[{i}]", ignore_index=ignore_index) for i, item in enumerate(cfgs)]
    return A.Compose([_build_one(item, path=f"{path}[{i}]") for i, item in enumerate(items)])


def _seg_defaults(item: Any, *, path: str, ignore_index: int) -> Any:
    """``item`` with label-map fill values defaulted to ``ignore_index``; children are handled too."""
    if not isinstance(item, Mapping):
        return item  # _build_one reports it
    cfg = dict(item)
    children = cfg.get(_CONTAINER_KEY)
    if isinstance(children, Sequence) and not isinstance(children, str):
        cfg[_CONTAINER_KEY] = [_seg_defaults(child, path=f"{path}.{_CONTAINER_KEY}[{j}]", ignore_index=ignore_index)
                               for j, child in enumerate(children)]
    name = cfg.get("type")
    if not isinstance(name, str) or name not in TRANSFORMS:
        return cfg
    try:
        params = inspect.signature(TRANSFORMS.get(name)).parameters
    except (TypeError, ValueError):
        return cfg
    for key in ("fill_mask", "ignore_index"):
        if key in params and key not in cfg:
            cfg[key] = ignore_index
    if cfg.get("mask_interpolation", cv2.INTER_NEAREST) not in _NEAREST:
        raise ConfigError(f"label maps must be resampled with nearest-neighbour interpolation (0), got "
                          f"mask_interpolation={cfg['mask_interpolation']!r}; remove the key.",
                          key=f"{path}.mask_interpolation")
    return cfg


def apply_seg_transforms(
    pipeline: A.Compose | None,
    *,
    image: np.ndarray,
    label: np.ndarray,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``pipeline`` to an image and its label map together, and convert both to tensors.

    Args:
        pipeline: from :func:`build_seg_transforms`, or ``None`` for no transform.
        image: uint8 ``[H, W, 3]`` RGB.
        label: integer ``[H, W]`` class indices, ``ignore_index`` for unlabelled pixels; values
            in ``0..65535``.
        ignore_index: the pipeline's ignore value (decides whether the map fits in uint8).

    Returns:
        ``(image, label)``: float32 ``[3, H', W']`` in ``[0, 1]`` and int64 ``[H', W']``.

    Raises:
        ValueError: the map's size differs from the image's, or it holds values outside 0..65535.
    """
    label = np.asarray(label)
    if label.shape != image.shape[:2]:
        raise ValueError(f"label map of shape {label.shape} does not match the image's {image.shape[:2]}")
    low, high = (int(label.min()), int(label.max())) if label.size else (0, 0)
    if low < 0 or max(high, ignore_index) > 65535:
        raise ValueError(f"label values must lie in 0..65535, got {low}..{high} (ignore_index {ignore_index})")
    dtype = np.uint8 if max(high, ignore_index) <= 255 else np.uint16  # the dtypes OpenCV resamples
    label = label.astype(dtype, copy=False)
    if pipeline is not None:
        out = pipeline(image=image, mask=label)
        image, label = out["image"], out["mask"]
    return to_tensor_image(image), torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


@TRANSFORMS.register()
class SegRandomCrop(A.DualTransform):
    """Pad to at least the crop size, then crop a random ``height x width`` window.

    The image is padded with ``fill`` and the label map with ``ignore_index`` at the bottom and
    right. With ``cat_max_ratio < 1``, up to ``max_tries`` windows are drawn until one holds at
    least two classes and none covers ``cat_max_ratio`` or more of its labelled pixels (ignored
    pixels do not count); otherwise the last window drawn is used (MMSegmentation's rule).

    Args:
        height / width: crop size in pixels.
        cat_max_ratio: largest share of one class in an accepted crop; ``1.0`` accepts any crop.
        ignore_index: label of unlabelled pixels, used for padding and not counted.
        max_tries: windows drawn at most when ``cat_max_ratio < 1``.
        fill: padding value of the image.
        p: probability of applying the transform.

    Example:
        >>> crop = SegRandomCrop(height=480, width=480, cat_max_ratio=0.75)
    """

    def __init__(self, *, height: int, width: int, cat_max_ratio: float = 1.0, ignore_index: int = 255,
                 max_tries: int = 10, fill: float = 0.0, p: float = 1.0) -> None:
        super().__init__(p=p)
        if int(height) < 1 or int(width) < 1:
            raise ValueError(f"height and width must be positive, got {height}x{width}")
        if not 0.0 < float(cat_max_ratio) <= 1.0:
            raise ValueError(f"cat_max_ratio must lie in (0, 1], got {cat_max_ratio}")
        if int(max_tries) < 1:
            raise ValueError(f"max_tries must be at least 1, got {max_tries}")
        self.height, self.width = int(height), int(width)
        self.cat_max_ratio, self.ignore_index = float(cat_max_ratio), int(ignore_index)
        self.max_tries, self.fill = int(max_tries), fill

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        pad = (max(self.height - height, 0), max(self.width - width, 0))
        mask = data.get("mask")
        for _ in range(self.max_tries):
            top = self.py_random.randint(0, height + pad[0] - self.height)
            left = self.py_random.randint(0, width + pad[1] - self.width)
            if self.cat_max_ratio >= 1.0 or mask is None or self._balanced(mask, top, left):
                break
        return {"pad": pad, "top": top, "left": left}

    def _balanced(self, mask: np.ndarray, top: int, left: int) -> bool:
        window = mask[top:top + self.height, left:left + self.width]  # the padding is ignored anyway
        counts = np.bincount(window[window != self.ignore_index].ravel().astype(np.int64))
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum()

    def _pad_crop(self, array: np.ndarray, pad: tuple[int, int], top: int, left: int, value: float) -> np.ndarray:
        if pad[0] or pad[1]:
            widths = [(0, pad[0]), (0, pad[1])] + [(0, 0)] * (array.ndim - 2)
            array = np.pad(array, widths, constant_values=value)
        return array[top:top + self.height, left:left + self.width]

    def apply(self, img: np.ndarray, pad: tuple[int, int], top: int, left: int, **params: Any) -> np.ndarray:
        return self._pad_crop(img, pad, top, left, self.fill)

    def apply_to_mask(self, mask: np.ndarray, pad: tuple[int, int], top: int, left: int, **params: Any) -> np.ndarray:
        return self._pad_crop(mask, pad, top, left, self.ignore_index)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "cat_max_ratio", "ignore_index", "max_tries", "fill")


# SSD's augmentation and the random resizes live in their own modules; importing them registers
# their transforms with these.
from segkit.data import ssd_transforms  # noqa: E402,F401
from segkit.data.resize_transforms import BaseSizeJitter, RandomShortSideResize  # noqa: E402
