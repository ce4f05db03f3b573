"""The model contract: every meta-architecture declares what it is, and the tools ask it (never probe it)."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import segkit
from segkit.cam import class_activation_map
from segkit.errors import ConfigError
from segkit.export import check_export, export_model
from segkit.models import ModelInfo, SegkitModel, describe
from segkit.registry import BACKBONES, MODELS

ROOT = Path(__file__).parent.parent
DETECTOR = {"type": "TwoStageDetector", "backbone": {"type": "ResNet", "depth": 18, "base_channels": 8},
            "neck": {"type": "FPN", "out_channels": 16}, "rpn_head": {"type": "RPN"},
            "roi_head": {"type": "StandardRoIHead", "num_classes": 4, "score_threshold": 0.2,
                         "detections_per_image": 7, "box_head": {"type": "TwoFCHead", "fc_dim": 16}}}
ONE_STAGE = {"type": "OneStageDetector", "backbone": {"type": "ResNet", "depth": 18, "base_channels": 8, "out_indices": [1, 2, 3]},
             "neck": {"type": "FPN", "in_features": ["c3", "c4", "c5"], "out_channels": 16, "extra_block": "p6p7"},
             "head": {"type": "RetinaNetHead", "num_classes": 4, "num_convs": 1}, "score_threshold": 0.0,
             "detections_per_image": 7}
MASK_HEAD = {"type": "MaskRCNNHead", "num_convs": 1, "conv_dim": 8, "mask_threshold": 0.4}
SEGMENTOR = {"type": "EncoderDecoder", "backbone": {"type": "ResNet", "depth": 18, "base_channels": 8},
             "decode_head": {"type": "FCNHead", "num_classes": 5, "channels": 8},
             "test_cfg": {"mode": "slide", "crop_size": 64, "stride": 48}}


def _build(cfg: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    return MODELS.build(cfg, path="model").eval()


def _outputs(model: nn.Module) -> dict[str, Tensor]:
    with torch.no_grad():
        return model([torch.rand(3, 64, 80)])[0]


def test_a_detector_declares_its_task_classes_outputs_and_filters():
    model = _build(DETECTOR)
    info = describe(model)
    assert (info.task, info.num_classes, info.first_label) == ("detection", 4, 1)
    assert info.output_keys == tuple(_outputs(model)) == ("boxes", "labels", "scores")
    assert (info.score_threshold, info.detections_per_image, info.mask_threshold) == (0.2, 7, None)
    assert dict(info.feature_strides) == {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
    assert type(model).default_evaluator == "CocoEvaluator"


def test_a_one_stage_detector_declares_its_task_classes_outputs_and_filters(tmp_path: Path):
    model = _build(ONE_STAGE)
    info = describe(model)
    assert (info.task, info.num_classes, info.first_label) == ("detection", 4, 1)
    assert info.output_keys == tuple(_outputs(model)) == ("boxes", "labels", "scores")
    assert (info.score_threshold, info.detections_per_image, info.mask_threshold) == (0.0, 7, None)
    assert dict(info.feature_strides) == {"c3": 8, "c4": 16, "c5": 32} and model.default_cam_layer() == "c3"
    image = torch.rand(3, 64, 80)
    with torch.no_grad():
        best = float(model([image])[0]["scores"][0])
    cam = class_activation_map(model, image)  # the gradient of the best detection's score
    assert cam.layer == "c3" and cam.heatmap.shape == (64, 80) and cam.score == pytest.approx(best)
    assert export_model(model, tmp_path / "retinanet.pt", "torchscript", image)["outputs"] == ["boxes", "labels", "scores"]
    assert check_export(tmp_path / "retinanet.pt", model, [image, torch.rand(3, 64, 80)])["max_abs_diff"] <= 1e-4


def test_a_mask_head_makes_it_instance_segmentation_with_its_mask_threshold():
    model = _build({**DETECTOR, "roi_head": {**DETECTOR["roi_head"], "mask_head": MASK_HEAD}})
    info = describe(model)
    assert info.task == "instance_segmentation" and info.has_masks and info.mask_threshold == 0.4
    assert info.output_keys == tuple(_outputs(model)) == ("boxes", "labels", "scores", "masks")


def test_a_segmentor_declares_class_indices_from_0_and_its_test_mode():
    model = _build(SEGMENTOR)
    info = describe(model)
    assert (info.task, info.num_classes, info.first_label, info.is_detector) == ("semantic_segmentation", 5, 0, False)
    assert info.output_keys == tuple(_outputs(model)) == ("sem_seg",)
    assert info.test_settings["mode"] == "slide" and info.test_settings["crop_size"] == (64, 64)
    assert type(model).default_evaluator == "SemSegEvaluator"


def test_a_segmentor_config_without_an_evaluator_type_gets_the_semantic_one(tmp_path: Path):
    from segkit.engine.config_check import check_run_config

    config = tmp_path / "seg.yaml"
    config.write_text(textwrap.dedent("""
        model: {type: EncoderDecoder, backbone: {type: ResNet, depth: 18}, decode_head: {type: FCNHead, num_classes: 3}}
        evaluation: {main_metric: mIoU}
    """))
    check_run_config(segkit.load_config(config), training=False, trainer=False)  # mIoU is SemSegEvaluator's
    config.write_text(config.read_text().replace("EncoderDecoder, backbone", "TwoStageDetector, backbone"))
    with pytest.raises(ConfigError, match="main_metric 'mIoU' is not a metric of CocoEvaluator"):
        check_run_config(segkit.load_config(config), training=False, trainer=False)


def test_model_info_refuses_an_unknown_task_and_fills_the_task_s_outputs():
    with pytest.raises(ValueError, match="task must be one of detection, instance_segmentation"):
        ModelInfo(task="classification", num_classes=3)
    assert ModelInfo(task="semantic_segmentation", num_classes=3, first_label=0).output_keys == ("sem_seg",)


class _NoContract(nn.Module):
    """A model class written before the contract: a forward and nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)


def test_a_model_class_without_the_contract_is_refused_naming_it(tmp_path: Path):
    MODELS.add(_NoContract, force=True)
    config = tmp_path / "plain.yaml"
    config.write_text("model: {type: _NoContract}\n")
    try:
        with pytest.raises(ConfigError, match=r"_NoContract \(module test_model_contract\) does not implement "
                                              r"segkit's model contract: .* subclasses segkit.models.SegkitModel") as info:
            segkit.build_model(segkit.load_config(config))
    finally:
        MODELS.remove("_NoContract")
    assert info.value.key == "model.type" and str(config) in str(info.value)
    with pytest.raises(TypeError, match="does not implement segkit's model contract"):
        describe(_NoContract())


class WholeImageDetector(SegkitModel):
    """A model the tools have never seen: it 'detects' the whole image as one object of the class a
    pooled backbone feature scores highest (the contract's defaults serve CAM)."""

    def __init__(self, *, num_classes: int = 3) -> None:
        super().__init__()
        self.backbone = BACKBONES.build({"type": "ResNet", "depth": 18, "base_channels": 8}, path="model.backbone")
        self.classifier = nn.Linear(self.backbone.output_shape()["c5"].channels, num_classes)
        self.num_classes = num_classes

    def describe(self) -> ModelInfo:
        strides = {name: shape.stride for name, shape in self.backbone.output_shape().items()}
        return ModelInfo(task="detection", num_classes=self.num_classes, score_threshold=0.0,
                         detections_per_image=1, feature_strides=strides)

    def batch_images(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        return torch.stack(images), [tuple(image.shape[-2:]) for image in images]

    def forward(self, images: list[Tensor], targets: Any = None) -> list[dict[str, Tensor]]:
        batch, sizes = self.batch_images(list(images))
        scores = F.softmax(self.classifier(self.backbone(batch)["c5"].mean((2, 3))), -1)
        best, labels = scores.max(-1)
        return [{"boxes": batch.new_tensor([[0.0, 0.0, w, h]]), "labels": (label + 1)[None], "scores": score[None]}
                for (h, w), score, label in zip(sizes, best, labels)]


def test_a_new_kind_of_model_is_explained_and_exported_through_the_contract(tmp_path: Path):
    torch.manual_seed(0)
    model = WholeImageDetector().eval()
    image = torch.rand(3, 64, 96)
    cam = class_activation_map(model, image)
    assert cam.layer == "c5" and cam.heatmap.shape == (64, 96) and cam.box == [0.0, 0.0, 96.0, 64.0]
    assert float(cam.heatmap.max()) == pytest.approx(1.0) and 1 <= cam.label <= 3
    description = export_model(model, tmp_path / "whole.pt", "torchscript", image, class_names=["a", "b", "c"])
    assert description["task"] == "detection" and description["outputs"] == ["boxes", "labels", "scores"]
    assert check_export(tmp_path / "whole.pt", model, [image, torch.rand(3, 64, 96)])["detections"] == 2


PARTS = {"backbone", "neck", "rpn", "roi_heads", "head", "decode_head", "auxiliary_heads", "mask_head", "cls_score"}
CLASSES = {"TwoStageDetector", "OneStageDetector", "EncoderDecoder"}


def _probes(tree: ast.AST) -> list[tuple[int, str]]:
    """Lines that ask a model for a part (``model.roi_heads``), probe it (``hasattr(model, ...)``) or test
    its concrete class (``isinstance(model, EncoderDecoder)``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in PARTS and "model" in ast.unparse(node.value):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
            name, first = node.func.id, ast.unparse(node.args[0])
            if name in ("hasattr", "getattr") and "model" in first:
                found.append((node.lineno, ast.unparse(node)))
            if name == "isinstance" and len(node.args) == 2 and CLASSES & set(ast.unparse(node.args[1]).split(".")):
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_tools_never_probe_a_model_s_parts():
    """Outside the meta-architectures, nothing asks a model for its parts or its concrete class."""
    edge = [p for p in (ROOT / "segkit").rglob("*.py") if p.parent.name != "models"]
    found = [f"{p.relative_to(ROOT)}:{line}: {code}" for p in edge for line, code in _probes(ast.parse(p.read_text()))]
    assert not found, "\n".join(found)
    planted = ast.parse("if hasattr(model, 'roi_heads'):\n    head = self.model.decode_head\nisinstance(m, EncoderDecoder)")
    assert sorted(line for line, _ in _probes(planted)) == [1, 2, 3]  # the check sees each kind of probe
