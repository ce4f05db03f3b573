"""Mask heads: per-RoI instance masks for the R-CNN RoI head (Mask R-CNN)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.errors import ConfigError
from segkit.ops import MultiLevelRoIAlign, ShapeSpec, shared_channels
from segkit.ops.masks import project_masks_on_boxes
from segkit.registry import HEADS
from segkit.ops.conv import conv_norm_act
from segkit.ops.norm import check_norm

__all__ = ["MaskRCNNHead"]

DEFAULT_FEATURES = ("p2", "p3", "p4", "p5")


@HEADS.register()
class MaskRCNNHead(nn.Module):
    """The Mask R-CNN FCN mask head.

    RoIs are pooled (RoIAlign, ``pooler_resolution`` = 14) from the pyramid, passed through
    ``num_convs`` 3x3 convs of ``conv_dim`` channels (each with an optional norm, then ReLU), a 2x2
    stride-2 transposed conv with ReLU (14 -> 28) and a 1x1 conv giving one mask logit map per class
    (or a single one with ``class_agnostic``).

    Training: the targets of each positive RoI are its matched ground-truth mask cut out by the RoI
    and resized to 28x28 with RoIAlign (the covered fraction of each bin, as torchvision), or
    thresholded at ``target_threshold`` when one is set (as Detectron2 / MMDetection). ``loss_mask``
    is the binary cross-entropy of the logits of the RoI's ground-truth class, averaged over pixels
    and RoIs, times ``loss_weight``.

    Inference: the detections' boxes are pooled and the sigmoid of the map of each detection's
    class is returned as ``roi_masks`` (Tensor[D, 1, 28, 28]); the detector pastes them into the
    image (:func:`segkit.ops.masks.paste_masks_in_image`) as ``masks``. ``mask_threshold`` is the
    probability from which a pixel counts as the object, used by evaluation and visualisation.

    It is called by :class:`StandardRoIHead` as ``head(features, instances, targets)`` (see there).

    Args:
        in_shapes: the neck's ``output_shape()``; pooled maps must share a channel count.
        num_classes: foreground classes K (set by the RoI head).
        in_features / pooler_resolution / pooler_sampling_ratio / pooler_aligned: the RoI pooler.
        num_convs / conv_dim: the 3x3 conv stack.
        norm: ``None``, ``"BN"``, ``"SyncBN"``, ``"GN"`` or ``"FrozenBN"`` after every conv of the
            stack (the convs then have no bias).
        class_agnostic: predict one mask per RoI instead of one per class.
        loss_weight: factor of ``loss_mask``.
        target_threshold: binarise the 28x28 targets at this value (``None``: soft targets).
        mask_threshold: probability threshold of a mask pixel at test time.
        max_train_rois: train on at most this many positive RoIs per image (a random subset; the
            head's cost grows with their number); ``None`` uses all of them.

    Example:
        >>> head = MaskRCNNHead(in_shapes={"p2": ShapeSpec(64, 4)}, num_classes=3, in_features=["p2"],
        ...                     conv_dim=32)
        >>> det = head.eval()({"p2": torch.rand(1, 64, 32, 32)},
        ...                   [{"boxes": torch.tensor([[8.0, 8.0, 60.0, 40.0]]), "labels": torch.tensor([2])}])
        >>> det[0]["roi_masks"].shape
        torch.Size([1, 1, 28, 28])
    """

    def __init__(
        self,
        *,
        in_shapes: Mapping[str, ShapeSpec],
        num_classes: int,
        in_features: Sequence[str] = DEFAULT_FEATURES,
        pooler_resolution: int = 14,
        pooler_sampling_ratio: int = 2,
        pooler_aligned: bool = False,
        num_convs: int = 4,
        conv_dim: int = 256,
        norm: str | None = None,
        class_agnostic: bool = False,
        loss_weight: float = 1.0,
        target_threshold: float | None = None,
        mask_threshold: float = 0.5,
        max_train_rois: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        check_norm(norm, owner="mask head")
        if num_convs < 0:
            raise ValueError(f"num_convs must be >= 0, got {num_convs}")
        if max_train_rois is not None and max_train_rois < 1:
            raise ValueError(f"max_train_rois must be >= 1 or null (all positive RoIs), got {max_train_rois}")
        if not 0.0 <= mask_threshold <= 1.0:
            raise ValueError(f"mask_threshold is a probability in [0, 1], got {mask_threshold}")
        channels = shared_channels(in_shapes, in_features, owner="the mask RoI pooler")
        self.in_features = tuple(in_features)
        self.num_classes = int(num_classes)
        self.class_agnostic = bool(class_agnostic)
        self.loss_weight = float(loss_weight)
        self.target_threshold = None if target_threshold is None else float(target_threshold)
        self.mask_threshold = float(mask_threshold)
        self.max_train_rois = None if max_train_rois is None else int(max_train_rois)
        self.pooler = MultiLevelRoIAlign(
            strides=[in_shapes[f].stride for f in in_features],
            output_size=pooler_resolution,
            sampling_ratio=pooler_sampling_ratio,
            aligned=pooler_aligned,
        )
        self.convs = nn.ModuleList()
        for _ in range(num_convs):
            self.convs.append(conv_norm_act(channels, conv_dim, 3, norm=norm, init="default"))  # initialised below
            channels = conv_dim
        self.deconv = nn.ConvTranspose2d(channels, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, 1 if class_agnostic else num_classes, 1)
        for module in [*self.convs.modules(), self.deconv]:
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def pool(self, feats: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        """RoI features for :meth:`layers`: Tensor[R, C, S, S], each box from the level of its size."""
        return self.pooler(feats, boxes)

    def layers(self, x: Tensor) -> Tensor:
        """Mask logits Tensor[R, K or 1, 2S, 2S] of pooled features Tensor[R, C, S, S]."""
        for conv in self.convs:
            x = F.relu(conv(x), inplace=True)
        return self.predictor(F.relu(self.deconv(x), inplace=True))

    def forward(
        self,
        features: Mapping[str, Tensor],
        instances: Sequence[Mapping[str, Tensor]],
        targets: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: ``{"loss_mask"}`` for the positive RoIs in ``instances`` (per image
        ``proposal_boxes``, ``labels``, ``matched_idxs``) against ``targets[i]["masks"]``.
        Inference: the ``instances`` (detections with ``boxes`` and ``labels``) with ``roi_masks`` added.
        Boxes are in the pixels of the padded batch (as the features)."""
        feats = [features[f] for f in self.in_features]
        if self.training:
            if targets is None:
                raise ValueError("the mask head needs targets in training mode")
            return self._loss(feats, instances, targets)
        boxes = [inst["boxes"] for inst in instances]
        logits = self.layers(self.pool(feats, boxes))
        labels = torch.cat([inst["labels"] for inst in instances])
        probs = self._select(logits, labels).float().sigmoid()[:, None]  # float32 under mixed precision too
        return [{**inst, "roi_masks": p} for inst, p in zip(instances, probs.split([b.shape[0] for b in boxes]))]

    def _select(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The logit map of each RoI's class, Tensor[R, M, M]."""
        if self.class_agnostic:
            return logits[:, 0]
        return logits[torch.arange(labels.shape[0], device=logits.device), labels - 1]

    def _subsample(self, instances: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        count = len(instances["labels"])
        if self.max_train_rois is None or count <= self.max_train_rois:
            return instances
        keep = torch.randperm(count, device=instances["labels"].device)[: self.max_train_rois]
        return {key: value[keep] for key, value in instances.items()}

    def _loss(
        self,
        feats: Sequence[Tensor],
        instances: Sequence[Mapping[str, Tensor]],
        targets: Sequence[Mapping[str, Tensor]],
    ) -> dict[str, Tensor]:
        if self.max_train_rois is not None:
            instances = [self._subsample(inst) for inst in instances]
        boxes = [inst["proposal_boxes"] for inst in instances]
        logits = self.layers(self.pool(feats, boxes))
        labels = torch.cat([inst["labels"] for inst in instances])
        if labels.numel() == 0:
            return {"loss_mask": logits.sum() * 0}
        side = logits.shape[-1]
        mask_targets = []
        for i, (inst, target) in enumerate(zip(instances, targets)):
            masks = target.get("masks")
            if masks is None:
                raise ConfigError(
                    f"targets[{i}] has no 'masks', but the model has a mask head; train on a dataset with "
                    f"instance masks (with_masks: true) or remove roi_head.mask_head from the model",
                    key="data.train.with_masks")
            if len(inst["proposal_boxes"]):
                mask_targets.append(project_masks_on_boxes(masks, inst["proposal_boxes"], inst["matched_idxs"], side))
        mask_targets_t = torch.cat(mask_targets)
        if self.target_threshold is not None:
            mask_targets_t = (mask_targets_t >= self.target_threshold).to(mask_targets_t.dtype)
        loss = F.binary_cross_entropy_with_logits(self._select(logits, labels), mask_targets_t)
        return {"loss_mask": loss * self.loss_weight}
