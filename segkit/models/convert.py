"""Key mapping from torchvision detection checkpoints to segkit models."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

__all__ = ["convert_torchvision_faster_rcnn"]

# (pattern, replacement) applied in order; the first match wins. Old torchvision checkpoints lack
# the ``.0`` of the Conv2dNormActivation wrappers, so both spellings are accepted.
_FASTER_RCNN_RULES = (
    (r"^backbone\.body\.", "backbone."),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?(weight|bias)$", r"neck.lateral_convs.\1.0.\2"),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?(weight|bias)$", r"neck.output_convs.\1.0.\2"),
    (r"^rpn\.head\.conv\.(?:0\.0\.)?(weight|bias)$", r"rpn.conv.\1"),
    (r"^rpn\.head\.cls_logits\.", "rpn.objectness_logits."),
    (r"^rpn\.head\.bbox_pred\.", "rpn.anchor_deltas."),
    (r"^roi_heads\.box_head\.", "roi_heads.box_head."),
    (r"^roi_heads\.box_predictor\.", "roi_heads."),
)


def convert_torchvision_faster_rcnn(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision ``fasterrcnn_resnet*_fpn`` state dict for :class:`TwoStageDetector`
    with a ``ResNet`` backbone, ``FPN`` neck, ``RPN`` and ``StandardRoIHead`` with ``TwoFCHead``.

    Keys that match no rule are returned unchanged, so ``load_state_dict`` reports them.

    Example:
        >>> tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
        >>> model.load_state_dict(convert_torchvision_faster_rcnn(tv.state_dict()))
    """
    converted = {}
    for key, value in state_dict.items():
        new_key = key
        for pattern, replacement in _FASTER_RCNN_RULES:
            new_key, count = re.subn(pattern, replacement, key)
            if count:
                break
        converted[new_key] = value
    return converted
