"""A YOLO-style dense head after YOLOX (Ge et al., "YOLOX: Exceeding YOLO Series in 2021"): anchor-free,
one prediction per grid cell of every level, decoupled classification and regression branches, SimOTA
label assignment (:mod:`segkit_plugins.heads.simota`), objectness and IoU-aware class targets.

The head follows the dense-head protocol of :class:`~segkit.models.one_stage.OneStageDetector`: it
scores and decodes every cell, and the detector selects the detections.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from segkit.ops import ShapeSpec, shared_channels
from segkit.ops.conv import conv_norm_act
from segkit.ops.labels import check_labels, check_num_classes
from segkit.registry import HEADS
from segkit_plugins.heads.simota import simota_assign

__all__ = ["YOLOHead", "paired_iou"]

_BOX_LOSSES = ("iou", "giou")
_ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU}
# exp() of a larger width/height offset would exceed 1000/16 strides: the same clip as torchvision's BoxCoder.
_MAX_LOG_SIZE = math.log(1000.0 / 16)


@HEADS.register()
class YOLOHead(nn.Module):
    """YOLOX-style head: for every level a 1x1 stem conv to ``feat_channels``, then two branches of
    ``num_convs`` 3x3 conv + norm + activation layers: the classification branch ends in a 1x1 conv
    giving K class logits, the regression branch in 1x1 convs giving four box offsets and one
    objectness logit per grid cell. Each level has its own weights (as YOLOX: its levels' statistics
    differ, and the norms stay per level) unless ``share_levels``, which uses one set for every level
    and then needs one channel count. The class and objectness biases start at
    ``-log((1 - prior_probability) / prior_probability)``.

    Decoding: a cell at column ``i``, row ``j`` of a level with stride ``s`` and offsets
    ``(dx, dy, dw, dh)`` predicts the box centred at ``((i + 0.5 + dx) s, (j + 0.5 + dy) s)`` of width
    ``exp(dw) s`` and height ``exp(dh) s`` (``dw``, ``dh`` clipped at ``log(1000/16)``); its score for class
    ``c`` is ``sigmoid(obj) * sigmoid(cls_c)``.

    Training: SimOTA (:func:`~segkit_plugins.heads.simota.simota_assign`) assigns cells to boxes per
    image: candidates are the cells whose centre is inside a box or within ``center_radius`` strides of
    its centre, the cost is the class cost + ``iou_weight`` x ``-log IoU`` + a large cost unless the cell
    is inside both the box and its centre region, and each box takes its ``k`` cheapest cells, ``k`` the
    integer part of the sum of its ``simota_topk`` best IoUs (at least 1). Losses, each summed over the
    batch and divided by the batch's number of assigned cells (at least 1; per process, as the other
    heads): ``loss_obj``, binary cross-entropy of the objectness of every cell against 1 for assigned
    cells and 0 elsewhere; ``loss_cls``, binary cross-entropy of the class logits of the assigned cells
    against the one-hot class scaled by the IoU of the cell's predicted box with its box (YOLOX's
    IoU-aware soft target); ``loss_box``, ``box_loss_weight`` x the box loss of the assigned cells'
    decoded boxes: ``"iou"`` is YOLOX's ``1 - IoU**2``, ``"giou"`` the generalised IoU loss.

    Args:
        in_shapes: the neck's ``output_shape()``; each level's stride comes from it.
        num_classes: number of foreground classes K (labels 1..K; one sigmoid per class, no background).
        in_features: maps to predict on, finest first.
        feat_channels: width of the stems and branches.
        num_convs: 3x3 conv layers of each branch.
        norm: ``None`` or a norm name after each conv (YOLOX: ``"BN"``).
        activation: ``"silu"`` (YOLOX) or ``"relu"``.
        share_levels: one set of weights for every level instead of one per level.
        prior_probability: the initial probability of every class and of objectness.
        center_radius: SimOTA's centre region, in strides (2.5 in YOLOX).
        simota_topk: how many of a box's best IoUs give its number of cells (10 in YOLOX).
        iou_weight: the IoU cost's weight in SimOTA's cost (3 in YOLOX).
        box_loss: ``"iou"`` or ``"giou"``.
        box_loss_weight / obj_loss_weight / cls_loss_weight: weights of the three losses (YOLOX: 5, 1, 1).

    Example:
        >>> head = YOLOHead(in_shapes={"p3": ShapeSpec(8, 8)}, num_classes=3, in_features=("p3",), feat_channels=16)
        >>> levels, _ = head.eval()({"p3": torch.rand(1, 8, 4, 4)}, (32, 32))
        >>> [tuple(t.shape) for t in levels[0]]
        [(1, 16, 3), (1, 16, 4)]
    """

    def __init__(
        self,
        *,
        in_shapes: Mapping[str, ShapeSpec],
        num_classes: int,
        in_features: Sequence[str] = ("p3", "p4", "p5"),
        feat_channels: int = 256,
        num_convs: int = 2,
        norm: str | None = "BN",
        activation: str = "silu",
        share_levels: bool = False,
        prior_probability: float = 0.01,
        center_radius: float = 2.5,
        simota_topk: int = 10,
        iou_weight: float = 3.0,
        box_loss: str = "iou",
        box_loss_weight: float = 5.0,
        obj_loss_weight: float = 1.0,
        cls_loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        _check_options(num_classes, in_shapes, in_features, feat_channels, num_convs, activation, prior_probability,
                       center_radius, simota_topk, box_loss)
        self.num_classes = int(num_classes)
        self.in_features = tuple(in_features)
        self.strides = tuple(int(in_shapes[f].stride) for f in in_features)
        self.share_levels = bool(share_levels)
        if share_levels:
            in_channels = [shared_channels(in_shapes, in_features, owner="YOLOHead with share_levels")]
        else:
            in_channels = [in_shapes[f].channels for f in in_features]
        act = _ACTIVATIONS[activation]
        self.stems = nn.ModuleList(_block(c, feat_channels, 1, norm, act) for c in in_channels)
        self.cls_convs = nn.ModuleList(_branch(feat_channels, num_convs, norm, act) for _ in in_channels)
        self.reg_convs = nn.ModuleList(_branch(feat_channels, num_convs, norm, act) for _ in in_channels)
        self.cls_preds = nn.ModuleList(nn.Conv2d(feat_channels, self.num_classes, 1) for _ in in_channels)
        self.reg_preds = nn.ModuleList(nn.Conv2d(feat_channels, 4, 1) for _ in in_channels)
        self.obj_preds = nn.ModuleList(nn.Conv2d(feat_channels, 1, 1) for _ in in_channels)
        bias = -math.log((1 - prior_probability) / prior_probability)
        for conv in (*self.cls_preds, *self.obj_preds):
            nn.init.constant_(conv.bias, bias)
        self.center_radius = float(center_radius)
        self.simota_topk = int(simota_topk)
        self.iou_weight = float(iou_weight)
        self.box_loss = box_loss
        self.loss_weights = {"obj": float(obj_loss_weight), "cls": float(cls_loss_weight), "box": float(box_loss_weight)}

    def predict(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Raw outputs per level, cells in row-major order: class logits Tensor[N, H*W, K], box offsets
        Tensor[N, H*W, 4] ``(dx, dy, dw, dh)`` and objectness logits Tensor[N, H*W]."""
        logits, offsets, objectness = [], [], []
        for level, feature in enumerate(features):
            i = 0 if self.share_levels else level
            x = self.stems[i](feature)
            cls_feat, reg_feat = self.cls_convs[i](x), self.reg_convs[i](x)
            logits.append(self.cls_preds[i](cls_feat).flatten(2).transpose(1, 2))
            offsets.append(self.reg_preds[i](reg_feat).flatten(2).transpose(1, 2))
            objectness.append(self.obj_preds[i](reg_feat).flatten(1))
        return logits, offsets, objectness

    def cell_centers(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level, the centre ``(x, y)`` of every cell Tensor[H*W, 2] in input pixels (row-major) and
        the level's stride for each cell Tensor[H*W]."""
        centers, strides = [], []
        for feature, stride in zip(features, self.strides):
            h, w = feature.shape[-2:]
            ys = (torch.arange(h, device=feature.device, dtype=torch.float32) + 0.5) * stride
            xs = (torch.arange(w, device=feature.device, dtype=torch.float32) + 0.5) * stride
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            centers.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=1))
            strides.append(torch.full((h * w,), float(stride), device=feature.device))
        return centers, strides

    @staticmethod
    def decode(offsets: Tensor, centers: Tensor, strides: Tensor) -> Tensor:
        """Boxes Tensor[..., A, 4] (xyxy pixels, float32) from offsets Tensor[..., A, 4], cell centres
        Tensor[A, 2] and strides Tensor[A] (see the class docstring)."""
        offsets = offsets.float()
        xy = centers + offsets[..., :2] * strides[:, None]
        half = offsets[..., 2:].clamp(max=_MAX_LOG_SIZE).exp() * strides[:, None] / 2
        return torch.cat((xy - half, xy + half), dim=-1)

    def forward(
        self,
        features: Mapping[str, Tensor],
        padded_size: Sequence[int],
        targets: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> tuple[list[tuple[Tensor, Tensor]], dict[str, Tensor]]:
        """Score and decode every cell, or compute the losses in training.

        Args:
            features: maps by name, each Tensor[N, C, H_l, W_l].
            padded_size: ``(height, width)`` of the padded batch (the cells follow from the maps).
            targets: in training, per image ``boxes`` Tensor[G, 4] (xyxy, padded-batch pixels) and
                ``labels`` Tensor[G] (int64, 1..K); ``G`` may be 0.

        Returns:
            ``(levels, losses)``. In training ``([], {"loss_obj", "loss_cls", "loss_box"})``; at inference
            one ``(scores, boxes)`` per level and ``{}``: scores Tensor[N, H_l*W_l, K] (float32,
            ``sigmoid(obj) * sigmoid(cls)``), boxes Tensor[N, H_l*W_l, 4] (xyxy padded-batch pixels, not clipped).
        """
        feats = [features[f] for f in self.in_features]
        logits, offsets, objectness = self.predict(feats)
        centers, strides = self.cell_centers(feats)
        boxes = [self.decode(o, c, s) for o, c, s in zip(offsets, centers, strides)]
        if self.training:
            if targets is None:
                raise ValueError("the YOLO head needs targets in training mode")
            return [], self.losses(torch.cat(logits, 1), torch.cat(objectness, 1), torch.cat(boxes, 1),
                                   torch.cat(centers), torch.cat(strides), targets)
        levels = [(torch.sigmoid(obj.float())[..., None] * torch.sigmoid(cls.float()), box)
                  for cls, obj, box in zip(logits, objectness, boxes)]
        return levels, {}

    def losses(self, logits: Tensor, objectness: Tensor, boxes: Tensor, centers: Tensor, strides: Tensor,
               targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Objectness, class and box losses (see the class docstring).

        Args:
            logits: Tensor[N, A, K]; objectness: Tensor[N, A]; boxes: Tensor[N, A, 4] (decoded, xyxy).
            centers: Tensor[A, 2] and strides: Tensor[A] of the cells, shared by all images.
            targets: per image ``boxes`` Tensor[G_i, 4] and ``labels`` Tensor[G_i] (1..K).

        Returns:
            ``{"loss_obj": scalar, "loss_cls": scalar, "loss_box": scalar}`` (float32).
        """
        logits, objectness = logits.float(), objectness.float()
        scores = (torch.sigmoid(logits) * torch.sigmoid(objectness)[..., None]).detach()
        foreground, cls_targets, box_targets = [], [], []
        for i, target in enumerate(targets):
            gt_boxes, labels = target["boxes"].float(), self._classes(target["labels"])
            fg, matched_gt, matched_iou = simota_assign(
                scores[i], boxes[i].detach(), centers, strides, gt_boxes, labels, center_radius=self.center_radius,
                topk_candidates=self.simota_topk, iou_weight=self.iou_weight)
            foreground.append(fg)
            cls_targets.append(F.one_hot(labels[matched_gt], self.num_classes).float() * matched_iou[:, None])
            box_targets.append(gt_boxes[matched_gt])
        foreground = torch.stack(foreground)
        num_foreground = max(int(foreground.sum()), 1)
        loss_obj = F.binary_cross_entropy_with_logits(objectness, foreground.float(), reduction="sum")
        loss_cls = F.binary_cross_entropy_with_logits(logits[foreground], torch.cat(cls_targets), reduction="sum")
        loss_box = self._box_losses(boxes[foreground], torch.cat(box_targets)).sum()
        # Every output stays in the graph when no cell is assigned (images without boxes).
        keep_graph = logits.sum() * 0.0 + boxes.sum() * 0.0
        return {"loss_obj": self.loss_weights["obj"] * loss_obj / num_foreground,
                "loss_cls": self.loss_weights["cls"] * loss_cls / num_foreground + keep_graph,
                "loss_box": self.loss_weights["box"] * loss_box / num_foreground + keep_graph}

    def _classes(self, labels: Tensor) -> Tensor:
        """0-based classes of labels 1..K, checked."""
        return check_labels(labels, self.num_classes) - 1

    def _box_losses(self, boxes: Tensor, gt_boxes: Tensor) -> Tensor:
        """The box loss of each assigned cell, Tensor[F] (float32)."""
        if self.box_loss == "giou":
            return generalized_box_iou_loss(boxes, gt_boxes, reduction="none", eps=1e-7)
        return 1.0 - paired_iou(boxes, gt_boxes) ** 2


def paired_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of each box of Tensor[M, 4] with the box at the same index of Tensor[M, 4] (xyxy), Tensor[M]."""
    top_left = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).prod(1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).prod(1)
    return inter / (area1 + area2 - inter).clamp(min=1e-7)


def _block(in_channels: int, out_channels: int, kernel_size: int, norm: str | None, act: type[nn.Module]) -> nn.Sequential:
    """conv (+ norm) + activation, the conv at index 0 and the norm at 1 (:func:`~segkit.ops.conv.conv_norm_act`)."""
    block = conv_norm_act(in_channels, out_channels, kernel_size, norm=norm, init="default", owner="YOLOHead")
    return nn.Sequential(*block, act(inplace=True))


def _branch(channels: int, num_convs: int, norm: str | None, act: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(*(_block(channels, channels, 3, norm, act) for _ in range(num_convs)))


def _check_options(num_classes: int, in_shapes: Mapping[str, ShapeSpec], in_features: Sequence[str],
                   feat_channels: int, num_convs: int, activation: str, prior_probability: float,
                   center_radius: float, simota_topk: int, box_loss: str) -> None:
    """Refuse option values the head cannot use, naming the option."""
    check_num_classes(num_classes)
    missing = [f for f in in_features if f not in in_shapes]
    if not in_features or missing:
        raise ValueError(f"YOLOHead in_features {list(in_features)} must be among the input maps {list(in_shapes)}")
    if feat_channels < 1 or num_convs < 0:
        raise ValueError(f"YOLOHead feat_channels must be >= 1 and num_convs >= 0, got {feat_channels} and {num_convs}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"YOLOHead activation must be one of {', '.join(_ACTIVATIONS)}, got {activation!r}")
    if not 0.0 < prior_probability < 1.0:
        raise ValueError(f"prior_probability is a probability in (0, 1), got {prior_probability}")
    if center_radius <= 0 or simota_topk < 1:
        raise ValueError(f"YOLOHead center_radius must be > 0 and simota_topk >= 1, got {center_radius} and {simota_topk}")
    if box_loss not in _BOX_LOSSES:
        raise ValueError(f"YOLOHead box_loss must be one of {', '.join(_BOX_LOSSES)}, got {box_loss!r}")
