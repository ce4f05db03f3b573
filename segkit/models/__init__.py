"""Meta-architectures that wire backbones, necks and heads together, and the contract they declare."""

from segkit.models.base import TASKS, ModelInfo, SegkitModel, describe
from segkit.models.convert import convert_torchvision_faster_rcnn
from segkit.models.segmentor import EncoderDecoder, SegTestConfig
from segkit.models.two_stage import TwoStageDetector

__all__ = ["TASKS", "EncoderDecoder", "ModelInfo", "SegTestConfig", "SegkitModel", "TwoStageDetector",
           "convert_torchvision_faster_rcnn", "describe"]
