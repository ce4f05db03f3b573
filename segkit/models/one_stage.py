"""One-stage detector (RetinaNet family): backbone, optional neck, a dense head, and the selection of
detections among the head's scored boxes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, clip_boxes_to_image

from segkit.models.base import ModelInfo
from segkit.models.detector import Detector, check_targets
from segkit.models.preprocess import check_images
from segkit.registry import MODELS

__all__ = ["OneStageDetector"]

_SELECTIONS = ("per_level", "per_class")

@MODELS.register()
class OneStageDetector(Detector):
    """Dense detector (RetinaNet, and later FCOS / SSD style heads) over any backbone, neck and dense head.

    Preprocessing and the mapping of detections back to the input images are those of every detector
    (:class:`~segkit.models.detector.Detector`). The dense head predicts, for every anchor (or point) of
    every level, a score per class and a box; the detector then keeps, per level and image, the
    ``topk_candidates`` best (anchor, class) pairs, drops those scoring ``<= score_threshold``, clips
    their boxes to the image, applies NMS per class (IoU ``nms_threshold``) over all levels and keeps the
    ``detections_per_image`` best: torchvision's RetinaNet post-processing (``selection: per_level``).
    With ``selection: per_class`` (torchvision's SSD), the scores of all levels are taken together and,
    per image and class, those above ``score_threshold`` are kept, at most the ``topk_candidates`` best
    of each class; then come the clipping, the per-class NMS and the ``detections_per_image`` best.

    The dense-head protocol: ``head.num_classes`` (K) and ``head(features, padded_size, targets)`` ->
    ``(levels, losses)``; in training ``([], {"loss_*": scalar})``, at inference one ``(scores, boxes)``
    per level with scores Tensor[N, M_l, K] (probabilities) and boxes Tensor[N, M_l, 4] (xyxy,
    padded-batch pixels), and ``{}``.

    Args:
        backbone: module mapping Tensor[N, 3, H, W] to named maps, with ``output_shape()``.
        neck: optional module mapping the backbone maps to the head's maps.
        head: the dense head (see above).
        pixel_mean / pixel_std / min_size / max_size / size_divisor / fixed_size: the preprocessing.
        train_min_size / train_min_size_sampling / train_min_size_per: multi-scale training (the short
            sides drawn from in training mode; see :class:`~segkit.models.preprocess.ImagePreprocessor`).
        score_threshold: candidates scoring at or below this are dropped.
        topk_candidates: candidates kept per level (``per_level``) or class (``per_class``) and image before NMS.
        nms_threshold: IoU threshold of the per-class NMS.
        detections_per_image: at most this many detections per image.
        selection: ``"per_level"`` (RetinaNet, FCOS) or ``"per_class"`` (SSD), see above.

    Example:
        >>> model = MODELS.build({"type": "OneStageDetector", "backbone": {"type": "ResNet", "depth": 18},
        ...     "neck": {"type": "FPN", "in_features": ["c3", "c4", "c5"], "extra_block": "p6p7"},
        ...     "head": {"type": "RetinaNetHead", "num_classes": 3}}, path="model")
        >>> model.eval()([torch.rand(3, 120, 160)])[0].keys()
        dict_keys(['boxes', 'labels', 'scores'])
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module | None,
        head: nn.Module,
        pixel_mean: Sequence[float] = (0.485, 0.456, 0.406),
        pixel_std: Sequence[float] = (0.229, 0.224, 0.225),
        min_size: int | None = None,
        max_size: int | None = None,
        size_divisor: int = 32,
        fixed_size: Sequence[int] | None = None,
        train_min_size: Sequence[int] | None = None,
        train_min_size_sampling: str = "choice",
        train_min_size_per: str = "image",
        score_threshold: float = 0.05,
        topk_candidates: int = 1000,
        nms_threshold: float = 0.5,
        detections_per_image: int = 100,
        selection: str = "per_level",
    ) -> None:
        super().__init__(backbone=backbone, neck=neck, pixel_mean=pixel_mean, pixel_std=pixel_std, min_size=min_size,
                         max_size=max_size, size_divisor=size_divisor, fixed_size=fixed_size,
                         train_min_size=train_min_size, train_min_size_sampling=train_min_size_sampling,
                         train_min_size_per=train_min_size_per)
        if topk_candidates < 1 or detections_per_image < 1:
            raise ValueError(f"topk_candidates ({topk_candidates}) and detections_per_image ({detections_per_image}) "
                             "must be >= 1")
        if selection not in _SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(_SELECTIONS)}, got {selection!r}")
        self.selection = selection
        self.head = head
        self.score_threshold = float(score_threshold)
        self.topk_candidates = int(topk_candidates)
        self.nms_threshold = float(nms_threshold)
        self.detections_per_image = int(detections_per_image)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, path: str, **defaults: Any) -> OneStageDetector:
        """Build from ``{backbone, neck?, head, **options}``; the head gets ``in_shapes`` of the neck
        (or of the backbone without a neck).

        Raises:
            ConfigError: a missing child section, or a key the detector does not know.
        """
        return cls.build_with_heads(cfg, path=path, heads={"head": "head"}, **defaults)

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Detect objects, or compute the training losses.

        Args:
            images: float Tensor[3, H, W] per image, values in [0, 1], any sizes.
            targets: required in training; per image ``boxes`` (float Tensor[N, 4], xyxy pixels of
                the input image) and ``labels`` (int64 Tensor[N], 1..K). ``N`` may be 0.

        Returns:
            Training: the head's losses (``{"loss_cls", "loss_box_reg"}`` for RetinaNet).
            Eval: one dict per image with ``boxes`` (float32 Tensor[D, 4], xyxy input-image pixels),
            ``labels`` (int64 Tensor[D], 1..K) and ``scores`` (float32 Tensor[D]), best first.

        Raises:
            ValueError: malformed images or targets, or missing targets in training.
        """
        images = check_images(images)
        targets = check_targets(targets, images) if self.training else None
        batch = self.preprocessor(images, targets)
        features = self.extract_features(batch.tensor)
        levels, losses = self.head(features, tuple(batch.tensor.shape[-2:]), batch.targets)
        if self.training:
            return losses
        return self.postprocess(self.select_detections(levels, batch.image_sizes), batch.image_sizes,
                                batch.original_sizes)

    def select_detections(self, levels: Sequence[tuple[Tensor, Tensor]],
                          image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """The detections of each image among the head's scored boxes (see the class docstring).

        Args:
            levels: per level, scores Tensor[N, M_l, K] and boxes Tensor[N, M_l, 4].
            image_sizes: ``(h, w)`` of each image inside the padded batch.

        Returns:
            Per image ``boxes`` Tensor[D, 4] (padded-batch pixels), ``labels`` Tensor[D] (1..K) and
            ``scores`` Tensor[D], best first.
        """
        if self.selection == "per_class":
            return self._select_per_class(levels, image_sizes)
        results = []
        for i, size in enumerate(image_sizes):
            candidates = []
            for scores, boxes in levels:
                num_classes = scores.shape[2]
                # The threshold first, then the best k of the (anchor, class) pairs above it, as torchvision
                # does: only the few pairs that pass are ordered, not every pair of the level. (A sort and
                # a slice rather than topk: no size depends on the data, so a traced export stays exact.)
                flat = scores[i].flatten()
                pair_idx = torch.nonzero(flat > self.score_threshold).squeeze(1)
                top_scores, order = flat[pair_idx].sort(descending=True)
                top_scores, pair_idx = top_scores[: self.topk_candidates], pair_idx[order[: self.topk_candidates]]
                anchor_idx = torch.div(pair_idx, num_classes, rounding_mode="floor")
                candidates.append((top_scores, pair_idx % num_classes + 1, boxes[i, anchor_idx]))
            scores_i, labels_i, boxes_i = (torch.cat(parts) for parts in zip(*candidates))
            boxes_i = clip_boxes_to_image(boxes_i, size)
            keep = batched_nms(boxes_i, scores_i, labels_i, self.nms_threshold)[: self.detections_per_image]
            results.append({"boxes": boxes_i[keep], "labels": labels_i[keep], "scores": scores_i[keep]})
        return results

    def _select_per_class(self, levels: Sequence[tuple[Tensor, Tensor]],
                          image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """``selection: per_class``: the ``topk_candidates`` best boxes of each class over all levels."""
        scores = torch.cat([level[0] for level in levels], dim=1)
        boxes = torch.cat([level[1] for level in levels], dim=1)
        num_boxes, num_classes = scores.shape[1:]
        k = min(self.topk_candidates, num_boxes)
        results = []
        for scores_i, boxes_i, size in zip(scores, boxes, image_sizes):
            per_class = scores_i.t()  # [K, M]
            # Scores at or below the threshold sink below every kept one, so the top k of the rest is unchanged.
            per_class = per_class.masked_fill(per_class <= self.score_threshold, -1.0)
            top_scores, top_idx = per_class.topk(k, dim=1)  # [K, k], class-major as the candidates are listed
            keep = top_scores > self.score_threshold
            labels = torch.arange(1, num_classes + 1, device=scores.device)[:, None].expand_as(top_idx)[keep]
            scores_k, boxes_k = top_scores[keep], clip_boxes_to_image(boxes_i[top_idx[keep]], size)
            keep = batched_nms(boxes_k, scores_k, labels, self.nms_threshold)[: self.detections_per_image]
            results.append({"boxes": boxes_k[keep], "labels": labels[keep], "scores": scores_k[keep]})
        return results

    def describe(self) -> ModelInfo:
        """Detection of the head's ``num_classes``, with the detector's test-time filters."""
        return ModelInfo(
            task="detection",
            num_classes=int(self.head.num_classes),
            score_threshold=self.score_threshold,
            detections_per_image=self.detections_per_image,
            test_settings={"min_size": self.min_size, "max_size": self.max_size, "topk_candidates": self.topk_candidates,
                           "nms_threshold": self.nms_threshold, "selection": self.selection,
                           **({"fixed_size": list(self.preprocessor.fixed_size)} if self.preprocessor.fixed_size else {})},
            feature_strides=self.feature_strides(),
        )
