"""torchvision models that ``segkit bench --compare torchvision`` times beside segkit's: which
config matches which model (:data:`REFERENCES`), the settings of segkit's model changed to match
torchvision's architecture, and the torchvision model built with its weights loaded into segkit's.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.errors import UserError


@dataclass(frozen=True)
class Reference:
    """A torchvision model that a segkit config can be compared with.

    Attributes:
        title: what the model is (``"Mask R-CNN R50-FPN"``).
        builder: the torchvision function (``"torchvision.models.detection.maskrcnn_resnet50_fpn"``).
        example_config: a shipped config that matches it.
        same_weights: whether both models run with identical weights.
    """

    title: str
    builder: str
    example_config: str
    same_weights: bool = True


REFERENCES: dict[str, Reference] = {
    "fasterrcnn_resnet50_fpn": Reference("Faster R-CNN R50-FPN", "torchvision.models.detection.fasterrcnn_resnet50_fpn",
                                         "configs/faster_rcnn_r50_fpn_coco.yaml"),
    "maskrcnn_resnet50_fpn": Reference("Mask R-CNN R50-FPN", "torchvision.models.detection.maskrcnn_resnet50_fpn",
                                       "configs/mask_rcnn_r50_fpn_coco.yaml"),
    "retinanet_resnet50_fpn": Reference("RetinaNet R50-FPN", "torchvision.models.detection.retinanet_resnet50_fpn",
                                        "configs/retinanet_r50_fpn_coco.yaml"),
    "fcos_resnet50_fpn": Reference("FCOS R50-FPN", "torchvision.models.detection.fcos_resnet50_fpn",
                                   "configs/fcos_r50_fpn_coco.yaml"),
    "fcn_resnet50": Reference("FCN R50-D8", "torchvision.models.segmentation.fcn_resnet50",
                              "configs/fcn_r50_d8_voc.yaml"),
    "deeplabv3_resnet50": Reference("DeepLabV3 R50-D8", "torchvision.models.segmentation.deeplabv3_resnet50",
                                    "configs/deeplabv3_r50_d8_voc.yaml"),
    "ssd300_vgg16": Reference("SSD300 VGG-16", "torchvision.models.detection.ssd300_vgg16",
                              "configs/ssd300_vgg16_coco.yaml"),
}


def reference_for(cfg: Mapping[str, Any]) -> str:
    """The key of :data:`REFERENCES` whose torchvision model matches ``cfg["model"]``.

    Raises:
        UserError: the model has no torchvision equivalent; the message lists those that have one.
    """
    model = cfg.get("model") or {}
    backbone, neck = model.get("backbone") or {}, model.get("neck") or {}
    resnet50 = backbone.get("type") == "ResNet" and backbone.get("depth") == 50
    undilated = list(backbone.get("strides", [1, 2, 2, 2])) == [1, 2, 2, 2] \
        and list(backbone.get("dilations", [1, 1, 1, 1])) == [1, 1, 1, 1]
    if model.get("type") == "TwoStageDetector" and resnet50 and undilated and neck.get("type") == "FPN":
        roi = model.get("roi_head") or {}
        if (model.get("rpn_head") or {}).get("type") == "RPN" and roi.get("type") == "StandardRoIHead":
            mask = roi.get("mask_head")
            if mask is None:
                return "fasterrcnn_resnet50_fpn"
            if mask.get("type") == "MaskRCNNHead":
                return "maskrcnn_resnet50_fpn"
    head = model.get("head") or {}
    if model.get("type") == "OneStageDetector" and resnet50 and undilated and neck.get("type") == "FPN" \
            and neck.get("extra_block") == "p6p7":
        one_stage = {"RetinaNetHead": "retinanet_resnet50_fpn", "FCOSHead": "fcos_resnet50_fpn"}
        if head.get("type") in one_stage:
            return one_stage[head["type"]]
    if model.get("type") == "EncoderDecoder" and resnet50 and not neck:
        semantic = {"FCNHead": "fcn_resnet50", "ASPPHead": "deeplabv3_resnet50"}
        decode_type = (model.get("decode_head") or {}).get("type")
        if decode_type in semantic:
            return semantic[decode_type]
    if model.get("type") == "OneStageDetector" and backbone.get("type") == "VGG" and backbone.get("depth", 16) == 16 \
            and neck.get("type") == "SSDExtraLayers" and head.get("type") == "SSDHead":
        return "ssd300_vgg16"
    described = {"TwoStageDetector": "a TwoStageDetector", "EncoderDecoder": "an EncoderDecoder",
                 "OneStageDetector": "a OneStageDetector"}
    what = described.get(str(model.get("type")), f"a {model.get('type')}")
    parts = f"{backbone.get('type')}-{backbone.get('depth')}" + (f" + {neck.get('type')}" if neck else "")
    choices = "; ".join(f"{r.title} ({name}, e.g. {r.example_config})" for name, r in REFERENCES.items())
    raise UserError(f"--compare torchvision: {getattr(cfg, 'filename', '') or 'this config'} describes {what} on "
                    f"{parts}, which has no torchvision equivalent. Configs that can be compared: {choices}.")


def match_reference(name: str, cfg: dict[str, Any]) -> list[str]:
    """Settings of segkit's model changed to torchvision's architecture, as notes."""
    model = cfg["model"]
    pretrained = model["backbone"].get("pretrained")
    notes = []
    if pretrained is not None:  # replaced by the reference's weights anyway; the file need not exist
        model["backbone"]["pretrained"] = None
        notes.append(f"model.backbone.pretrained {pretrained} -> null (both models get torchvision's weights)")
    if name not in ("fcn_resnet50", "deeplabv3_resnet50"):
        return notes
    # torchvision: 7x7 stem; FCN heads of one 3x3 conv to in_channels / 4 (c5: 512, c4: 256), then a 1x1
    # classifier; DeepLabV3's ASPP on c5 with 256 channels, rates 12, 24, 36, BatchNorm throughout.
    wanted: dict[tuple[str, str], Any] = {("backbone", "stem"): "default", ("decode_head", "in_features"): "c5"}
    if name == "fcn_resnet50":
        wanted.update({("decode_head", "num_convs"): 1, ("decode_head", "channels"): 512,
                       ("decode_head", "kernel_size"): 3})
    else:
        wanted.update({("decode_head", "channels"): 256, ("decode_head", "dilations"): [12, 24, 36],
                       ("decode_head", "norm"): "BN", ("decode_head", "pool_norm"): "same"})
    if isinstance(model.get("auxiliary_head"), Mapping):
        wanted.update({("auxiliary_head", "in_features"): "c4", ("auxiliary_head", "num_convs"): 1,
                       ("auxiliary_head", "channels"): 256, ("auxiliary_head", "kernel_size"): 3})
    defaults = {"stem": "default", "in_features": "c5", "num_convs": 1, "kernel_size": 3,
                "channels": {"decode_head": 512 if name == "fcn_resnet50" else 256, "auxiliary_head": 256},
                "dilations": [12, 24, 36], "norm": "BN", "pool_norm": "same"}
    changed = []
    for (section, key), value in wanted.items():
        default = defaults[key][section] if isinstance(defaults[key], dict) else defaults[key]
        current = model[section].get(key)
        current = default if current is None else current
        current = list(current) if isinstance(current, tuple | list) else current
        if current != value:
            model[section][key] = value
            changed.append(f"model.{section}.{key} {current} -> {value}")
    test_cfg = model.get("test_cfg") or {}
    if test_cfg.get("mode", "whole") != "whole" or test_cfg.get("flip") or list(test_cfg.get("scales", [1.0])) != [1.0]:
        model["test_cfg"] = {"mode": "whole"}
        changed.append("model.test_cfg -> {mode: whole} (single scale, no flip)")
    return notes + ([f"to match torchvision's {name}: {', '.join(changed)}"] if changed else [])


def build_reference(name: str, cfg: Mapping[str, Any], ours: nn.Module, size: tuple[int, int] | None,
                     seed: int) -> nn.Module:
    """torchvision's model for ``name``, with its weights loaded into ``ours`` (proving the match)."""
    torch.manual_seed(seed)
    if name == "fcn_resnet50":
        return _torchvision_fcn(cfg, ours)
    if name == "deeplabv3_resnet50":
        return _torchvision_deeplabv3(cfg, ours)
    from segkit.weights import convert_weights

    builders = {"retinanet_resnet50_fpn": _torchvision_retinanet, "fcos_resnet50_fpn": _torchvision_fcos,
                "ssd300_vgg16": _torchvision_ssd}
    reference = builders.get(name, _torchvision_detector)(name, cfg, size)
    state = convert_weights(reference.state_dict(), "torchvision").state_dict  # the registered converter's map
    _load_or_explain(ours, state, name, cfg)
    return reference


def _load_or_explain(model: nn.Module, state: Mapping[str, Tensor], name: str, cfg: Mapping[str, Any]) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise UserError(f"--compare torchvision: the model of {getattr(cfg, 'filename', '') or 'this config'} differs "
                        f"from torchvision's {name} ({detail[:400]}); compare a config like "
                        f"{REFERENCES[name].example_config}.") from exc


def _settings(registry: Any, section: Mapping[str, Any]) -> dict[str, Any]:
    """A component's constructor defaults overlaid with its config section."""
    params = inspect.signature(registry.get(str(section["type"]))).parameters
    return {**{k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty},
            **{k: v for k, v in section.items() if k != "type"}}


def _torchvision_ssd(name: str, cfg: Mapping[str, Any], size: tuple[int, int] | None) -> nn.Module:
    """torchvision's ssd300_vgg16 with the classes and test-time settings of segkit's config (it always
    resizes to 300x300, as the SSD configs do)."""
    from torchvision.models.detection import ssd300_vgg16

    from segkit.registry import HEADS, MODELS

    det, head = _settings(MODELS, cfg["model"]), _settings(HEADS, cfg["model"]["head"])
    return ssd300_vgg16(weights=None, weights_backbone=None, num_classes=int(head["num_classes"]) + 1,
                        score_thresh=det["score_threshold"], nms_thresh=det["nms_threshold"],
                        detections_per_img=det["detections_per_image"], topk_candidates=det["topk_candidates"],
                        image_mean=list(det["pixel_mean"]), image_std=list(det["pixel_std"]))


def _torchvision_detector(name: str, cfg: Mapping[str, Any], size: tuple[int, int] | None) -> nn.Module:
    """torchvision's Faster / Mask R-CNN with the settings of segkit's config (sizes, RPN, RoI heads)."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    from segkit.registry import HEADS, MODELS

    m = cfg["model"]
    det = _settings(MODELS, m)
    rpn, roi = _settings(HEADS, m["rpn_head"]), _settings(HEADS, m["roi_head"])
    backbone = _resnet_with_fpn(cfg)
    min_size, max_size = _resize_sizes(det, size)
    levels = len(rpn["anchor_sizes"])
    kwargs: dict[str, Any] = dict(
        num_classes=int(roi["num_classes"]) + 1, min_size=min_size, max_size=max_size,
        image_mean=list(det["pixel_mean"]), image_std=list(det["pixel_std"]),
        rpn_anchor_generator=AnchorGenerator(tuple(tuple(s) for s in rpn["anchor_sizes"]),
                                             (tuple(rpn["aspect_ratios"]),) * levels),
        rpn_pre_nms_top_n_train=rpn["pre_nms_top_n_train"], rpn_pre_nms_top_n_test=rpn["pre_nms_top_n_test"],
        rpn_post_nms_top_n_train=rpn["post_nms_top_n_train"], rpn_post_nms_top_n_test=rpn["post_nms_top_n_test"],
        rpn_nms_thresh=rpn["nms_threshold"], rpn_fg_iou_thresh=rpn["fg_iou_threshold"],
        rpn_bg_iou_thresh=rpn["bg_iou_threshold"], rpn_batch_size_per_image=rpn["batch_size_per_image"],
        rpn_positive_fraction=rpn["positive_fraction"], rpn_score_thresh=rpn["score_threshold"],
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], roi["pooler_resolution"], roi["pooler_sampling_ratio"]),
        box_score_thresh=roi["score_threshold"], box_nms_thresh=roi["nms_threshold"],
        box_detections_per_img=roi["detections_per_image"], box_fg_iou_thresh=roi["fg_iou_threshold"],
        box_bg_iou_thresh=roi["bg_iou_threshold"], box_batch_size_per_image=roi["batch_size_per_image"],
        box_positive_fraction=roi["positive_fraction"],
    )
    if name == "fasterrcnn_resnet50_fpn":
        return FasterRCNN(backbone, **kwargs)
    mask = _settings(HEADS, m["roi_head"]["mask_head"])
    return MaskRCNN(backbone, mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], mask["pooler_resolution"],
                                                               mask["pooler_sampling_ratio"]), **kwargs)


def _resnet_with_fpn(cfg: Mapping[str, Any], extra_blocks: nn.Module | None = None,
                     returned_layers: Sequence[int] | None = None) -> nn.Module:
    """torchvision's ResNet-50 + FPN with the norm and frozen stages of segkit's config."""
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    from segkit.registry import BACKBONES

    bb = _settings(BACKBONES, cfg["model"]["backbone"])
    norms = {"FrozenBN": FrozenBatchNorm2d, "BN": nn.BatchNorm2d}
    if bb["norm"] not in norms:
        raise UserError(f"--compare torchvision: model.backbone.norm '{bb['norm']}' has no torchvision equivalent "
                        f"(FrozenBN or BN).")
    frozen = int(bb["frozen_stages"])
    return _resnet_fpn_extractor(resnet50(norm_layer=norms[bb["norm"]]),
                                 trainable_layers=5 if frozen < 0 else max(0, 4 - frozen),
                                 returned_layers=returned_layers, extra_blocks=extra_blocks)


def _resize_sizes(det: Mapping[str, Any], size: tuple[int, int] | None) -> tuple[int, int]:
    """torchvision's ``min_size`` / ``max_size`` for segkit's: torchvision always resizes, so a model that keeps
    the input size resizes to the benchmark's size."""
    min_size, max_size = det["min_size"], det["max_size"]
    if min_size is None:
        return (min(size), max(size)) if size else (800, 1333)
    return min_size, (int(round(min_size * 1333 / 800)) if max_size is None else max_size)


def _torchvision_retinanet(name: str, cfg: Mapping[str, Any], size: tuple[int, int] | None) -> nn.Module:
    """torchvision's RetinaNet with the settings of segkit's config: v1, or the ``_v2`` layout (GroupNorm towers,
    P6 from C5, GIoU box loss) where the config has it."""
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.retinanet import RetinaNetHead
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    from segkit.registry import HEADS, MODELS, NECKS

    m = cfg["model"]
    det, neck, head = _settings(MODELS, m), _settings(NECKS, m["neck"]), _settings(HEADS, m["head"])
    if head["norm"] not in (None, "GN") or head["box_loss"] not in ("l1", "giou") or neck["norm"] is not None \
            or head["assigner"] != "max_iou":
        raise UserError("--compare torchvision: torchvision's RetinaNet has towers without a norm or with GroupNorm, "
                        "an l1 or giou box loss, IoU-threshold matching (assigner: max_iou) and an FPN without a "
                        f"norm; compare a config like {REFERENCES[name].example_config}.")
    channels = int(neck["out_channels"])
    backbone = _resnet_with_fpn(cfg, LastLevelP6P7(2048 if neck["extra_from"] == "input" else channels, channels),
                                returned_layers=[2, 3, 4])
    anchors = AnchorGenerator(tuple(tuple(int(s) for s in sizes) for sizes in head["anchor_sizes"]),
                              (tuple(head["aspect_ratios"]),) * len(head["anchor_sizes"]))
    num_classes = int(head["num_classes"]) + 1  # torchvision keeps a (never used) background logit
    norm = (lambda c: nn.GroupNorm(32, c)) if head["norm"] == "GN" else None
    tv_head = RetinaNetHead(channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=norm)
    tv_head.regression_head._loss_type = head["box_loss"]
    min_size, max_size = _resize_sizes(det, size)
    return RetinaNet(backbone, num_classes, min_size=min_size, max_size=max_size,
                     image_mean=list(det["pixel_mean"]), image_std=list(det["pixel_std"]), anchor_generator=anchors,
                     head=tv_head, score_thresh=det["score_threshold"], nms_thresh=det["nms_threshold"],
                     detections_per_img=det["detections_per_image"], fg_iou_thresh=head["fg_iou_threshold"],
                     bg_iou_thresh=head["bg_iou_threshold"], topk_candidates=det["topk_candidates"])
def _torchvision_fcos(name: str, cfg: Mapping[str, Any], size: tuple[int, int] | None) -> nn.Module:
    """torchvision's FCOS with the settings of segkit's config (sizes, points, test-time filters)."""
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead as TorchvisionFCOSHead
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    from segkit.registry import HEADS, MODELS, NECKS

    m = cfg["model"]
    det, neck, head = _settings(MODELS, m), _settings(NECKS, m["neck"]), _settings(HEADS, m["head"])
    if head["norm"] != "GN" or head["size_ranges"] is not None:
        raise UserError("--compare torchvision: fcos_resnet50_fpn has GroupNorm in the head and the default size "
                        "ranges; set model.head.norm: GN and model.head.size_ranges: null as "
                        f"{REFERENCES[name].example_config} does.")
    channels = int(neck["out_channels"])
    backbone = _resnet_with_fpn(cfg, LastLevelP6P7(channels if neck["extra_from"] == "output" else 2048, channels),
                                returned_layers=[2, 3, 4])
    min_size, max_size = _resize_sizes(det, size)
    num_classes = int(head["num_classes"]) + 1
    sizes = head["level_sizes"] or [8, 16, 32, 64, 128]
    return FCOS(backbone, num_classes, min_size=min_size, max_size=max_size, image_mean=list(det["pixel_mean"]),
                image_std=list(det["pixel_std"]),
                anchor_generator=AnchorGenerator(tuple((s,) for s in sizes), ((1.0,),) * len(sizes)),
                head=TorchvisionFCOSHead(channels, 1, num_classes, int(head["num_convs"])),
                center_sampling_radius=head["center_sampling_radius"], score_thresh=det["score_threshold"],
                nms_thresh=det["nms_threshold"], detections_per_img=det["detections_per_image"],
                topk_candidates=det["topk_candidates"])

class TorchvisionSegmentor(nn.Module):
    """torchvision's FCN or DeepLabV3 behind segkit's segmentor interface, so both run the same calls.

    Images are normalised and zero-padded to multiples of ``size_divisor`` as segkit does; training
    returns the cross-entropy of the main output (``loss_seg``) and of the auxiliary one scaled by
    ``aux_weight`` (``loss_aux``); inference returns ``{"sem_seg": probabilities [K, H, W]}``.

    Args:
        net: a ``torchvision.models.segmentation`` model returning ``{"out", "aux"?}`` logits.
        pixel_mean / pixel_std / size_divisor / ignore_index: as in segkit's ``EncoderDecoder``.
        aux_weight: weight of the auxiliary loss.
    """

    def __init__(self, *, net: nn.Module, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 size_divisor: int = 32, ignore_index: int = 255, aux_weight: float = 0.2) -> None:
        super().__init__()
        self.net = net
        self.backbone = net.backbone
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(3, 1, 1), persistent=False)
        self.size_divisor, self.ignore_index, self.aux_weight = size_divisor, ignore_index, aux_weight

    def _pad(self, tensors: Sequence[Tensor], value: float) -> Tensor:
        d = self.size_divisor
        height = -(-max(t.shape[-2] for t in tensors) // d) * d
        width = -(-max(t.shape[-1] for t in tensors) // d) * d
        return torch.stack([F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2]), value=value) for t in tensors])

    def forward(self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None) -> Any:
        batch = self._pad([(image - self.pixel_mean) / self.pixel_std for image in images], 0.0)
        out = self.net(batch)
        if self.training:
            labels = self._pad([t["sem_seg"] for t in targets or ()], float(self.ignore_index))
            losses = {"loss_seg": F.cross_entropy(out["out"], labels, ignore_index=self.ignore_index)}
            if "aux" in out:
                aux = F.cross_entropy(out["aux"], labels, ignore_index=self.ignore_index)
                losses["loss_aux"] = self.aux_weight * aux
            return losses
        logits = out["out"]
        return [{"sem_seg": logits[i, :, :img.shape[-2], :img.shape[-1]].softmax(0)} for i, img in enumerate(images)]


def _torchvision_deeplabv3(cfg: Mapping[str, Any], ours: nn.Module) -> nn.Module:
    """torchvision's deeplabv3_resnet50 (auxiliary head when segkit has one), its weights loaded into ``ours``
    through the registered DeepLabV3 converter."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    from segkit_plugins.heads.deeplab_weights import convert_torchvision_deeplabv3

    bb = cfg["model"]["backbone"]
    if list(bb.get("strides", [])) != [1, 2, 1, 1] or list(bb.get("dilations", [])) != [1, 1, 2, 4] \
            or not bb.get("contract_dilation", False):
        raise UserError("--compare torchvision: deeplabv3_resnet50 is a dilated ResNet-50 of output stride 8 "
                        "whose first block of each dilated stage keeps the previous rate; set "
                        "model.backbone.strides=[1,2,1,1], model.backbone.dilations=[1,1,2,4] and "
                        "model.backbone.contract_dilation=true.")
    aux_heads = list(getattr(ours, "auxiliary_heads", []))
    net = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=ours.num_classes,
                             aux_loss=bool(aux_heads))
    state, _ = convert_torchvision_deeplabv3(net.state_dict())
    _load_or_explain(ours, state, "deeplabv3_resnet50", cfg)
    return _as_segmentor(net, ours, default_aux_weight=0.5)


def _as_segmentor(net: nn.Module, ours: nn.Module, *, default_aux_weight: float) -> TorchvisionSegmentor:
    """``net`` behind segkit's segmentor interface with ``ours``'s normalisation, padding, ignore index and
    auxiliary loss weight (``default_aux_weight`` when its head does not say)."""
    aux_heads = list(getattr(ours, "auxiliary_heads", []))
    weight = float(getattr(aux_heads[0], "loss_weight", default_aux_weight)) if aux_heads else 0.0
    return TorchvisionSegmentor(net=net, pixel_mean=ours.pixel_mean.flatten().tolist(),
                                pixel_std=ours.pixel_std.flatten().tolist(), size_divisor=ours.size_divisor,
                                ignore_index=ours.ignore_index, aux_weight=weight)


_FCN_HEAD_KEYS = {"convs.0.0.": "0.", "convs.0.1.": "1.", "classifier.": "4."}


def _torchvision_fcn(cfg: Mapping[str, Any], ours: nn.Module) -> nn.Module:
    """torchvision's fcn_resnet50 (auxiliary head when segkit has one), its weights loaded into ``ours``."""
    from torchvision.models.segmentation import fcn_resnet50

    m = cfg["model"]
    bb = m["backbone"]
    if list(bb.get("strides", [])) != [1, 2, 1, 1] or list(bb.get("dilations", [])) != [1, 1, 2, 4]:
        raise UserError("--compare torchvision: fcn_resnet50 is a dilated ResNet-50 of output stride 8; set "
                        "model.backbone.strides=[1,2,1,1] and model.backbone.dilations=[1,1,2,4].")
    aux_heads = list(getattr(ours, "auxiliary_heads", []))
    net = fcn_resnet50(weights=None, weights_backbone=None, num_classes=ours.num_classes, aux_loss=bool(aux_heads))
    state = {f"backbone.{k}": v for k, v in net.backbone.state_dict().items()}
    heads = [("decode_head.", net.classifier)] + ([("auxiliary_heads.0.", net.aux_classifier)] if aux_heads else [])
    for prefix, head in heads:
        theirs = head.state_dict()
        for ours_key, their_key in _FCN_HEAD_KEYS.items():
            state.update({prefix + ours_key + k[len(their_key):]: v for k, v in theirs.items()
                          if k.startswith(their_key)})
    _load_or_explain(ours, state, "fcn_resnet50", cfg)
    return _as_segmentor(net, ours, default_aux_weight=0.2)
