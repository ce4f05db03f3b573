"""Meta-architectures that wire backbones, necks and heads together, and the contract they declare."""

from segkit.models.base import TASKS, LayeredBackbone, ModelInfo, SegkitModel, describe
from segkit.models.detector import Detector
from segkit.models.one_stage import OneStageDetector
from segkit.models.segmentor import EncoderDecoder, SegTestConfig
from segkit.models.two_stage import TwoStageDetector

__all__ = ["TASKS", "Detector", "EncoderDecoder", "LayeredBackbone", "ModelInfo", "OneStageDetector", "SegTestConfig",
           "SegkitModel", "TwoStageDetector", "describe"]
