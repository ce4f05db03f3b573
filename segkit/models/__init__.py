"""Meta-architectures that wire backbones, necks and heads together."""

from segkit.models.convert import convert_torchvision_faster_rcnn
from segkit.models.segmentor import EncoderDecoder, SegTestConfig
from segkit.models.two_stage import TwoStageDetector

__all__ = ["EncoderDecoder", "SegTestConfig", "TwoStageDetector", "convert_torchvision_faster_rcnn"]
