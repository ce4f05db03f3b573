"""Reading segkit checkpoints (Lightning ``.ckpt`` files and segkit-native state dicts).

Checkpoints are read with ``torch.load(..., weights_only=True)``: a file that tries to run code
while loading is refused. A segkit checkpoint carries the merged config under ``segkit_config``,
so a model can be rebuilt from the checkpoint alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from segkit.errors import UserError

__all__ = ["CheckpointError", "read_checkpoint", "extract_state_dict", "load_state_dict_checked", "load_checkpoint",
           "checkpoint_config", "CONFIG_KEY", "CLASSES_KEY", "EMA_KEY"]

CONFIG_KEY = "segkit_config"
#: Key of the class names (``names[label - 1]`` names label ``label``) in a segkit checkpoint.
CLASSES_KEY = "segkit_classes"
#: Key of the averaged weights (``engine.ema``): ``{"state_dict": {...}, "updates": n, ...}``.
EMA_KEY = "segkit_ema"
_MODEL_PREFIX = "model."


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, unreadable, unsafe, or does not fit the model."""


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint file on the CPU with ``weights_only=True``.

    Raises:
        CheckpointError: the file does not exist, is truncated or corrupt, or holds objects that
            could execute code.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file '{path}' does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure here is a bad file
        text = str(exc).split("\n")[0].split(". ")[0]
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"checkpoint '{path}' contains Python objects that are not plain tensors or containers; "
                f"segkit refuses to unpickle it because that could run arbitrary code ({text})."
            ) from None
        raise CheckpointError(f"cannot read checkpoint '{path}': it is truncated or not a PyTorch file ({text}).") from None
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(ckpt).__name__}, expected a dict of tensors.")
    return dict(ckpt)


def extract_state_dict(ckpt: Mapping[str, Any], *, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The model's state dict inside a checkpoint (Lightning's ``model.`` prefix removed).

    Args:
        use_ema: take the averaged weights of a run trained with ``engine.ema`` when the
            checkpoint has them (``False``: the weights the optimizer trained).
    """
    ema = ckpt.get(EMA_KEY)
    if use_ema and isinstance(ema, Mapping) and isinstance(ema.get("state_dict"), Mapping):
        return extract_state_dict(ema, use_ema=False)
    state = ckpt.get("state_dict", ckpt.get("model", ckpt))
    if not isinstance(state, Mapping):
        raise CheckpointError("checkpoint has no state dict of tensors.")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError("the file holds no tensors: expected a state dict (names to tensors), possibly under "
                              "'state_dict' or 'model'.")
    if state and all(k.startswith(_MODEL_PREFIX) for k in state):
        state = {k[len(_MODEL_PREFIX):]: v for k, v in state.items()}
    return state


def checkpoint_config(ckpt: Mapping[str, Any], path: str = "checkpoint") -> dict[str, Any]:
    """The merged config stored in a segkit checkpoint."""
    cfg = ckpt.get(CONFIG_KEY)
    if not isinstance(cfg, Mapping):
        raise CheckpointError(
            f"'{path}' does not carry a segkit config; pass the config file as well: segkit eval CONFIG {path}"
        )
    return dict(cfg)


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True,
                    use_ema: bool = True) -> dict[str, list[str]]:
    """Load weights from ``path`` into ``model``.

    Args:
        model: the built model.
        path: a Lightning checkpoint written by ``segkit train`` or a segkit-native checkpoint.
        strict: refuse missing or unexpected keys (shape mismatches are always refused).
        use_ema: load the averaged weights of a run trained with ``engine.ema`` when the file has
            them (the weights training evaluated); ``False`` loads the optimizer's weights.

    Returns:
        ``{"missing": [...], "unexpected": [...]}``.

    Raises:
        CheckpointError: naming the first mismatching key and both shapes, or the missing and
            unexpected keys when ``strict``.
    """
    path = os.fspath(path)
    return load_state_dict_checked(model, extract_state_dict(read_checkpoint(path), use_ema=use_ema),
                                   source=f"checkpoint '{path}'", strict=strict)


def init_from_checkpoint(model: nn.Module, path: str | os.PathLike[str], *, use_ema: bool = True,
                         min_fraction: float = 0.5) -> dict[str, list[str]]:
    """Initialise ``model`` from a checkpoint's weights for fine-tuning (``engine.load_from``).

    Every tensor whose name and shape match is copied. Tensors of another shape keep the model's
    own initialisation: when only ``num_classes`` changed, these are the class-specific layers
    (the box head's classifier and class-specific regression, the mask predictor, a segmentation
    classifier), which are then trained from scratch. Tensors the checkpoint lacks also keep their
    initialisation.

    Returns:
        ``{"loaded": [...], "reinitialised": [...] (other shape), "missing": [...], "unexpected": [...]}``.

    Raises:
        CheckpointError: the file is missing, truncated or unsafe, or fewer than ``min_fraction`` of
            the model's tensors are found in it with their shape (a checkpoint of another architecture).
    """
    path = os.fspath(path)
    state = extract_state_dict(read_checkpoint(path), use_ema=use_ema)
    own = model.state_dict()
    loaded = [k for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)]
    reinitialised = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if len(loaded) < min_fraction * max(len(own), 1):
        raise CheckpointError(
            f"'{path}' does not fit this model: only {len(loaded)} of its {len(own)} tensors are in the "
            f"checkpoint with the same shape ({len(missing)} missing, e.g. {_few(missing)}; {len(unexpected)} "
            f"unexpected, e.g. {_few(unexpected)}). It holds another architecture; engine.load_from takes a "
            f"checkpoint of the same model, possibly with another num_classes."
        )
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return {"loaded": loaded, "reinitialised": reinitialised, "missing": missing, "unexpected": unexpected}


def load_state_dict_checked(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, strict: bool,
                            hint: str = "another architecture or num_classes?") -> dict[str, list[str]]:
    """Load ``state`` into ``model`` after checking every shape.

    Args:
        source: how messages name where ``state`` came from (``"checkpoint 'x.ckpt'"``).
        strict: refuse missing or unexpected keys.
        hint: the likely cause of a shape mismatch, appended to the message.

    Returns:
        ``{"missing": [...], "unexpected": [...]}``.

    Raises:
        CheckpointError: naming the first mismatching key and both shapes, or (``strict``) the
            missing and unexpected keys.
    """
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(
                f"{source} does not fit the model: '{key}' has shape {tuple(value.shape)} in the file "
                f"but {tuple(own[key].shape)} in the model ({hint})."
            )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{source} does not fit the model: {len(missing)} missing key(s) "
            f"{_few(missing)} and {len(unexpected)} unexpected key(s) {_few(unexpected)}."
        )
    model.load_state_dict(state, strict=False)
    return {"missing": missing, "unexpected": unexpected}


def _few(keys: list[str], n: int = 5) -> str:
    if not keys:
        return "[]"
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}]"
