"""Two-stage detector (Faster R-CNN family): backbone, optional neck, RPN and RoI heads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.errors import ConfigError
from segkit.models.base import ModelInfo, detection_index, detection_result
from segkit.models.detector import Detector, check_targets
from segkit.models.preprocess import check_images
from segkit.ops.masks import paste_masks_in_image
from segkit.registry import MODELS, join_key

__all__ = ["TwoStageDetector"]

@MODELS.register()
class TwoStageDetector(Detector):
    """Faster R-CNN style detector over any backbone, neck and heads honouring the shape contracts.

    Preprocessing happens inside (:class:`~segkit.models.preprocess.ImagePreprocessor`): images are normalised with ``pixel_mean`` / ``pixel_std``,
    optionally resized so the short side is ``min_size`` unless that makes the long side exceed
    ``max_size`` (bilinear, the scale recomputed from the rounded size; target boxes scaled the
    same way, target masks with nearest neighbours), and padded at the bottom / right into one
    batch whose sides are multiples of ``size_divisor``. Detections are mapped back to each input
    image's pixel coordinates; with a mask head, each detection's RoI mask is pasted into the input
    image (:func:`~segkit.ops.masks.paste_masks_in_image`).

    Args:
        backbone: module mapping Tensor[N, 3, H, W] to named maps, with ``output_shape()``.
        neck: optional module mapping the backbone maps to the heads' maps.
        rpn: proposal generator, called as ``rpn(features, image_sizes, padded_size, targets)``.
        roi_heads: box head, called as ``roi_heads(features, proposals, image_sizes, targets)``.
        pixel_mean / pixel_std: per-channel normalisation of inputs in [0, 1].
        min_size: target short side of the resize; ``None`` keeps the input size.
        max_size: cap on the long side after resizing (defaults to ``min_size`` * 1333 / 800).
        size_divisor: the padded batch's height and width are multiples of this.
        train_min_size / train_min_size_sampling / train_min_size_per: multi-scale training, the short
            sides drawn from in training mode (``min_size`` stays the test size); see
            :class:`~segkit.models.preprocess.ImagePreprocessor`.

    Example:
        >>> model = MODELS.build({"type": "TwoStageDetector", "backbone": {"type": "ResNet", "depth": 18},
        ...     "neck": {"type": "FPN", "in_features": ["c2", "c3", "c4", "c5"], "out_channels": 64},
        ...     "rpn_head": {"type": "RPN"}, "roi_head": {"type": "StandardRoIHead", "num_classes": 3}},
        ...     path="model")
        >>> model.eval()([torch.rand(3, 120, 160)])[0].keys()
        dict_keys(['boxes', 'labels', 'scores'])
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module | None,
        rpn: nn.Module,
        roi_heads: nn.Module,
        pixel_mean: Sequence[float] = (0.485, 0.456, 0.406),
        pixel_std: Sequence[float] = (0.229, 0.224, 0.225),
        min_size: int | None = None,
        max_size: int | None = None,
        size_divisor: int = 32,
        train_min_size: Sequence[int] | None = None,
        train_min_size_sampling: str = "choice",
        train_min_size_per: str = "image",
    ) -> None:
        super().__init__(backbone=backbone, neck=neck, pixel_mean=pixel_mean, pixel_std=pixel_std, min_size=min_size,
                         max_size=max_size, size_divisor=size_divisor, train_min_size=train_min_size,
                         train_min_size_sampling=train_min_size_sampling, train_min_size_per=train_min_size_per)
        self.rpn = rpn
        self.roi_heads = roi_heads

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, path: str, **defaults: Any) -> TwoStageDetector:
        """Build from ``{backbone, neck?, rpn_head, roi_head, **options}``.

        The backbone comes first; the neck gets ``in_shapes=backbone.output_shape()``; both heads get
        ``in_shapes`` of the neck (or of the backbone without a neck).

        Raises:
            ConfigError: a missing child section, or a key the detector does not know.
        """
        for wrong, right in (("rpn", "rpn_head"), ("roi_heads", "roi_head")):
            if wrong in cfg:
                raise ConfigError(f"the config key for this part is '{right}', not '{wrong}'", key=join_key(path, wrong))
        return cls.build_with_heads(cfg, path=path, heads={"rpn_head": "rpn", "roi_head": "roi_heads"}, **defaults)

    # ------------------------------------------------------------------ forward
    def forward(
        self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Detect objects, or compute the training losses.

        Args:
            images: float Tensor[3, H, W] per image, values in [0, 1], any sizes.
            targets: required in training; per image ``boxes`` (float Tensor[N, 4], xyxy pixels of
                the input image), ``labels`` (int64 Tensor[N], 1..K) and, for a mask head, ``masks``
                (uint8 or bool Tensor[N, H, W], the input image's size). ``N`` may be 0.

        Returns:
            Training: ``{"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box_reg"}`` scalars, plus
            ``loss_mask`` with a mask head.
            Eval: one dict per image with ``boxes`` (float32 Tensor[D, 4], xyxy input-image pixels),
            ``labels`` (int64 Tensor[D], 1..K), ``scores`` (float32 Tensor[D]) and, with a mask head,
            ``masks`` (float32 Tensor[D, 1, H, W] probabilities at the input image's size).

        Raises:
            ValueError: malformed images or targets, or missing targets in training.
        """
        images = check_images(images)
        targets = check_targets(targets, images) if self.training else None
        batch = self.preprocessor(images, targets)
        features = self.extract_features(batch.tensor)
        proposals, rpn_losses = self.rpn(features, batch.image_sizes, tuple(batch.tensor.shape[-2:]), batch.targets)
        detections, roi_losses = self.roi_heads(features, proposals, batch.image_sizes, batch.targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return self.postprocess(detections, batch.image_sizes, batch.original_sizes)

    def postprocess(
        self,
        detections: Sequence[dict[str, Tensor]],
        image_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Map detection boxes from batch pixels back to each input image's pixels, and paste the
        ``roi_masks`` of a mask head into the input image as ``masks`` (finite: NaN becomes 0)."""
        results = super().postprocess(detections, image_sizes, original_sizes)
        for det, original in zip(results, original_sizes):
            if "roi_masks" in det:
                # NaN probabilities (a model whose outputs overflow) count as 0: no pixel of the object.
                roi_masks = torch.nan_to_num(det.pop("roi_masks"), nan=0.0)
                det["masks"] = paste_masks_in_image(roi_masks, det["boxes"], original)[:, None]
        return results

    @property
    def mask_threshold(self) -> float | None:
        """Probability from which a mask pixel belongs to the object (``None`` without a mask head)."""
        mask_head = getattr(self.roi_heads, "mask_head", None)
        return None if mask_head is None else float(getattr(mask_head, "mask_threshold", 0.5))

    # ------------------------------------------------------------------ contract
    def describe(self) -> ModelInfo:
        """Detection (instance segmentation with a mask head) of the RoI heads' ``num_classes``, with
        their test-time filters."""
        heads = self.roi_heads
        threshold = self.mask_threshold
        return ModelInfo(
            task="detection" if threshold is None else "instance_segmentation",
            num_classes=int(heads.num_classes),
            score_threshold=_optional_float(getattr(heads, "score_threshold", None)),
            mask_threshold=threshold,
            detections_per_image=getattr(heads, "detections_per_image", None),
            test_settings={"min_size": self.min_size, "max_size": self.max_size},
            feature_strides=self.feature_strides(),
        )

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, Any]]:
        """Records the box classifier's logits (``"logits"``, one row per RoI) of the next forward pass."""
        recorded: dict[str, Any] = {}

        def keep_logits(module: nn.Module, inputs: Any, output: Tensor) -> None:
            recorded["logits"] = output

        hook = self.roi_heads.cls_score.register_forward_hook(keep_logits)
        try:
            yield recorded
        finally:
            hook.remove()

    def explain_objective(self, output: Mapping[str, Tensor], target: int | None,
                          recorded: Mapping[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """The box classifier's logit of the detection's class for the RoI the detection comes from:
        its softmax score is the detection's score, bit for bit."""
        chosen = detection_index(output, target)
        label = int(output["labels"][chosen])
        logits = recorded["logits"]
        matches = torch.nonzero(F.softmax(logits.detach().float(), -1)[:, label] == output["scores"][chosen]).flatten()
        if matches.numel() == 0:
            raise ValueError("could not find the RoI of the detection among the box classifier's outputs")
        return logits[int(matches[0]), label], detection_result(output, chosen)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
