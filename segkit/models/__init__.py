"""Meta-architectures that wire backbones, necks and heads together, and the contract they declare."""

from segkit.models.base import TASKS, ModelInfo, SegkitModel, describe
from segkit.models.segmentor import EncoderDecoder, SegTestConfig
from segkit.models.two_stage import TwoStageDetector

__all__ = ["TASKS", "EncoderDecoder", "ModelInfo", "SegTestConfig", "SegkitModel", "TwoStageDetector",
           "describe"]
