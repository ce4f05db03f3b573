"""What every detector meta-architecture shares: building the backbone and neck, checking targets,
preprocessing into a batch, and mapping detections back to each input image.

:class:`~segkit.models.two_stage.TwoStageDetector` and :class:`~segkit.models.one_stage.OneStageDetector`
subclass :class:`Detector`; they differ only in the heads between the features and the detections.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from segkit.errors import ConfigError, argument_key
from segkit.models.base import SegkitModel
from segkit.models.preprocess import ImagePreprocessor
from segkit.ops.labels import check_box_count
from segkit.registry import BACKBONES, HEADS, NECKS, check_arguments, join_key

__all__ = ["Detector", "build_backbone_and_neck", "check_targets"]


class Detector(SegkitModel):
    """Base of the detectors: a backbone, an optional neck and the shared preprocessing.

    Preprocessing happens inside (:class:`~segkit.models.preprocess.ImagePreprocessor`): images are
    normalised with ``pixel_mean`` / ``pixel_std``, optionally resized so the short side is
    ``min_size`` unless that makes the long side exceed ``max_size``, and padded at the bottom / right
    into one batch whose sides are multiples of ``size_divisor``. :meth:`postprocess` maps detection
    boxes back to each input image's pixels.

    Args:
        backbone: module mapping Tensor[N, 3, H, W] to named maps, with ``output_shape()``.
        neck: optional module mapping the backbone maps to the heads' maps.
        pixel_mean / pixel_std: per-channel normalisation of inputs in [0, 1].
        min_size: target short side of the resize; ``None`` keeps the input size.
        max_size: cap on the long side after resizing (defaults to ``min_size`` * 1333 / 800).
        size_divisor: the padded batch's height and width are multiples of this.
        fixed_size: ``(height, width)`` every image is resized to instead (SSD); ``None`` for none.
        train_min_size / train_min_size_sampling / train_min_size_per: multi-scale training, the short
            sides drawn from in training mode (``min_size`` stays the test size); see
            :class:`~segkit.models.preprocess.ImagePreprocessor`.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module | None,
        pixel_mean: Sequence[float] = (0.485, 0.456, 0.406),
        pixel_std: Sequence[float] = (0.229, 0.224, 0.225),
        min_size: int | None = None,
        max_size: int | None = None,
        size_divisor: int = 32,
        fixed_size: Sequence[int] | None = None,
        train_min_size: Sequence[int] | None = None,
        train_min_size_sampling: str = "choice",
        train_min_size_per: str = "image",
    ) -> None:
        super().__init__()
        self.preprocessor = ImagePreprocessor(pixel_mean=pixel_mean, pixel_std=pixel_std, min_size=min_size,
                                              max_size=max_size, size_divisor=size_divisor, fixed_size=fixed_size,
                                              train_min_size=train_min_size,
                                              train_min_size_sampling=train_min_size_sampling,
                                              train_min_size_per=train_min_size_per)
        self.backbone = backbone
        self.neck = neck

    @classmethod
    def build_with_heads(cls, cfg: Mapping[str, Any], *, path: str, heads: Mapping[str, str],
                         **defaults: Any) -> Detector:
        """Build from ``{backbone, neck?, <head sections>, **options}``: the backbone first, the neck with
        ``in_shapes=backbone.output_shape()``, then each head section with ``in_shapes`` of the neck (or
        of the backbone without a neck); ``heads`` maps each section's config key to the constructor
        argument it becomes (``{"rpn_head": "rpn"}``).

        Raises:
            ConfigError: a missing backbone or head section, a key the detector does not know, or a
                value the constructor refuses.
        """
        kwargs = {**defaults, **cfg}
        for key in ("backbone", *heads):
            if kwargs.get(key) is None:
                raise ConfigError(f"{cls.__name__} needs a '{key}' section with a 'type'", key=join_key(path, key))
        children = {k: kwargs.pop(k, None) for k in ("backbone", "neck", *heads)}
        check_arguments(cls, kwargs, path=path, type_name=cls.__name__, kind="model",
                        provided=("backbone", "neck", *heads.values()))
        backbone, neck, shapes = build_backbone_and_neck(children["backbone"], children["neck"], path=path)
        parts = {argument: HEADS.build_child(children[key], path=join_key(path, key), in_shapes=shapes)
                 for key, argument in heads.items()}
        try:
            return cls(backbone=backbone, neck=neck, **parts, **kwargs)
        except ValueError as exc:
            raise ConfigError(str(exc), key=argument_key(exc, path)) from exc

    def extract_features(self, batch: Tensor) -> dict[str, Tensor]:
        """Backbone (and neck) maps of a preprocessed batch Tensor[N, 3, H, W]."""
        features = self.backbone(batch)
        return self.neck(features) if self.neck is not None else features

    def preprocess(
        self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> tuple[Tensor, list[tuple[int, int]], list[dict[str, Tensor]] | None]:
        """Normalise, resize and pad images into one batch (:class:`~segkit.models.preprocess.ImagePreprocessor`).

        Returns:
            ``(batch, image_sizes, targets)``: batch Tensor[N, 3, H_pad, W_pad]; the ``(h, w)`` of
            each image inside it; copies of the targets with boxes in batch pixels (or ``None``).
        """
        batch = self.preprocessor(images, targets)
        return batch.tensor, batch.image_sizes, batch.targets

    def postprocess(
        self,
        detections: Sequence[dict[str, Tensor]],
        image_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Map detection ``boxes`` from batch pixels back to each input image's pixels (copies of the dicts)."""
        results = []
        for det, size, original in zip(detections, image_sizes, original_sizes):
            det = dict(det)
            det["boxes"] = self.preprocessor.boxes_to_input(det["boxes"], size, original)
            results.append(det)
        return results

    @property
    def min_size(self) -> int | None:
        """Target short side of the input resize (``None``: inputs keep their size)."""
        return self.preprocessor.min_size

    @property
    def max_size(self) -> int | None:
        """Cap on the long side after resizing."""
        return self.preprocessor.max_size

    @property
    def size_divisor(self) -> int:
        """The padded batch's sides are multiples of this."""
        return self.preprocessor.size_divisor

    def feature_strides(self) -> dict[str, int]:
        """``{name: stride}`` of the backbone's maps (what a class activation map explains)."""
        return {name: int(shape.stride) for name, shape in self.backbone.output_shape().items()}

    def batch_images(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """The normalised, resized and padded batch of ``images`` and each image's ``(h, w)`` in it."""
        batch, sizes, _ = self.preprocess(images)
        return batch, sizes

    def default_cam_layer(self) -> str:
        """The backbone output at stride 8 (small objects are detected from the finer levels), else the last."""
        strides = self.describe().feature_strides
        return next((name for name, stride in strides.items() if stride == 8), list(strides)[-1])


def build_backbone_and_neck(
    backbone_cfg: Mapping[str, Any], neck_cfg: Mapping[str, Any] | None, *, path: str
) -> tuple[nn.Module, nn.Module | None, dict[str, Any]]:
    """Build a meta-architecture's backbone and optional neck from their config sections.

    Returns:
        ``(backbone, neck or None, shapes)``: ``shapes`` is the neck's ``output_shape()`` (the
        backbone's without a neck), what the heads are built with.
    """
    backbone = BACKBONES.build_child(backbone_cfg, path=join_key(path, "backbone"))
    shapes = backbone.output_shape()
    neck = None
    if neck_cfg is not None:
        neck = NECKS.build_child(neck_cfg, path=join_key(path, "neck"), in_shapes=shapes)
        shapes = neck.output_shape()
    return backbone, neck, shapes


def check_targets(targets: Any, images: Sequence[Tensor]) -> list[Mapping[str, Tensor]]:
    """``targets`` as a list of detection target dicts, one per image, checked.

    Raises:
        ValueError: no targets, not one dict per image, a malformed ``boxes`` / ``labels`` /
            ``masks`` entry (naming the image and the expected shape and dtype), or more boxes than
            :data:`segkit.ops.labels.MAX_BOXES_PER_IMAGE`.
    """
    if targets is None:
        raise ValueError(
            "training mode needs targets: a list with one dict per image holding 'boxes' (float [N, 4], xyxy "
            "pixels) and 'labels' (int64 [N], 1..K); call model.eval() for inference"
        )
    if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
        count = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
        raise ValueError(f"expected one target dict per image ({len(images)}), got {count}")
    for i, target in enumerate(targets):
        if not isinstance(target, Mapping) or "boxes" not in target or "labels" not in target:
            raise ValueError(f"targets[{i}] must be a dict with 'boxes' and 'labels'")
        boxes, labels = target["boxes"], target["labels"]
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
            shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ValueError(f"targets[{i}]['boxes'] must be a float tensor [N, 4] (xyxy pixels), got {shape}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
            desc = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"targets[{i}]['labels'] must be an int64 tensor [N] matching {len(boxes)} boxes, got {desc}")
        check_box_count(len(boxes), f"targets[{i}]")
        _check_masks(target.get("masks"), i, len(boxes), tuple(images[i].shape[-2:]))
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if bad.any():
            j = int(torch.nonzero(bad)[0])
            raise ValueError(
                f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} has no positive width and height; "
                "boxes are xyxy with x2 > x1 and y2 > y1"
            )
    return list(targets)


def _check_masks(masks: Any, index: int, count: int, size: tuple[int, int]) -> None:
    if masks is None:
        return
    if not isinstance(masks, Tensor) or masks.dim() != 3 or masks.shape[0] != count or tuple(masks.shape[-2:]) != size:
        shape = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise ValueError(
            f"targets[{index}]['masks'] must be a tensor [N, H, W] = [{count}, {size[0]}, {size[1]}] "
            f"(one mask per box, the image's size), got {shape}"
        )
    if masks.is_floating_point():
        raise ValueError(f"targets[{index}]['masks'] must be uint8 or bool (0/1), got {masks.dtype}")
