"""Encoder-decoder semantic segmentor: backbone, optional neck, decode head and auxiliary heads."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.errors import ConfigError, did_you_mean
from segkit.models.base import ModelInfo, SegkitModel
from segkit.models.detector import build_backbone_and_neck
from segkit.models.preprocess import ImagePreprocessor, check_images, pad_stack, round_up
from segkit.registry import HEADS, MODELS, join_key

__all__ = ["EncoderDecoder", "SegTestConfig"]

_CONFIG_KEYS = ("backbone", "neck", "decode_head", "auxiliary_head")
_MODES = ("whole", "slide")
_WINDOWS_PER_PASS = 8  # sliding windows sent through the network together (bounds peak memory)


class _TestConfigError(ValueError):
    """A bad ``test_cfg`` value; ``key`` is the offending entry (``crop_size``), or None for ``test_cfg`` itself."""

    def __init__(self, message: str, *, key: str | None) -> None:
        super().__init__(f"test_cfg{'.' + key if key else ''}: {message}")
        self.message = message
        self.key = key


@dataclass(frozen=True)
class SegTestConfig:
    """Test-time inference settings of :class:`EncoderDecoder` (the ``test_cfg`` mapping).

    Attributes:
        mode: ``"whole"`` (the padded image at once) or ``"slide"`` (windows of ``crop_size``
            every ``stride`` pixels, overlapping logits averaged).
        crop_size: ``(h, w)`` of a sliding window; required by ``"slide"``, ignored by ``"whole"``.
        stride: ``(h, w)`` step between windows, at most ``crop_size``; required by ``"slide"``.
        scales: image scale factors of multi-scale testing (``(1.0,)`` = none).
        flip: also infer on the horizontally flipped image and average.

    Example:
        >>> SegTestConfig.from_mapping({"mode": "slide", "crop_size": 512, "stride": [341, 341]}).stride
        (341, 341)
    """

    mode: str = "whole"
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | SegTestConfig | None) -> SegTestConfig:
        """Validate a ``test_cfg`` mapping (``None`` = defaults).

        Raises:
            ValueError: an unknown key (with a suggestion), an unknown mode, ``"slide"`` without
                ``crop_size`` or ``stride``, a stride larger than the crop, a non-positive size or
                scale, or a non-boolean ``flip``. The message starts with ``test_cfg.<key>``.
        """
        if isinstance(cfg, SegTestConfig):
            return cfg
        if cfg is not None and not isinstance(cfg, Mapping):
            raise _TestConfigError(f"must be a mapping such as {{mode: slide, crop_size: 512, stride: 341}} or null, "
                                   f"got {cfg!r}.", key=None)
        cfg = dict(cfg or {})
        for key in cfg:
            if key not in cls.__dataclass_fields__:
                hint = did_you_mean(key, cls.__dataclass_fields__) or f" Known keys: {', '.join(cls.__dataclass_fields__)}."
                raise _TestConfigError("unknown test setting." + hint, key=key)
        mode = cfg.get("mode", "whole")
        if mode not in _MODES:
            raise _TestConfigError(f"mode must be 'whole' or 'slide', got {mode!r}." + did_you_mean(str(mode), _MODES), key="mode")
        crop = _pair(cfg.get("crop_size"), "crop_size")
        stride = _pair(cfg.get("stride"), "stride")
        if mode == "slide":
            for key, value in (("crop_size", crop), ("stride", stride)):
                if value is None:
                    raise _TestConfigError("mode 'slide' needs crop_size and stride ([h, w] or one int)", key=key)
            if stride[0] > crop[0] or stride[1] > crop[1]:
                message = f"stride {list(stride)} is larger than crop_size {list(crop)}, so windows would leave gaps"
                raise _TestConfigError(message, key="stride")
        scales = cfg.get("scales", (1.0,))
        scales = (scales,) if isinstance(scales, (int, float)) else scales
        numbers = isinstance(scales, Sequence) and all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scales)
        if not numbers or not scales or min(scales) <= 0:
            raise _TestConfigError(f"scales must be a non-empty list of positive numbers, got {scales!r}", key="scales")
        flip = cfg.get("flip", False)
        if not isinstance(flip, bool):
            raise _TestConfigError(f"flip must be true or false, got {flip!r}", key="flip")
        return cls(mode=mode, crop_size=crop, stride=stride, scales=tuple(float(s) for s in scales), flip=flip)


@MODELS.register()
class EncoderDecoder(SegkitModel):
    """Semantic segmentor over any backbone, neck and decode heads honouring the shape contracts.

    Images are normalised with ``pixel_mean`` / ``pixel_std`` and padded with 0 at the bottom / right
    into a batch whose sides are multiples of ``size_divisor``; label maps are padded with
    ``ignore_index``, so padding never counts in a loss. Inference follows ``test_cfg``
    (:class:`SegTestConfig`): for each scale (and the flipped image with ``flip``) the logits of the
    whole image or of averaged sliding windows are turned into probabilities and resized back to the
    input size, and all of them are averaged.

    Args:
        backbone: module mapping Tensor[N, 3, H, W] to named maps, with ``output_shape()``.
        neck: optional module mapping the backbone maps to the heads' maps.
        decode_head: head with ``forward(features) -> {"seg_logits": Tensor[N, K, h, w], ...}``,
            ``losses(outputs, sem_seg) -> {"loss_...": scalar}`` and ``num_classes``.
        auxiliary_heads: heads of the same contract, used in training only; their losses are
            renamed ``loss_aux_<name>`` (``loss_aux<i>_<name>`` with several).
        pixel_mean / pixel_std: per-channel normalisation of inputs in [0, 1].
        size_divisor: the padded batch's height and width are multiples of this.
        ignore_index: label of pixels that do not count (also the heads' ``ignore_index``).
        align_corners: of the bilinear resizing of logits and probabilities.
        test_cfg: ``{mode, crop_size, stride, scales, flip}``, see :class:`SegTestConfig`.

    Example:
        >>> model = MODELS.build({"type": "EncoderDecoder", "backbone": {"type": "ResNet", "depth": 18},
        ...     "decode_head": {"type": "FCNHead", "num_classes": 21},
        ...     "test_cfg": {"mode": "slide", "crop_size": 256, "stride": 170}}, path="model")
        >>> model.eval()([torch.rand(3, 300, 400)])[0]["sem_seg"].shape
        torch.Size([21, 300, 400])
    """

    default_evaluator: ClassVar[str] = "SemSegEvaluator"

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module | None = None,
        decode_head: nn.Module,
        auxiliary_heads: Sequence[nn.Module] = (),
        pixel_mean: Sequence[float] = (0.485, 0.456, 0.406),
        pixel_std: Sequence[float] = (0.229, 0.224, 0.225),
        size_divisor: int = 32,
        ignore_index: int = 255,
        align_corners: bool = False,
        test_cfg: Mapping[str, Any] | SegTestConfig | None = None,
    ) -> None:
        super().__init__()
        self.preprocessor = ImagePreprocessor(pixel_mean=pixel_mean, pixel_std=pixel_std, size_divisor=size_divisor)
        num_classes = int(decode_head.num_classes)
        for i, head in enumerate([decode_head, *auxiliary_heads]):
            name = "decode_head" if i == 0 else f"auxiliary_head[{i - 1}]"
            if int(head.num_classes) != num_classes:
                raise ValueError(f"{name} has num_classes={head.num_classes} but decode_head has {num_classes}; they must agree")
            head_ignore = getattr(head, "ignore_index", ignore_index)
            if head_ignore != ignore_index:
                raise ValueError(
                    f"{name} has ignore_index={head_ignore} but the model pads labels with ignore_index={ignore_index}; "
                    "set both to the same value"
                )
        self.backbone = backbone
        self.neck = neck
        self.decode_head = decode_head
        self.auxiliary_heads = nn.ModuleList(auxiliary_heads)
        self.ignore_index = int(ignore_index)
        self.align_corners = bool(align_corners)
        self.test_cfg = SegTestConfig.from_mapping(test_cfg)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, path: str, **defaults: Any) -> EncoderDecoder:
        """Build from ``{backbone, neck?, decode_head, auxiliary_head?, **options}``.

        ``auxiliary_head`` is one head mapping or a list of them. The neck gets
        ``in_shapes=backbone.output_shape()``; every head gets ``in_shapes`` of the neck (or of the
        backbone without a neck).

        Raises:
            ConfigError: a missing section, an unknown key or a bad value, at its dotted key.
        """
        kwargs = {**defaults, **cfg}
        _check_config_keys(cls, kwargs, path)
        children = {k: kwargs.pop(k, None) for k in _CONFIG_KEYS}
        try:
            kwargs["test_cfg"] = SegTestConfig.from_mapping(kwargs.get("test_cfg"))
        except _TestConfigError as exc:
            raise ConfigError(exc.message, key=join_key(path, "test_cfg" + (f".{exc.key}" if exc.key else ""))) from exc
        backbone, neck, shapes = build_backbone_and_neck(children["backbone"], children["neck"], path=path)
        decode_head = HEADS.build_child(children["decode_head"], path=join_key(path, "decode_head"), in_shapes=shapes)
        auxiliary = [
            HEADS.build_child(item, path=key, in_shapes=shapes)
            for key, item in _auxiliary_configs(children["auxiliary_head"], join_key(path, "auxiliary_head"))
        ]
        try:
            return cls(backbone=backbone, neck=neck, decode_head=decode_head, auxiliary_heads=auxiliary, **kwargs)
        except ValueError as exc:
            raise ConfigError(str(exc), key=path or None) from exc

    @property
    def size_divisor(self) -> int:
        """The padded batch's sides are multiples of this."""
        return self.preprocessor.size_divisor

    @property
    def pixel_mean(self) -> Tensor:
        """Per-channel mean Tensor[3, 1, 1] subtracted from inputs in [0, 1]."""
        return self.preprocessor.pixel_mean

    @property
    def pixel_std(self) -> Tensor:
        """Per-channel deviation Tensor[3, 1, 1] inputs are divided by."""
        return self.preprocessor.pixel_std

    @property
    def num_classes(self) -> int:
        """Number of classes K predicted by the decode head."""
        return int(self.decode_head.num_classes)

    # ------------------------------------------------------------------ contract
    def describe(self) -> ModelInfo:
        """Semantic segmentation into the decode head's ``num_classes``, inferred with ``test_cfg``."""
        shapes = self.backbone.output_shape()
        return ModelInfo(task="semantic_segmentation", num_classes=self.num_classes, first_label=0,
                         test_settings=asdict(self.test_cfg),
                         feature_strides={name: int(shape.stride) for name, shape in shapes.items()})

    def batch_images(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """The normalised, padded batch of ``images`` and each image's ``(h, w)`` in it."""
        return self.preprocess(images)

    @contextlib.contextmanager
    def single_pass(self) -> Iterator[None]:
        """Whole-image inference at scale 1 without flip for the duration (``test_cfg`` is put back after)."""
        saved = self.test_cfg
        self.test_cfg = SegTestConfig()
        try:
            yield
        finally:
            self.test_cfg = saved

    # ------------------------------------------------------------------ forward
    def forward(
        self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Segment images, or compute the training losses.

        Args:
            images: float Tensor[3, H, W] per image, values in [0, 1], any sizes.
            targets: required in training; per image ``sem_seg`` (integer Tensor[H, W], the image's
                size, class index 0..K-1 or ``ignore_index``).

        Returns:
            Training: the decode head's losses (``loss_seg``, ...) and the auxiliary heads' renamed
            ``loss_aux_...`` (``loss_aux0_...``, ``loss_aux1_...`` with several), scalars.
            Eval: one dict per image with ``sem_seg`` (float32 Tensor[K, H, W], class probabilities
            at the input image's size).

        Raises:
            ValueError: malformed images or targets, or missing targets in training.
        """
        images = check_images(images)
        if not self.training:
            return self.predict(images)
        labels = _check_labels(targets, images, self.num_classes, self.ignore_index)
        batch, _ = self.preprocess(images)
        sem_seg = pad_stack(labels, tuple(batch.shape[-2:]), self.ignore_index).to(batch.device)
        features = self.extract_features(batch)
        losses = dict(self.decode_head.losses(self.decode_head(features), sem_seg))
        many = len(self.auxiliary_heads) > 1
        for i, head in enumerate(self.auxiliary_heads):
            prefix = f"loss_aux{i}_" if many else "loss_aux_"
            for name, value in head.losses(head(features), sem_seg).items():
                losses[prefix + name.removeprefix("loss_")] = value
        return losses

    def extract_features(self, batch: Tensor) -> dict[str, Tensor]:
        """Backbone (and neck) maps of a preprocessed batch Tensor[N, 3, H, W]."""
        features = self.backbone(batch)
        return self.neck(features) if self.neck is not None else features

    def preprocess(self, images: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Normalise images and pad them with 0 into one batch Tensor[N, 3, H_pad, W_pad] whose sides
        are multiples of ``size_divisor``; also returns each image's ``(h, w)``."""
        batch = self.preprocessor(images)
        return batch.tensor, batch.image_sizes

    # ------------------------------------------------------------------ inference
    def predict(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Class probabilities ``{"sem_seg": float32 Tensor[K, H, W]}`` per input image, following
        ``test_cfg``. With whole-image inference at one scale of 1 and no flip, images of the same
        size go through the model as one batch; images are never padded to another image's size, so
        an image's result does not depend on the other images of the batch (the context encoding
        pools over the whole map, padding included)."""
        cfg = self.test_cfg
        if not (cfg.mode == "whole" and cfg.scales == (1.0,) and not cfg.flip):
            return [{"sem_seg": self._predict_one(image)} for image in images]
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault((int(image.shape[-2]), int(image.shape[-1])), []).append(index)
        outputs: list[dict[str, Tensor]] = [{} for _ in images]
        for indices in by_size.values():
            batch, sizes = self.preprocess([images[i] for i in indices])
            for index, logits in zip(indices, self.whole_inference(batch, sizes)):
                outputs[index] = {"sem_seg": _probabilities(logits)}
        return outputs

    def _predict_one(self, image: Tensor) -> Tensor:
        size = (int(image.shape[-2]), int(image.shape[-1]))
        image = self.preprocessor.normalise(image)
        total, count = None, 0
        for scale in self.test_cfg.scales:
            scaled = image
            if scale != 1.0:
                new_size = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
                scaled = F.interpolate(image[None], size=new_size, mode="bilinear", align_corners=False)[0]
            for flipped in (False, True) if self.test_cfg.flip else (False,):
                logits = self.inference(scaled.flip(-1) if flipped else scaled)
                probs = _probabilities(logits.flip(-1) if flipped else logits)
                probs = self.preprocessor.maps_to_input(probs, size, align_corners=self.align_corners)
                total = probs if total is None else total + probs
                count += 1
        return total / count

    def inference(self, image: Tensor) -> Tensor:
        """Logits Tensor[K, H, W] of one normalised image Tensor[3, H, W] with ``test_cfg.mode``."""
        if self.test_cfg.mode == "slide":
            return self.slide_inference(image)
        size = (int(image.shape[-2]), int(image.shape[-1]))
        padded = (round_up(size[0], self.size_divisor), round_up(size[1], self.size_divisor))
        return self.whole_inference(pad_stack([image], padded, 0.0), [size])[0]

    def whole_inference(self, batch: Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Logits of a padded, normalised batch Tensor[N, 3, H_pad, W_pad], upsampled to the padded
        size and cropped to each image's ``(h, w)``: one Tensor[K, h, w] per image."""
        logits = self._logits(batch)
        return [logits[i, :, :h, :w] for i, (h, w) in enumerate(image_sizes)]

    def slide_inference(self, image: Tensor) -> Tensor:
        """Logits Tensor[K, H, W] of one normalised image Tensor[3, H, W] from sliding windows.

        Windows of ``crop_size`` start every ``stride`` pixels, the last one in each direction
        aligned to the image's far edge; an image smaller than a window is first padded with 0.
        Each pixel's logits are the mean over the windows covering it.
        """
        (crop_h, crop_w), (stride_h, stride_w) = self.test_cfg.crop_size, self.test_cfg.stride
        h, w = int(image.shape[-2]), int(image.shape[-1])
        height, width = max(h, crop_h), max(w, crop_w)
        image = F.pad(image, (0, width - w, 0, height - h))
        origins = [(y, x) for y in _window_starts(height, crop_h, stride_h) for x in _window_starts(width, crop_w, stride_w)]
        crops = torch.stack([image[:, y : y + crop_h, x : x + crop_w] for y, x in origins])
        crops = F.pad(crops, (0, round_up(crop_w, self.size_divisor) - crop_w, 0, round_up(crop_h, self.size_divisor) - crop_h))
        sums = image.new_zeros((self.num_classes, height, width))
        counts = image.new_zeros((1, height, width))
        for start in range(0, len(origins), _WINDOWS_PER_PASS):
            logits = self._logits(crops[start : start + _WINDOWS_PER_PASS])[:, :, :crop_h, :crop_w]
            for window, (y, x) in zip(logits, origins[start : start + _WINDOWS_PER_PASS]):
                sums[:, y : y + crop_h, x : x + crop_w] += window
                counts[:, y : y + crop_h, x : x + crop_w] += 1
        return (sums / counts)[:, :h, :w]

    def _logits(self, batch: Tensor) -> Tensor:
        """The decode head's ``seg_logits`` of a batch, upsampled to the batch's size."""
        logits = self.decode_head(self.extract_features(batch))["seg_logits"]
        if logits.shape[-2:] != batch.shape[-2:]:
            logits = F.interpolate(logits, size=batch.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        return logits


# ---------------------------------------------------------------------- helpers
def _check_config_keys(cls: type, cfg: Mapping[str, Any], path: str) -> None:
    """Raise a ConfigError at the first misnamed, unknown or missing section of a model config."""
    for wrong, right in (("auxiliary_heads", "auxiliary_head"), ("decode_heads", "decode_head"), ("head", "decode_head")):
        if wrong in cfg:
            raise ConfigError(f"the config key for this part is '{right}', not '{wrong}'", key=join_key(path, wrong))
    allowed = [*_CONFIG_KEYS, *(k for k in inspect.signature(cls).parameters if k != "auxiliary_heads" and k not in _CONFIG_KEYS)]
    for key in cfg:
        if key not in allowed:
            hint = did_you_mean(key, allowed) or f" Its arguments are: {', '.join(allowed)}."
            raise ConfigError(f"{cls.__name__} (model) has no argument '{key}'." + hint, key=join_key(path, key))
    for key in ("backbone", "decode_head"):
        if cfg.get(key) is None:
            raise ConfigError(f"{cls.__name__} needs a '{key}' section with a 'type'", key=join_key(path, key))


def _pair(value: Any, key: str) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, Sequence)
        or len(pair) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair)
    ):
        raise _TestConfigError(f"expected a positive int or [h, w] of positive ints, got {value!r}", key=key)
    return int(pair[0]), int(pair[1])


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows of ``crop`` every ``stride`` over ``size >= crop`` pixels, the last
    window shifted back to end at the border."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    return [min(i * stride, size - crop) for i in range(count)]


def _auxiliary_configs(value: Any, path: str) -> list[tuple[str, Mapping[str, Any]]]:
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [(path, value)]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    raise ConfigError(f"expected one head mapping (with a 'type') or a list of them, got {type(value).__name__}", key=path)


def _check_labels(targets: Any, images: Sequence[Tensor], num_classes: int, ignore_index: int) -> list[Tensor]:
    """Validated label maps (int64 Tensor[H, W]) of the per-image targets."""
    if targets is None:
        raise ValueError(
            "training mode needs targets: a list with one dict per image holding 'sem_seg' (int64 [H, W], "
            f"class index 0..K-1, {ignore_index} = ignore); call model.eval() for inference"
        )
    if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
        count = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
        raise ValueError(f"expected one target dict per image ({len(images)}), got {count}")
    labels = []
    for i, (target, image) in enumerate(zip(targets, images)):
        label = target.get("sem_seg") if isinstance(target, Mapping) else None
        if not isinstance(label, Tensor) or label.dim() != 2 or label.is_floating_point() or label.is_complex():
            desc = f"{label.dtype} {tuple(label.shape)}" if isinstance(label, Tensor) else type(label).__name__
            raise ValueError(f"targets[{i}]['sem_seg'] must be an int64 tensor [H, W] of class indices, got {desc}")
        if label.shape != image.shape[-2:]:
            raise ValueError(
                f"targets[{i}]['sem_seg'] has size {tuple(label.shape)} but images[{i}] has size "
                f"{tuple(image.shape[-2:])}; the label map must match its image (H, W)"
            )
        label = label.long()
        bad = (label != ignore_index) & ((label < 0) | (label >= num_classes))
        if bool(bad.any()):
            raise ValueError(
                f"targets[{i}]['sem_seg'] holds the value {int(label[bad][0])}, outside 0..{num_classes - 1} "
                f"(num_classes={num_classes}) and not the ignore index {ignore_index}"
            )
        labels.append(label)
    return labels


def _probabilities(logits: Tensor) -> Tensor:
    """Class probabilities (float32, softmax over dim 0) of logits Tensor[K, H, W], finite even where the
    logits are not: NaN counts as 0 and an infinity as the largest finite value (a model with finite but
    huge weights can overflow), so a pixel never gets NaN scores."""
    return torch.nan_to_num(logits.float()).softmax(0)
