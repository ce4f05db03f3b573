"""R-CNN RoI heads: classify and refine proposals on pooled pyramid features."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

from segkit.errors import ConfigError
from segkit.ops import BalancedSampler, BoxCoder, Matcher, MultiLevelRoIAlign, ShapeSpec, shared_channels, smooth_l1_loss
from segkit.ops.labels import check_labels, check_num_classes
from segkit.registry import HEADS, check_arguments

__all__ = ["StandardRoIHead"]

_DEFAULT_FEATURES = ("p2", "p3", "p4", "p5")
_DEFAULT_RESOLUTION = 7


@HEADS.register()
class StandardRoIHead(nn.Module):
    """Faster R-CNN box branch: RoIAlign, a box head, and a class-specific box predictor.

    In training the ground-truth boxes are added to the proposals, proposals are matched to the
    ground truth (IoU ``>= fg_iou_threshold`` foreground with the box's label,
    ``< bg_iou_threshold`` background) and ``batch_size_per_image`` are sampled. Losses:
    ``loss_cls`` (cross-entropy over the K + 1 classes, mean over sampled RoIs) and
    ``loss_box_reg`` (smooth L1 of the deltas of each positive's true class, summed, divided by the
    number of sampled RoIs). At inference the class probabilities (softmax) and per-class boxes are
    computed, boxes clipped to the image, background dropped, scores ``<= score_threshold`` and
    boxes with a side ``< min_box_size`` removed, NMS applied per class, and the
    ``detections_per_image`` best kept.

    A box head whose ``adaptive_pooling`` attribute is true (PANet's adaptive feature pooling) gets
    every RoI pooled from every level, Tensor[L, R, C, S, S] (finest first), instead of from the
    level of its size; built from a config, a box head whose constructor takes ``num_levels`` is
    given ``len(in_features)``.

    An optional ``mask_head`` (any module following this protocol) extends the head to instance
    masks: in training it is called as ``mask_head(features, instances, targets)`` with, per image,
    the sampled foreground RoIs ``{"proposal_boxes": Tensor[P, 4], "labels": Tensor[P],
    "matched_idxs": Tensor[P]}`` (indices into that image's target boxes) and returns a dict of
    ``loss_*`` scalars; at inference it is called as ``mask_head(features, detections, None)`` and
    returns the detections with ``roi_masks`` added (Tensor[D, 1, M, M] probabilities inside each
    box, which the detector pastes into the image as ``masks``). Built from a config, the mask head
    gets ``in_shapes`` and ``num_classes`` from this head.

    Args:
        in_shapes: the neck's ``output_shape()``; the pooled maps must share one channel count.
        num_classes: number of foreground classes K (labels 1..K; the classifier has K + 1 outputs).
        box_head: module mapping pooled features ``[R, C, S, S]`` to ``[R, D]``; it must expose
            ``out_channels`` (D). Built from the config's ``box_head`` (default ``TwoFCHead``).
        in_features: maps to pool from, finest first, consecutive power-of-two strides.
        pooler_resolution: side S of the pooled features.
        pooler_sampling_ratio: RoIAlign sampling points per bin side.
        pooler_aligned: RoIAlign half-pixel alignment.
        fg_iou_threshold / bg_iou_threshold: matcher thresholds.
        batch_size_per_image / positive_fraction: RoI sampling.
        box_coder_weights: ``(wx, wy, ww, wh)`` of the box deltas.
        smooth_l1_beta: beta of the box loss.
        score_threshold / nms_threshold / detections_per_image / min_box_size: inference filters.
        mask_head: optional instance-mask head (see above).
    """

    def __init__(
        self,
        *,
        in_shapes: Mapping[str, ShapeSpec],
        num_classes: int,
        box_head: nn.Module,
        in_features: Sequence[str] = _DEFAULT_FEATURES,
        pooler_resolution: int = _DEFAULT_RESOLUTION,
        pooler_sampling_ratio: int = 2,
        pooler_aligned: bool = False,
        fg_iou_threshold: float = 0.5,
        bg_iou_threshold: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        box_coder_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        smooth_l1_beta: float = 1.0 / 9,
        score_threshold: float = 0.05,
        nms_threshold: float = 0.5,
        detections_per_image: int = 100,
        min_box_size: float = 1e-2,
        mask_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        shared_channels(in_shapes, in_features, owner="the RoI pooler")
        feature_dim = getattr(box_head, "out_channels", None)
        if not isinstance(feature_dim, int):
            raise ValueError(f"the box head {type(box_head).__name__} must expose its output size as `out_channels`")
        self.num_classes = check_num_classes(num_classes)
        self.in_features = tuple(in_features)
        self.pooler = MultiLevelRoIAlign(
            strides=[in_shapes[f].stride for f in in_features],
            output_size=pooler_resolution,
            sampling_ratio=pooler_sampling_ratio,
            aligned=pooler_aligned,
        )
        self.box_head = box_head
        self.cls_score = nn.Linear(feature_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(feature_dim, (num_classes + 1) * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.mask_head = mask_head

        self.matcher = Matcher(high_threshold=fg_iou_threshold, low_threshold=bg_iou_threshold)
        self.sampler = BalancedSampler(batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction)
        self.box_coder = BoxCoder(weights=box_coder_weights)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.detections_per_image = int(detections_per_image)
        self.min_box_size = float(min_box_size)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, path: str, **defaults: Any) -> StandardRoIHead:
        """Build the box head (``box_head``, default ``{"type": "TwoFCHead"}``) and optional
        ``mask_head`` from their configs, then the RoI head."""
        kwargs = {**defaults, **cfg}
        box_cfg = kwargs.pop("box_head", {"type": "TwoFCHead"})
        mask_cfg = kwargs.pop("mask_head", None)
        check_arguments(cls, kwargs, path=path, type_name=cls.__name__, kind="head", provided=("box_head", "mask_head"))
        in_shapes = kwargs["in_shapes"]
        try:
            channels = shared_channels(in_shapes, kwargs.get("in_features", _DEFAULT_FEATURES), owner="the RoI pooler")
        except ValueError as exc:
            raise ConfigError(str(exc), key=f"{path}.in_features" if path else "in_features") from exc
        if isinstance(box_cfg, nn.Module):
            kwargs["box_head"] = box_cfg
        else:
            box_defaults: dict[str, Any] = {
                "in_channels": channels, "resolution": kwargs.get("pooler_resolution", _DEFAULT_RESOLUTION)}
            if isinstance(box_cfg, Mapping) and "num_levels" in _parameters(HEADS, box_cfg.get("type")):
                box_defaults["num_levels"] = len(kwargs.get("in_features", _DEFAULT_FEATURES))
            kwargs["box_head"] = HEADS.build_child(box_cfg, path=f"{path}.box_head", **box_defaults)
        if isinstance(mask_cfg, Mapping):
            kwargs["mask_head"] = HEADS.build_child(mask_cfg, path=f"{path}.mask_head", in_shapes=in_shapes,
                                                    num_classes=kwargs.get("num_classes"))
        elif mask_cfg is not None:
            kwargs["mask_head"] = mask_cfg
        return cls(**kwargs)

    def forward(
        self,
        features: Mapping[str, Tensor],
        proposals: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """Classify and refine proposals; compute losses in training.

        Args:
            features: maps by name, each Tensor[N, C, H_l, W_l].
            proposals: one Tensor[P_i, 4] per image, xyxy pixels of the padded batch.
            image_sizes: ``(height, width)`` of each image inside the padded batch.
            targets: in training, per image ``boxes`` Tensor[G, 4] (xyxy) and ``labels`` Tensor[G]
                (int64, 1..K).

        Returns:
            ``(detections, losses)``. In training detections is ``[]`` and losses holds
            ``loss_cls`` and ``loss_box_reg`` (plus the mask head's). At inference losses is ``{}``
            and each detection dict holds ``boxes`` Tensor[D, 4] (xyxy, padded-batch pixels),
            ``labels`` Tensor[D] (int64, 1..K) and ``scores`` Tensor[D] (float), best first.
        """
        feats = [features[f] for f in self.in_features]
        if self.training:
            if targets is None:
                raise ValueError("the RoI head needs targets in training mode")
            check_labels(torch.cat([t["labels"].reshape(-1) for t in targets]), self.num_classes)
            proposals, labels, gt_boxes, matched_idxs = self._sample(proposals, targets)
        if getattr(self.box_head, "adaptive_pooling", False):
            x = self.box_head(self.pooler.pool_all_levels(feats, proposals))
        else:
            x = self.box_head(self.pooler(feats, proposals))
        class_logits, box_deltas = self.cls_score(x), self.bbox_pred(x)
        if not self.training:
            detections = self._postprocess(class_logits, box_deltas, proposals, image_sizes)
            if self.mask_head is not None:
                detections = self.mask_head(features, detections, None)
            return detections, {}
        losses = self._losses(class_logits, box_deltas, proposals, labels, gt_boxes)
        if self.mask_head is not None:
            instances = [
                {"proposal_boxes": p[lab > 0], "labels": lab[lab > 0], "matched_idxs": m[lab > 0]}
                for p, lab, m in zip(proposals, labels, matched_idxs)
            ]
            losses.update(self.mask_head(features, instances, targets))
        return [], losses

    def _sample(
        self, proposals: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Add the ground truth to the proposals, match and sample them.

        Returns per image: sampled RoIs Tensor[S, 4], their labels Tensor[S] (int64, 0 = background),
        their matched ground-truth boxes Tensor[S, 4] and matched ground-truth indices Tensor[S].
        """
        rois, labels, gt_boxes, matched = [], [], [], []
        for props, target in zip(proposals, targets):
            gt = target["boxes"].to(props.dtype)
            props = torch.cat([props, gt])
            matched_idxs, match_labels = self.matcher(box_iou(gt, props))
            if len(gt):
                classes = target["labels"].to(torch.int64)[matched_idxs]
            else:
                classes = torch.zeros(len(props), dtype=torch.int64, device=props.device)
            classes = torch.where(match_labels == 1, classes, match_labels.to(torch.int64))
            pos, neg = self.sampler(classes)
            sampled = torch.cat([pos, neg])
            rois.append(props[sampled])
            labels.append(classes[sampled])
            gt_boxes.append(gt[matched_idxs[sampled]] if len(gt) else torch.zeros_like(props[sampled]))
            matched.append(matched_idxs[sampled])
        return rois, labels, gt_boxes, matched

    def _losses(
        self,
        class_logits: Tensor,
        box_deltas: Tensor,
        rois: Sequence[Tensor],
        labels: Sequence[Tensor],
        gt_boxes: Sequence[Tensor],
    ) -> dict[str, Tensor]:
        labels_all = torch.cat(labels)
        if labels_all.numel() == 0:  # no RoI in the batch (no proposal, no ground truth): nothing to learn
            zero = class_logits.sum() * 0.0 + box_deltas.sum() * 0.0
            return {"loss_cls": zero, "loss_box_reg": zero.clone()}
        loss_cls = F.cross_entropy(class_logits, labels_all)
        pos = torch.nonzero(labels_all > 0).squeeze(1)
        deltas = box_deltas.reshape(len(labels_all), self.num_classes + 1, 4)[pos, labels_all[pos]]
        targets = self.box_coder.encode(torch.cat(gt_boxes)[pos], torch.cat(rois)[pos])
        loss_box = smooth_l1_loss(deltas, targets, beta=self.smooth_l1_beta, reduction="sum")
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box / max(labels_all.numel(), 1)}

    def _postprocess(
        self,
        class_logits: Tensor,
        box_deltas: Tensor,
        proposals: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        num_per_image = [p.shape[0] for p in proposals]  # shape, not len(): traced as sizes (export)
        boxes = self.box_coder.decode(box_deltas, torch.cat(list(proposals)))
        # The class count, not -1: a batch without proposals has 0 rows, where -1 is ambiguous.
        boxes = boxes.reshape(boxes.shape[0], self.num_classes + 1, 4).split(num_per_image)
        scores = F.softmax(class_logits.float(), -1).split(num_per_image)  # float32 under mixed precision too
        results = []
        for boxes_i, scores_i, size in zip(boxes, scores, image_sizes):
            boxes_i = clip_boxes_to_image(boxes_i, size)[:, 1:].reshape(-1, 4)
            labels_i = torch.arange(1, self.num_classes + 1, device=boxes_i.device).repeat(scores_i.shape[0])
            scores_i = scores_i[:, 1:].reshape(-1)
            keep = torch.nonzero(scores_i > self.score_threshold).squeeze(1)
            keep = keep[remove_small_boxes(boxes_i[keep], self.min_box_size)]
            boxes_i, scores_i, labels_i = boxes_i[keep], scores_i[keep], labels_i[keep]
            keep = batched_nms(boxes_i, scores_i, labels_i, self.nms_threshold)[: self.detections_per_image]
            results.append({"boxes": boxes_i[keep], "labels": labels_i[keep], "scores": scores_i[keep]})
        return results


def _parameters(registry: Any, type_name: Any) -> set[str]:
    """Constructor parameter names of a registered component (empty if it cannot be inspected)."""
    try:
        return set(inspect.signature(registry.get(str(type_name))).parameters)
    except (TypeError, ValueError, ConfigError):
        return set()
