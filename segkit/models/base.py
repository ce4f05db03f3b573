"""The model contract: what a meta-architecture declares about itself so that tools never probe it.

Every meta-architecture (``TwoStageDetector``, ``EncoderDecoder``, or one a plugin registers in
``MODELS``) subclasses :class:`SegkitModel` and answers :meth:`SegkitModel.describe` with a
:class:`ModelInfo`: the task it solves, its classes, the keys of its outputs and its test-time
settings. The tools at the edge (the CLI, :class:`~segkit.Predictor`, export, class activation maps,
benchmarks, the training engine and the choice of evaluator) read that and the few methods below,
and nothing else, so a new kind of model works with every tool without a change to them.

Tasks and their outputs (eval mode, one dict per image, in the input image's pixels):

===========================  ===========================================================================
task                         outputs
===========================  ===========================================================================
``detection``                ``boxes`` (float [D, 4], xyxy), ``labels`` (int64 [D], 1..K), ``scores`` [D]
``instance_segmentation``    the above and ``masks`` (float [D, 1, H, W] probabilities)
``semantic_segmentation``    ``sem_seg`` (float [K, H, W] class probabilities)
===========================  ===========================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["TASKS", "Task", "ModelInfo", "SegkitModel", "LayeredBackbone", "check_model_class", "describe", "DETECTION_KEYS",
           "detection_index", "detection_result", "class_objective"]

Task = Literal["detection", "instance_segmentation", "semantic_segmentation"]
TASKS: tuple[str, ...] = ("detection", "instance_segmentation", "semantic_segmentation")
#: Output keys indexed by detection, in the order exports write them.
DETECTION_KEYS = ("boxes", "labels", "scores", "masks")
_OUTPUTS = {"detection": ("boxes", "labels", "scores"), "instance_segmentation": ("boxes", "labels", "scores", "masks"),
            "semantic_segmentation": ("sem_seg",)}


@dataclass(frozen=True)
class ModelInfo:
    """What a model is, as every tool needs to know it.

    Attributes:
        task: one of :data:`TASKS`.
        num_classes: K, the classes the model predicts (background not counted for detection).
        output_keys: keys of each image's output in eval mode, in the order exports write them
            (default: the task's keys, see the module docstring).
        first_label: the label of the first class: 1 for detections (0 is background), 0 for
            class indices of a label map.
        score_threshold: detections scoring below this are not returned (``None``: not a detector).
        mask_threshold: probability from which a mask pixel belongs to its object (``None``: no masks).
        detections_per_image: at most this many detections per image (``None``: not a detector).
        test_settings: other test-time settings worth showing (``{"mode": "slide", ...}``).
        feature_strides: ``{name: stride}`` of the feature maps a class activation map can explain,
            in the order of :meth:`SegkitModel.feature_maps`' output.
    """

    task: str
    num_classes: int
    output_keys: tuple[str, ...] = ()
    first_label: int = 1
    score_threshold: float | None = None
    mask_threshold: float | None = None
    detections_per_image: int | None = None
    test_settings: Mapping[str, Any] = field(default_factory=dict)
    feature_strides: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if not self.output_keys:
            object.__setattr__(self, "output_keys", _OUTPUTS[self.task])
        if self.task == "semantic_segmentation" and self.first_label != 0:
            raise ValueError("a semantic segmentation model's classes are indices 0..K-1 (first_label=0)")

    @property
    def is_detector(self) -> bool:
        """Whether outputs hold detections (``boxes``, ``labels``, ``scores``)."""
        return self.task in ("detection", "instance_segmentation")

    @property
    def has_masks(self) -> bool:
        """Whether detections carry ``masks``."""
        return "masks" in self.output_keys

    def as_dict(self) -> dict[str, Any]:
        """The info as plain values (what ``segkit export`` writes next to the model)."""
        return {"task": self.task, "num_classes": self.num_classes, "outputs": list(self.output_keys),
                "first_label": self.first_label, "score_threshold": self.score_threshold,
                "mask_threshold": self.mask_threshold, "detections_per_image": self.detections_per_image,
                "test_settings": dict(self.test_settings)}


class SegkitModel(nn.Module):
    """Base of every meta-architecture: the model I/O of the design page plus a declared contract.

    A subclass implements ``forward(images, targets=None)`` (losses in training, one output dict per
    image in eval mode), :meth:`describe` and :meth:`batch_images`; the other methods have defaults
    that suit a model with a ``backbone`` whose outputs are the feature maps to explain.

    Class attributes:
        default_evaluator: the evaluator ``type`` used when a config's ``evaluation`` section names
            none (a class attribute, so a config can be checked before the model is built).
    """

    default_evaluator: ClassVar[str] = "CocoEvaluator"

    def describe(self) -> ModelInfo:
        """The model's :class:`ModelInfo` (computed from its current settings)."""
        raise NotImplementedError(f"{type(self).__name__} must implement describe() -> ModelInfo")

    def batch_images(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """The batch Tensor[N, 3, H, W] the network sees for ``images`` (float [3, H, W] in [0, 1]) and
        each image's ``(h, w)`` inside it (class activation maps map features back through it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement batch_images(images)")

    def feature_maps(self) -> nn.Module:
        """The module whose output (a dict of named maps) class activation maps explain."""
        backbone = getattr(self, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise NotImplementedError(f"{type(self).__name__} has no backbone; override feature_maps()")
        return backbone

    def default_cam_layer(self) -> str:
        """The feature map a class activation map explains by default: the last one."""
        return list(self.describe().feature_strides)[-1]

    def backbone_module(self) -> nn.Module | None:
        """The part initialised from pretrained weights, whose learning rate ``backbone_lr_mult``
        scales and, where it is a :class:`LayeredBackbone`, ``layer_decay`` decays (default: the ``backbone``
        submodule, ``None`` without one)."""
        backbone = getattr(self, "backbone", None)
        return backbone if isinstance(backbone, nn.Module) else None

    @contextlib.contextmanager
    def single_pass(self) -> Iterator[None]:
        """For the duration, inference runs the network once per image (no test-time augmentation),
        as exports and class activation maps need. The default does nothing."""
        yield

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, Any]]:
        """For the duration, what :meth:`explain_objective` needs beyond the outputs is recorded into
        the yielded dict (e.g. a classifier's logits); the default records nothing."""
        yield {}

    def explain_objective(self, output: Mapping[str, Tensor], target: int | None,
                          recorded: Mapping[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """The scalar whose gradient makes a class activation map of ``output`` (one image's output,
        computed with gradients), and what it explains: ``{"target", "score", "label", "box"}``.

        Detections: ``target`` is the detection's index, best first (default 0), and the scalar its
        score. Semantic maps: ``target`` is a class index (default the most frequent predicted class
        other than 0) and the scalar its mean probability where it is predicted.

        Raises:
            ValueError: no detection to explain, or a target out of range.
        """
        if self.describe().is_detector:
            chosen = detection_index(output, target)
            return output["scores"][chosen], detection_result(output, chosen)
        return class_objective(output["sem_seg"], target)


@runtime_checkable
class LayeredBackbone(Protocol):
    """What a backbone declares to have its learning rate decayed layer by layer (``optimizer.layer_decay``).

    Layers are numbered from the input: ``0`` for what comes before the first layer (a stem, patch and position
    embeddings), ``i + 1`` for layer ``i`` (a ViT's block ``i``) and ``num_layers + 1`` for what follows the last
    (a final norm), which keeps the full learning rate. The optimizer multiplies the rate of a parameter of
    layer ``k`` by ``rate ** (num_layers + 1 - k)``; it asks this and nothing else of the backbone. The built-in
    ``VisionTransformer`` declares it (``num_layers`` its depth, ``layer_id("blocks.3.attn.qkv.weight") == 4``).
    """

    @property
    def num_layers(self) -> int:
        """The number of layers (a ViT's blocks)."""
        ...

    def layer_id(self, name: str) -> int:
        """The layer, ``0..num_layers + 1``, of the parameter ``name`` as the backbone's own
        ``named_parameters()`` names it."""
        ...


def check_model_class(model_class: Any, *, key: str = "model.type") -> type[SegkitModel]:
    """``model_class`` if it implements the contract (subclasses :class:`SegkitModel`).

    Raises:
        ConfigError: at ``key``, naming the class and its module, for one that does not.
    """
    from segkit.errors import ConfigError

    if isinstance(model_class, type) and issubclass(model_class, SegkitModel):
        return model_class
    name = getattr(model_class, "__qualname__", repr(model_class))
    raise ConfigError(f"the model {name} (module {getattr(model_class, '__module__', '?')}) does not implement "
                      "segkit's model contract: a meta-architecture subclasses segkit.models.SegkitModel and "
                      "implements describe() and batch_images()", key=key)


def describe(model: nn.Module) -> ModelInfo:
    """The :class:`ModelInfo` of ``model``.

    Raises:
        TypeError: ``model`` does not implement the contract (is not a :class:`SegkitModel`).
    """
    if not isinstance(model, SegkitModel):
        raise TypeError(f"{type(model).__name__} does not implement segkit's model contract: a meta-architecture "
                        "subclasses segkit.models.SegkitModel and implements describe()")
    return model.describe()


def detection_index(output: Mapping[str, Tensor], target: int | None) -> int:
    """The index of the detection to explain (``target``, default 0, the best), checked against the output."""
    count = int(output["scores"].numel())
    if count == 0:
        raise ValueError("the model detects nothing in this image, so there is no detection to explain; "
                         "lower the model's score threshold")
    chosen = 0 if target is None else int(target)
    if not 0 <= chosen < count:
        raise ValueError(f"detection {chosen} does not exist: the model made {count} detection(s) (0..{count - 1})")
    return chosen


def detection_result(output: Mapping[str, Tensor], chosen: int) -> dict[str, Any]:
    """What a class activation map of detection ``chosen`` explains: its index, score, label and box."""
    box = [float(v) for v in output["boxes"][chosen].detach()]
    return {"target": chosen, "score": float(output["scores"][chosen].detach()), "label": int(output["labels"][chosen]),
            "box": box}


def class_objective(probs: Tensor, target: int | None) -> tuple[Tensor, dict[str, Any]]:
    """The mean probability of class ``target`` (default: the most frequent predicted class other than 0)
    where it is predicted (everywhere when it is predicted nowhere), from class scores Tensor[K, H, W]."""
    predicted = probs.detach().argmax(0)
    if target is None:
        counts = torch.bincount(predicted.flatten(), minlength=probs.shape[0])
        if counts[1:].sum() > 0:
            counts[0] = 0
        target = int(counts.argmax())
    if not 0 <= target < probs.shape[0]:
        raise ValueError(f"class {target} is out of range: the model has {probs.shape[0]} classes (0..{probs.shape[0] - 1})")
    region = predicted == target
    if not bool(region.any()):
        region = torch.ones_like(region)  # the class is predicted nowhere: its mean over the image
    score = probs[target][region].mean()
    return score, {"target": target, "score": float(score.detach()), "label": target, "box": None}
