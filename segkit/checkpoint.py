"""Reading segkit checkpoints (Lightning ``.ckpt`` files and segkit-native state dicts).

Checkpoints are read with ``torch.load(..., weights_only=True)``: a file that tries to run code
while loading is refused. A segkit checkpoint carries the merged config under ``segkit_config``,
so a model can be rebuilt from the checkpoint alone.

Weights that are not finite (NaN or infinity, left by a run that diverged) are refused wherever a
checkpoint is loaded (``segkit eval``, ``predict``, ``export``, ``cam``, ``--resume``,
``engine.load_from``, :func:`segkit.load_model`): the message names the file and the tensors, and
training never writes such a checkpoint (:func:`check_finite`). A model whose weights are finite
but whose outputs overflow still answers: detectors drop detections without a finite box and
score, segmentors give finite class scores.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from segkit.errors import UserError
from segkit.yamlio import YamlBoundsError, check_bounds

__all__ = ["CheckpointError", "read_checkpoint", "extract_state_dict", "load_state_dict_checked", "load_checkpoint",
           "checkpoint_config", "check_finite", "check_resumable", "nonfinite_tensors", "config_differences", "MISSING",
           "CONFIG_KEY", "CLASSES_KEY", "EMA_KEY", "BACKBONE_INFO_KEY"]

CONFIG_KEY = "segkit_config"
#: Key of the class names (``names[label - 1]`` names label ``label``) in a segkit checkpoint.
CLASSES_KEY = "segkit_classes"
#: Key of the averaged weights (``engine.ema``): ``{"state_dict": {...}, "updates": n, ...}``.
EMA_KEY = "segkit_ema"
#: Key of the architecture description in a backbone checkpoint written by ``segkit convert``.
BACKBONE_INFO_KEY = "segkit_backbone"
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


def nonfinite_tensors(state: Mapping[str, Any]) -> list[str]:
    """The names of the floating-point tensors of ``state`` holding a NaN or an infinity, in order."""
    return [name for name, value in state.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


#: What to do about weights that are not finite, for messages.
DIVERGED_FIX = ("lower optimizer.lr, add a warm-up (scheduler.warmup_iters) or clip gradients "
                "(trainer.gradient_clip_val)")


def check_finite(state: Mapping[str, Any], *, source: str) -> None:
    """Refuse a state dict with NaN or infinite values, naming ``source`` and the tensors.

    Raises:
        CheckpointError: the number of such tensors and the first names, and what to do instead.
    """
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(
            f"{source} holds weights that are not finite (NaN or infinity) in {len(bad)} of its {len(state)} "
            f"tensors: {_few(bad)}. The training run that wrote them diverged. Use an earlier checkpoint of that "
            f"run (best.ckpt, or one written before it diverged), or train again: {DIVERGED_FIX}."
        )


def checkpoint_config(ckpt: Mapping[str, Any], path: str = "checkpoint") -> dict[str, Any]:
    """The merged config stored in a segkit checkpoint."""
    cfg = ckpt.get(CONFIG_KEY)
    if not isinstance(cfg, Mapping):
        raise CheckpointError(
            f"'{path}' does not carry a segkit config; pass the config file as well: segkit eval CONFIG {path}"
        )
    return dict(cfg)


#: Keys of the sections a resumed run must keep that do not change its saved state: the initial
#: weights (``pretrained``, replaced by the checkpoint's) and how BatchNorm is synchronised.
_RESUME_FREE_KEYS = ("sync_bn", "pretrained")


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], *, sections: Sequence[str],
                       ignore: Collection[str] = ()) -> list[tuple[str, Any, Any]]:
    """The dotted keys under ``sections`` whose values differ between two configs.

    Args:
        saved, current: two merged configs (plain mappings); ``saved`` is the one a checkpoint stores.
        sections: the top-level sections to compare (``["model", "optimizer"]``).
        ignore: key names left out at any depth below a section (``["pretrained"]``).

    Returns:
        ``[(dotted key, saved value, current value)]`` sorted by key; a key one of them lacks has
        :data:`MISSING` as its value there.

    Example:
        >>> config_differences({"model": {"depth": 50}}, {"model": {"depth": 101}}, sections=["model"])
        [('model.depth', 50, 101)]
    """
    found: list[tuple[str, Any, Any]] = []
    for section in sections:
        found.extend(_differences(saved.get(section, MISSING), current.get(section, MISSING), section, set(ignore)))
    return found


def _differences(saved: Any, current: Any, path: str, ignore: set[str]) -> list[tuple[str, Any, Any]]:
    if not (isinstance(saved, Mapping) and isinstance(current, Mapping)):
        return [] if _same(saved, current) else [(path, saved, current)]
    found: list[tuple[str, Any, Any]] = []
    for key in sorted(set(saved) | set(current), key=str):
        if str(key) not in ignore:
            found.extend(_differences(saved.get(key, MISSING), current.get(key, MISSING), f"{path}.{key}", ignore))
    return found


class _Missing:
    def __repr__(self) -> str:
        return "(not set)"


#: The value :func:`config_differences` gives a key that a config does not set.
MISSING: Any = _Missing()


def _same(a: Any, b: Any) -> bool:
    """Equal config values: 1 and 1.0 are, ``true`` and 1 are not, a list equals a tuple of equal values."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


#: The config sections whose values a checkpoint's training state depends on: a resumed run keeps them.
RESUME_SECTIONS = ("model", "optimizer", "scheduler")


def check_resumable(path: str | os.PathLike[str], config: Mapping[str, Any]) -> str:
    """Refuse a checkpoint that training with ``config`` cannot continue from, naming the file.

    Args:
        path: the checkpoint given to ``--resume``.
        config: the merged config of the resumed run (plain mapping).

    Returns:
        A line describing where the run continues (epoch and step of the checkpoint).

    Raises:
        CheckpointError: the file is missing, truncated or unsafe, holds weights only or weights that
            are not finite, or was written with another model, optimizer or schedule than ``config``
            (every differing dotted key with both values), before anything is built or trained.
    """
    path = os.fspath(path)
    ckpt = read_checkpoint(path)
    missing = [key for key in ("state_dict", "optimizer_states", "loops") if key not in ckpt]
    if missing:
        raise CheckpointError(
            f"cannot resume from '{path}': it is not a training checkpoint of `segkit train` (it has no "
            f"{', '.join(missing)}); only the checkpoints/last.ckpt of a run (or another checkpoint it wrote) can "
            f"be resumed."
        )
    check_finite(extract_state_dict(ckpt, use_ema=False), source=f"'{path}'")
    if isinstance(ckpt.get(EMA_KEY), Mapping):
        check_finite(extract_state_dict(ckpt), source=f"'{path}' (its average of the weights, engine.ema)")
    _check_same_run(path, ckpt.get(CONFIG_KEY), config)
    return f"resuming from {path} (written after epoch {ckpt.get('epoch')}, step {ckpt.get('global_step')})"


def _with_saved_class_weights(current: Any, saved: Any, depth: int = 0) -> Any:
    """``current`` with each ``class_weight: median_frequency`` replaced by the list ``saved`` holds at the same
    place (what ``segkit train`` computed and stored for it); everything else as it is."""
    if depth > 64:
        return current
    if isinstance(current, Mapping) and isinstance(saved, Mapping):
        out = {}
        for key, value in current.items():
            if key == "class_weight" and value == "median_frequency" and isinstance(saved.get(key), list):
                out[key] = saved[key]
            else:
                out[key] = _with_saved_class_weights(value, saved.get(key), depth + 1)
        return out
    if isinstance(current, list) and isinstance(saved, list) and len(current) == len(saved):
        return [_with_saved_class_weights(c, s, depth + 1) for c, s in zip(current, saved)]
    return current


def _check_same_run(path: str, saved: Any, current: Mapping[str, Any]) -> None:
    """Refuse to resume with a model, optimizer or schedule other than the one the checkpoint was trained with.

    Raises:
        CheckpointError: listing every differing key with the checkpoint's value and the current one.
    """
    if not isinstance(saved, Mapping):  # a checkpoint without its config: nothing to compare
        return
    try:
        check_bounds(saved)  # shared references in the file would expand while the configs are compared
    except YamlBoundsError as exc:
        raise CheckpointError(f"the config stored in checkpoint '{path}' cannot be used: {exc}.") from None
    # class_weight: median_frequency was replaced by the numbers the run computed from the same training labels.
    current = _with_saved_class_weights(current, saved)
    differences = config_differences(saved, current, sections=RESUME_SECTIONS, ignore=_RESUME_FREE_KEYS)
    if not differences:
        return
    listed = "; ".join(f"{key}: {_short(old)} in the checkpoint, {_short(new)} now" for key, old, new in differences[:8])
    more = f"; and {len(differences) - 8} more" if len(differences) > 8 else ""
    raise CheckpointError(
        f"cannot resume from '{path}' with this config: {len(differences)} key(s) of {', '.join(RESUME_SECTIONS)} "
        f"differ from the config stored in the checkpoint: {listed}{more}. Resuming continues the same run (its "
        f"weights, optimizer state and schedule as saved), so these keys must keep the checkpoint's values: put them "
        f"back, or start a new run from these weights with engine.load_from={path} (without --resume)."
    )


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


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
        CheckpointError: naming the first mismatching key and both shapes, the missing and
            unexpected keys when ``strict``, or the tensors holding NaN or infinity.
    """
    path = os.fspath(path)
    return load_state_dict_checked(model, extract_state_dict(read_checkpoint(path), use_ema=use_ema),
                                   source=f"checkpoint '{path}'", strict=strict)


def init_from_checkpoint(model: nn.Module, path: str | os.PathLike[str], *, use_ema: bool = True,
                         min_fraction: float = 0.5) -> dict[str, list[str]]:
    """Initialise ``model`` from a checkpoint's weights for fine-tuning (``engine.load_from``).

    ``path`` may also be a weight name of a whole model (``torchvision://maskrcnn_resnet50_fpn``,
    :mod:`segkit.weight_names`), converted for segkit on the fly. Every tensor whose name and shape match is copied. Tensors of another shape keep the model's
    own initialisation: when only ``num_classes`` changed, these are the class-specific layers
    (the box head's classifier and class-specific regression, the mask predictor, a segmentation
    classifier), which are then trained from scratch. Tensors the checkpoint lacks also keep their
    initialisation.

    Returns:
        ``{"loaded": [...], "reinitialised": [...] (other shape), "missing": [...], "unexpected": [...]}``.

    Raises:
        CheckpointError: the file is missing, truncated or unsafe, its weights are not finite, or fewer
            than ``min_fraction`` of the model's tensors are found in it with their shape (a checkpoint
            of another architecture); a name is unknown, holds only a backbone, or its weights are not
            cached and cannot be downloaded.
    """
    path = os.fspath(path)
    state = _named_or_file_state(path, use_ema=use_ema)
    check_finite(state, source=f"'{path}'")
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


def _named_or_file_state(path: str, *, use_ema: bool) -> dict[str, torch.Tensor]:
    from segkit.weight_names import is_weight_name

    if is_weight_name(path):
        from segkit.weights import named_model_weights

        return named_model_weights(path).state_dict
    return extract_state_dict(read_checkpoint(path), use_ema=use_ema)


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
        CheckpointError: naming the first mismatching key and both shapes, (``strict``) the
            missing and unexpected keys, or the tensors holding NaN or infinity.
    """
    check_finite(state, source=source)
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
