"""Weights by name: ``torchvision://resnet50.IMAGENET1K_V1``, ``timm://resnet50c.gluon_in1k``.

``model.backbone.pretrained``, ``engine.load_from`` and ``segkit convert`` take a local file or a
name ``SCHEME://NAME``. The scheme picks a *weight source*, registered in ``WEIGHT_SOURCES`` like any
other component (the built-in ``torchvision`` and ``timm`` sources are in
:mod:`segkit.weight_sources`); the source finds the file through its library's own weight API and
cache, downloads it there when it is missing and the machine is online, and returns the state dict
as that library names it. The registered converters (:mod:`segkit.weights`) then rename it for segkit.

A name that cannot be read (unknown, or offline and not cached) is a :class:`CheckpointError`
whose message names the file, where it comes from and the exact folder to put it in.

Example:
    >>> weights = resolve_weights("torchvision://resnet50.IMAGENET1K_V1")
    >>> weights.source, weights.file
    ('torchvision', '/home/me/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth')
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from segkit.checkpoint import CheckpointError
from segkit.errors import UnknownComponentError

__all__ = ["NamedWeights", "WeightSource", "is_weight_name", "split_weight_name", "resolve_weights",
           "torch_checkpoints_dir", "not_available_error"]

_NAME = re.compile(r"^([A-Za-z][A-Za-z0-9_+.-]*)://(.*)$")


@dataclass
class NamedWeights:
    """The state dict a weight name stands for, as its library names the tensors.

    Attributes:
        name: the name as written (``"torchvision://resnet50.IMAGENET1K_V1"``).
        source: the library, which is also the converters' source (``"torchvision"``, ``"timm"``).
        state_dict: the tensors.
        file: the local file they were read from.
    """

    name: str
    source: str
    state_dict: dict[str, Tensor]
    file: str


class WeightSource:
    """Base of the weight sources registered in ``WEIGHT_SOURCES`` under their scheme.

    A source is built without arguments; :meth:`resolve` gets the part after ``SCHEME://``.

    Attributes:
        source: the converters' source of the state dicts it returns (``segkit convert --from``).
    """

    source: ClassVar[str] = ""

    def resolve(self, name: str) -> NamedWeights:
        """Find (or download) the weights ``name`` stands for.

        Raises:
            CheckpointError: the name is unknown (with the nearest known names), or the file is not
                on this machine and cannot be downloaded (naming the file, its URL and the folder).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement resolve(name)")


def is_weight_name(value: Any) -> bool:
    """Whether ``value`` is a weight name (``SCHEME://NAME``) rather than a local path."""
    return isinstance(value, str) and _NAME.match(value) is not None


def split_weight_name(value: str) -> tuple[str, str]:
    """``("torchvision", "resnet50")`` for ``"torchvision://resnet50"``.

    Raises:
        CheckpointError: ``value`` is not of the form ``SCHEME://NAME`` or the name is empty.
    """
    match = _NAME.match(value)
    if match is None or not match.group(2).strip():
        raise CheckpointError(f"'{value}' is not a weight name: write SCHEME://NAME, such as "
                              f"torchvision://resnet50.IMAGENET1K_V1 or timm://resnet50c.gluon_in1k.")
    return match.group(1), match.group(2).strip()


def resolve_weights(value: str) -> NamedWeights:
    """The state dict that the weight name ``value`` stands for, from the source of its scheme.

    Raises:
        CheckpointError: an unknown scheme (with the registered ones) or name, or weights that are
            neither cached nor downloadable (the message says which file to put where).

    Example:
        >>> resolve_weights("timm://resnet50c.gluon_in1k").state_dict["conv1.0.weight"].shape
        torch.Size([32, 3, 3, 3])
    """
    from segkit.registry import WEIGHT_SOURCES

    scheme, name = split_weight_name(value)
    try:
        source_class = WEIGHT_SOURCES.get(scheme)
    except UnknownComponentError as exc:
        raise CheckpointError(f"'{value}': {exc.message} Local files are given by their path, without a "
                              f"scheme.") from None
    weights = source_class().resolve(name)
    weights.name = value
    return weights


def torch_checkpoints_dir() -> str:
    """torch.hub's download folder, ``$TORCH_HOME/hub/checkpoints`` (``~/.cache/torch/hub/checkpoints``),
    read when called so that a changed ``TORCH_HOME`` counts."""
    import torch.hub

    return os.path.join(torch.hub.get_dir(), "checkpoints")


def not_available_error(name: str, *, file: str, url: str, folder: str, reason: BaseException | str,
                        alternative: str = "") -> CheckpointError:
    """The error for weights that are not on this machine and could not be downloaded.

    Args:
        name: the weight name as written.
        file: the file name to put in ``folder``.
        url: where the file is downloaded from.
        folder: the folder that is searched.
        reason: the download's error (its type and first line are quoted).
        alternative: another place the file may go, as a sentence.
    """
    if isinstance(reason, BaseException):
        first = str(reason).strip().splitlines()[0] if str(reason).strip() else ""
        reason = f"{type(reason).__name__}: {first}" if first else type(reason).__name__
    return CheckpointError(
        f"the weights {name} are not on this machine and could not be downloaded ({reason[:300]}). "
        f"Download {url} on a machine with internet access and save it as {os.path.join(folder, file)} "
        f"(the folder follows $TORCH_HOME, default ~/.cache/torch, as torch.hub does)." + (f" {alternative}" if alternative else "")
    )
