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

__all__ = ["ConvertedWeights", "WeightConverter", "convert_weights", "find_converter", "save_converted"]


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
