"""Converting other libraries' weights: the contract of a converter, and `segkit convert` over them.

The core names no network: each plugin that defines an architecture registers, in ``CONVERTERS``,
the converters that map other libraries' state dicts onto it (``TorchvisionResNet``,
``TimmResNet``, ``TorchvisionRCNN`` are the built-in ones). ``segkit convert --from SOURCE IN OUT``
asks every converter of that source whether it recognises the state dict, and the first that does
converts it.

A converter is a class with a ``source`` (``"torchvision"``, ``"timm"``, ...), ``matches(state_dict)``
and ``convert(state_dict) -> ConvertedWeights``. A converted backbone is written with its
architecture (``segkit_backbone``) for ``pretrained:``; a whole model as a checkpoint with its config
and class names, which ``segkit eval OUT`` and ``segkit.load_model(OUT)`` read alone.

Weight names (``torchvision://resnet50.IMAGENET1K_V1``, ``timm://resnet50c.gluon_in1k``,
:mod:`segkit.weight_names`) are converted the same way: :func:`named_backbone_weights` for
``pretrained:`` (a whole detector's backbone is cut out of it), :func:`named_model_weights` for
``engine.load_from``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from segkit.checkpoint import BACKBONE_INFO_KEY, CLASSES_KEY, CONFIG_KEY, CheckpointError, load_state_dict_checked
from segkit.registry import CONVERTERS

__all__ = ["ConvertedWeights", "WeightConverter", "convert_weights", "find_converter", "save_converted",
           "convert_named_weights", "named_backbone_weights", "named_model_weights"]


@dataclass
class ConvertedWeights:
    """A state dict renamed for a segkit component, with what is needed to build that component.

    Attributes:
        state_dict: the tensors, named as the segkit component names them.
        kind: ``"backbone"`` (for ``pretrained:``) or ``"model"`` (a whole meta-architecture).
        config: the backbone's config (``{"type": "ResNet", "depth": 50, ...}``) or the whole run
            config (``model``, ``data``, ``evaluation``, ...).
        description: one line saying what was converted.
        class_names: a model's class names (``None`` for a backbone).
        note: what a user should know to use the result (e.g. where its config looks for data).
    """

    state_dict: dict[str, Tensor]
    kind: Literal["backbone", "model"]
    config: dict[str, Any]
    description: str
    class_names: list[str] | None = field(default=None)
    note: str = ""


class WeightConverter:
    """Base of the converters a plugin registers in ``CONVERTERS``.

    Attributes:
        source: the library whose state dicts it reads (``segkit convert --from SOURCE``).
        accepts: what it converts, said when no converter recognises a file.
    """

    source: ClassVar[str] = ""
    accepts: ClassVar[str] = ""

    def matches(self, state_dict: Mapping[str, Tensor]) -> bool:
        """Whether the keys are those this converter reads."""
        raise NotImplementedError(f"{type(self).__name__} must implement matches(state_dict)")

    def convert(self, state_dict: Mapping[str, Tensor]) -> ConvertedWeights:
        """The renamed tensors and the component they fit.

        Raises:
            CheckpointError: the state dict is not one this converter can map (naming what it found).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement convert(state_dict)")


def _converters(source: str) -> list[WeightConverter]:
    return [CONVERTERS.build({"type": name}) for name in CONVERTERS.names()
            if getattr(CONVERTERS.get(name), "source", None) == source]


def find_converter(state_dict: Mapping[str, Tensor], source: str) -> WeightConverter:
    """The first registered converter of ``source`` that recognises ``state_dict``.

    Raises:
        CheckpointError: none does (naming what each of them accepts), or no converter reads ``source``.
    """
    candidates = _converters(source)
    for converter in candidates:
        if converter.matches(state_dict):
            return converter
    sources = sorted({str(getattr(CONVERTERS.get(n), "source", "")) for n in CONVERTERS.names()} - {""})
    if not candidates:
        raise CheckpointError(f"no weight converter reads '{source}' state dicts; the registered ones read "
                              f"{', '.join(sources) or 'nothing'}.")
    accepted = "; ".join(f"{type(c).__name__}: {c.accepts}" for c in candidates)
    raise CheckpointError(f"no {source} converter recognises this state dict (first keys: "
                          f"{', '.join(list(state_dict)[:3])}). The converters read: {accepted}.")


def convert_weights(state_dict: Mapping[str, Tensor], source: str) -> ConvertedWeights:
    """Convert ``state_dict`` from ``source`` with the converter that recognises it.

    Example:
        >>> converted = convert_weights(torchvision.models.resnet50().state_dict(), "torchvision")
        >>> converted.kind, converted.config["type"], converted.config["depth"]
        ('backbone', 'ResNet', 50)
    """
    return find_converter(state_dict, source).convert(state_dict)


def save_converted(converted: ConvertedWeights, path: str | os.PathLike[str], *, source: str, origin: str) -> None:
    """Build the component ``converted`` is for, load it strictly (so every key is used and every shape
    fits, or the error says which), and write the file atomically.

    Args:
        converted: what :func:`convert_weights` returned.
        path: the file to write.
        source: the library the weights come from (recorded with a backbone).
        origin: the input file, for messages.

    Raises:
        CheckpointError: a key is missing or unexpected, or a shape differs.
        FileWriteError: ``path`` cannot be written.
    """
    from segkit.api import build_model
    from segkit.fileio import atomic_open
    from segkit.registry import BACKBONES

    if converted.kind == "backbone":
        component = BACKBONES.build(dict(converted.config), path="segkit convert")
        payload = {"state_dict": converted.state_dict, BACKBONE_INFO_KEY: {**converted.config, "source": source}}
    else:
        component = build_model(converted.config)
        payload = {"state_dict": converted.state_dict, CONFIG_KEY: converted.config, CLASSES_KEY: converted.class_names}
    load_state_dict_checked(component, converted.state_dict, source=f"'{origin}' ({source} format)", strict=True)
    with atomic_open(os.fspath(path), "wb") as f:
        torch.save(payload, f)


def convert_named_weights(name: str) -> ConvertedWeights:
    """Resolve the weight name ``name`` (:func:`segkit.weight_names.resolve_weights`) and convert its
    state dict with the converter of its source that recognises it.

    Raises:
        CheckpointError: the name cannot be resolved (unknown, or not cached and offline), or no
            converter of its library reads these weights (naming what the converters read).
    """
    from segkit.weight_names import resolve_weights

    named = resolve_weights(name)
    try:
        return convert_weights(named.state_dict, named.source)
    except CheckpointError as exc:
        raise CheckpointError(f"{name} ({named.file}): {exc}") from None


def named_backbone_weights(name: str) -> ConvertedWeights:
    """The backbone weights that ``name`` stands for, for ``model.backbone.pretrained``.

    A whole model's weights (``torchvision://fasterrcnn_resnet50_fpn``) give their ``backbone.*``
    tensors and the backbone's config.

    Example:
        >>> weights = named_backbone_weights("torchvision://maskrcnn_resnet50_fpn")
        >>> weights.kind, weights.config["depth"], "conv1.weight" in weights.state_dict
        ('backbone', 50, True)
    """
    converted = convert_named_weights(name)
    if converted.kind == "backbone":
        return converted
    prefix = "backbone."
    state = {k[len(prefix):]: v for k, v in converted.state_dict.items() if k.startswith(prefix)}
    backbone = (converted.config.get("model") or {}).get("backbone")
    if not state or not isinstance(backbone, Mapping):
        raise CheckpointError(f"{name} holds a whole model ({converted.description}) without a backbone to take "
                              f"its weights from.")
    return ConvertedWeights(state, "backbone", dict(backbone), f"the backbone of {converted.description}")


def named_model_weights(name: str) -> ConvertedWeights:
    """The whole-model weights that ``name`` stands for, for ``engine.load_from``.

    Raises:
        CheckpointError: as :func:`convert_named_weights`, or ``name`` holds only a backbone's weights
            (which belong in ``model.backbone.pretrained``).
    """
    converted = convert_named_weights(name)
    if converted.kind != "model":
        raise CheckpointError(f"{name} holds the weights of a backbone ({converted.description}), not of a whole "
                              f"model: give it as model.backbone.pretrained. engine.load_from takes a checkpoint or "
                              f"a whole model's weights, such as torchvision://maskrcnn_resnet50_fpn.")
    return converted
