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
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import numpy as np
import torch

from segkit.errors import ConfigError
from segkit.registry import TRANSFORMS

__all__ = ["build_transforms", "apply_transforms", "follow_torch_seed", "to_tensor_image"]

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
