"""Preprocessing shared by every meta-architecture: input checks, normalisation, resizing, padding,
and mapping outputs back to each input image (the role of torchvision's detection transform).

A model holds one :class:`ImagePreprocessor` and calls it on the list of images it is given, so
that the same call serves training, evaluation, export and parity tests:

>>> pre = ImagePreprocessor(min_size=64, max_size=96, size_divisor=32)
>>> batch = pre([torch.rand(3, 40, 50), torch.rand(3, 30, 90)])
>>> tuple(batch.tensor.shape), batch.image_sizes, batch.original_sizes
((2, 3, 64, 96), [(64, 80), (32, 96)], [(40, 50), (30, 90)])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.errors import ArgumentError
from segkit.ops.masks import resize_masks

__all__ = ["ImageBatch", "ImagePreprocessor", "check_images", "pad_stack", "round_up", "scale_boxes"]


@dataclass
class ImageBatch:
    """Images as the network sees them.

    Attributes:
        tensor: float Tensor[N, 3, H, W], normalised, resized and padded at the bottom / right.
        image_sizes: ``(h, w)`` of each image inside ``tensor`` (after resizing, before padding).
        original_sizes: ``(h, w)`` of each input image.
        targets: copies of the detection targets with boxes (and masks) at the resized size, or ``None``.
    """

    tensor: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    targets: list[dict[str, Tensor]] | None = None


class ImagePreprocessor(nn.Module):
    """Normalise with ``pixel_mean`` / ``pixel_std``, optionally resize, and pad into one batch.

    Resizing (when ``min_size`` is set) scales each image so that its short side is ``min_size``
    unless that makes the long side exceed ``max_size`` (bilinear, the scale recomputed from the
    rounded size); target boxes are scaled the same way, target masks with nearest neighbours. With
    ``fixed_size`` every image is resized (bilinear, aspect ratio not kept) to that ``(height, width)``,
    SSD's input; boxes are scaled per axis and detections mapped back the same way.

    Multi-scale training: with ``train_min_size`` set, a module in training mode draws the short side
    from it instead of using ``min_size`` (``max_size`` still caps the long side); in eval mode
    ``min_size`` is the test size. ``train_min_size_sampling="choice"`` draws one of the listed sizes
    (torchvision's tuple ``min_size``, Detectron2's ``ResizeShortestEdge`` "choice"); ``"range"`` draws a
    whole number of pixels uniformly in ``[low, high]`` of a two-value list (Detectron2's "range",
    MMDetection's ``RandomResize``). ``train_min_size_per="image"`` draws for each image,
    ``"batch"`` once per call, so all images of a batch share the short side. Draws use torch's global
    generator, which Lightning seeds per process.

    Args:
        pixel_mean / pixel_std: per-channel (RGB) normalisation of inputs in [0, 1].
        min_size: target short side of the resize (at test time, and in training without
            ``train_min_size``); ``None`` keeps the input size.
        max_size: cap on the long side after resizing (defaults to ``min_size`` * 1333 / 800).
        size_divisor: the padded batch's height and width are multiples of this.
        fixed_size: ``(height, width)`` every image is resized to; ``None`` for the ``min_size`` rule.
        train_min_size: short sides drawn from in training (see above); ``None`` trains at ``min_size``.
        train_min_size_sampling: ``"choice"`` (one of the sizes) or ``"range"`` (``[low, high]``).
        train_min_size_per: ``"image"`` (a size per image) or ``"batch"`` (one size per call).

    Raises:
        ValueError: not three means or deviations, a size divisor below 1, ``max_size`` without
            ``min_size``, or ``fixed_size`` that is not two positive sizes or comes with ``min_size``.
        ArgumentError: ``train_min_size`` without ``min_size``, with sizes below 1, a range that is
            not ``[low, high]`` with ``low <= high``, or an unknown sampling or ``per`` value.
    """

    def __init__(self, *, pixel_mean: Sequence[float] = (0.485, 0.456, 0.406),
                 pixel_std: Sequence[float] = (0.229, 0.224, 0.225), min_size: int | None = None,
                 max_size: int | None = None, size_divisor: int = 32,
                 fixed_size: Sequence[int] | None = None, train_min_size: Sequence[int] | None = None,
                 train_min_size_sampling: str = "choice", train_min_size_per: str = "image") -> None:
        super().__init__()
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(f"pixel_mean and pixel_std need three values (RGB), got {pixel_mean!r} and {pixel_std!r}")
        if size_divisor < 1:
            raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
        if max_size is not None and min_size is None:
            raise ValueError("max_size only applies together with min_size; set min_size too or drop max_size")
        if fixed_size is not None:
            if len(fixed_size) != 2 or min(int(v) for v in fixed_size) < 1:
                raise ValueError(f"fixed_size is the (height, width) of every resized image, got {fixed_size!r}")
            if min_size is not None:
                raise ValueError("fixed_size and min_size are two resize rules; set one of them (the other to null)")
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.min_size = min_size
        self.max_size = max_size if max_size is not None or min_size is None else int(round(min_size * 1333 / 800))
        self.size_divisor = int(size_divisor)
        self.fixed_size = None if fixed_size is None else (int(fixed_size[0]), int(fixed_size[1]))
        self.train_min_size = _check_train_sizes(train_min_size, train_min_size_sampling, train_min_size_per,
                                                 min_size=min_size)
        self.train_min_size_sampling, self.train_min_size_per = train_min_size_sampling, train_min_size_per

    def draw_min_size(self) -> int:
        """A short side drawn from ``train_min_size`` by ``train_min_size_sampling`` (torch's generator)."""
        sizes = self.train_min_size
        if self.train_min_size_sampling == "range":
            return int(torch.randint(sizes[0], sizes[1] + 1, ()))
        return sizes[int(torch.randint(len(sizes), ()))]

    def _short_sides(self, count: int) -> list[int | None]:
        """The short side each of ``count`` images is resized to now (``None``: the ``min_size`` rule)."""
        if not self.training or self.train_min_size is None:
            return [None] * count
        if self.train_min_size_per == "batch":
            return [self.draw_min_size()] * count
        return [self.draw_min_size() for _ in range(count)]

    def normalise(self, image: Tensor) -> Tensor:
        """``(image - pixel_mean) / pixel_std`` of one float Tensor[3, H, W]."""
        return (image - self.pixel_mean.to(image.dtype)) / self.pixel_std.to(image.dtype)

    def resize(self, image: Tensor, min_size: int | None = None) -> tuple[Tensor, float | None]:
        """``image`` resized by the ``fixed_size`` or ``min_size`` / ``max_size`` rule (the short side
        ``min_size`` if given, else the configured one), and the scale (``None``: not resized, or
        resized to ``fixed_size``, whose scales differ per axis)."""
        if self.fixed_size is not None:
            return F.interpolate(image[None], size=self.fixed_size, mode="bilinear", align_corners=False)[0], None
        if self.min_size is None:
            return image, None
        h, w = image.shape[-2:]
        short = self.min_size if min_size is None else min_size
        scale = min(short / min(h, w), self.max_size / max(h, w))
        resized = F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                                align_corners=False)[0]
        return resized, scale

    def padded_size(self, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
        """The smallest ``(H, W)``, multiples of ``size_divisor``, that hold images of ``sizes``."""
        return (round_up(max(s[0] for s in sizes), self.size_divisor), round_up(max(s[1] for s in sizes), self.size_divisor))

    def forward(self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None) -> ImageBatch:
        """Normalise, resize and pad ``images`` (float Tensor[3, H, W] in [0, 1], checked before) into one
        batch; ``targets`` (detection targets) follow the resize. In training mode the short sides are
        drawn from ``train_min_size`` when it is set."""
        resized, sizes, new_targets = [], [], [] if targets is not None else None
        for i, (image, short) in enumerate(zip(images, self._short_sides(len(images)))):
            image, scale = self.resize(self.normalise(image), short)
            resized.append(image)
            sizes.append((int(image.shape[-2]), int(image.shape[-1])))
            if new_targets is not None:
                target = dict(targets[i])
                if image.shape[-2:] != images[i].shape[-2:]:
                    target["boxes"] = scale_boxes(target["boxes"], images[i].shape[-2:], image.shape[-2:])
                    if "masks" in target:
                        target["masks"] = (resize_masks(target["masks"], scale) if scale is not None else
                                           _masks_to_size(target["masks"], image.shape[-2:]))
                new_targets.append(target)
        height, width = self.padded_size(sizes)
        batch = resized[0].new_zeros((len(resized), 3, height, width))
        for i, image in enumerate(resized):
            batch[i, :, : image.shape[-2], : image.shape[-1]].copy_(image)
        originals = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        return ImageBatch(batch, sizes, originals, new_targets)

    def boxes_to_input(self, boxes: Tensor, image_size: Sequence[int], original_size: Sequence[int]) -> Tensor:
        """xyxy ``boxes`` of an image of ``image_size`` in the batch, in the pixels of its input image."""
        if tuple(image_size) == tuple(original_size):
            return boxes
        return scale_boxes(boxes, image_size, original_size)

    @staticmethod
    def maps_to_input(maps: Tensor, original_size: Sequence[int], *, align_corners: bool = False) -> Tensor:
        """Maps Tensor[C, h, w] of one image resized (bilinear) to its input image's ``(H, W)``."""
        size = (int(original_size[0]), int(original_size[1]))
        if tuple(maps.shape[-2:]) == size:
            return maps
        return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=align_corners)[0]


_SAMPLINGS = ("choice", "range")
_PER = ("image", "batch")


def _check_train_sizes(sizes: Sequence[int] | None, sampling: str, per: str, *, min_size: int | None
                       ) -> tuple[int, ...] | None:
    """``train_min_size`` as a tuple of ints, checked against the other settings (see the class)."""
    if sampling not in _SAMPLINGS:
        raise ArgumentError(f"train_min_size_sampling must be one of {', '.join(_SAMPLINGS)}, got {sampling!r}",
                            argument="train_min_size_sampling")
    if per not in _PER:
        raise ArgumentError(f"train_min_size_per must be one of {', '.join(_PER)}, got {per!r}",
                            argument="train_min_size_per")
    if sizes is None:
        return None
    if isinstance(sizes, (int, str)) or not sizes or any(isinstance(v, bool) or int(v) != v or v < 1 for v in sizes):
        raise ArgumentError(f"train_min_size must be a non-empty list of short sides in pixels (whole numbers >= 1), "
                            f"got {sizes!r}", argument="train_min_size")
    if min_size is None:
        raise ArgumentError("train_min_size needs min_size, the short side at test time (for example 800)",
                            argument="train_min_size")
    sizes = tuple(int(v) for v in sizes)
    if sampling == "range" and (len(sizes) != 2 or sizes[0] > sizes[1]):
        raise ArgumentError(f"with train_min_size_sampling 'range', train_min_size is [low, high] with low <= high, "
                            f"got {list(sizes)}; list the sizes with sampling 'choice' instead",
                            argument="train_min_size")
    return sizes


def _masks_to_size(masks: Tensor, size: Sequence[int]) -> Tensor:
    """uint8 masks Tensor[N, h, w] resized (nearest) to ``size``."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, int(size[0]), int(size[1])))
    return F.interpolate(masks[:, None].float(), size=(int(size[0]), int(size[1])))[:, 0].to(masks.dtype)


def round_up(value: int, divisor: int) -> int:
    """The smallest multiple of ``divisor`` that is ``>= value``."""
    return int(math.ceil(value / divisor) * divisor)


def pad_stack(tensors: Sequence[Tensor], size: tuple[int, int], value: float) -> Tensor:
    """Stack Tensor[..., h_i, w_i] into Tensor[N, ..., H, W], padding bottom / right with ``value``."""
    return torch.stack([F.pad(t, (0, size[1] - t.shape[-1], 0, size[0] - t.shape[-2]), value=value) for t in tensors])


def scale_boxes(boxes: Tensor, old_size: Sequence[int], new_size: Sequence[int]) -> Tensor:
    """Scale xyxy boxes from an image of ``old_size`` (h, w) to one of ``new_size``."""
    ratio_h = torch.tensor(float(new_size[0]), device=boxes.device) / torch.tensor(float(old_size[0]), device=boxes.device)
    ratio_w = torch.tensor(float(new_size[1]), device=boxes.device) / torch.tensor(float(old_size[1]), device=boxes.device)
    ratios = torch.stack([ratio_w, ratio_h, ratio_w, ratio_h])
    return boxes * ratios.to(boxes.dtype)


def check_images(images: Any) -> list[Tensor]:
    """``images`` as a list of float Tensor[3, H, W] (one Tensor[N, 3, H, W] is split).

    Raises:
        ValueError: not a non-empty list of RGB float tensors of non-zero size, naming the image.
    """
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError("images must be a list of float tensors [3, H, W] (or one [N, 3, H, W] tensor), "
                             f"got a tensor of shape {tuple(images.shape)}")
        images = list(images.unbind(0))
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f"images must be a non-empty list of float tensors [3, H, W], got {type(images).__name__}")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"images[{i}] must be a tensor of shape [3, H, W] (RGB, channels first), got {shape}")
        if not image.is_floating_point():
            raise ValueError(f"images[{i}] must be a float tensor with values in [0, 1], got dtype {image.dtype}")
        if image.shape[-1] == 0 or image.shape[-2] == 0:
            raise ValueError(f"images[{i}] is empty (shape {tuple(image.shape)})")
    return list(images)
