"""The Python entry points used by notebooks, scripts and the CLI."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from segkit.checkpoint import (
    CheckpointError,
    checkpoint_config,
    load_checkpoint,
    read_checkpoint,
)
from segkit.config import Config, check_text, config_errors, load_config, resolve_interpolations
from segkit.errors import ConfigError
from segkit.yamlio import YamlBoundsError, check_bounds

__all__ = ["build_model", "load_model", "config_from_checkpoint", "without_pretrained"]


def build_model(cfg: Mapping[str, Any], *, pretrained: bool = True) -> nn.Module:
    """Build the model described by ``cfg["model"]`` with the registries.

    Args:
        cfg: the config.
        pretrained: load the weights its ``pretrained:`` keys name; False when a checkpoint's weights
            replace them all anyway (evaluating, predicting, resuming), so that an offline machine
            without the ImageNet file can still use a model trained from it.

    Example:
        >>> cfg = segkit.load_config("configs/quickstart.yaml")
        >>> model = segkit.build_model(cfg)

    Raises:
        ConfigError: naming the file, the dotted key and the nearest valid name.
    """
    from segkit.models.base import check_model_class
    from segkit.registry import MODELS

    if "model" not in cfg:
        raise ConfigError("the config has no 'model' section", key="model",
                          file=getattr(cfg, "filename", None) or None)
    model_cfg = cfg["model"] if pretrained else without_pretrained(cfg["model"])
    if isinstance(model_cfg, Mapping) and "sync_bn" in model_cfg:
        # A training option (synchronised BatchNorm across processes) that the engine reads, not a model argument.
        model_cfg = {k: v for k, v in model_cfg.items() if k != "sync_bn"}
    with config_errors(cfg):
        if isinstance(model_cfg, Mapping) and isinstance(model_cfg.get("type"), str):
            check_model_class(MODELS.get(model_cfg["type"], key="model.type"))
        return MODELS.build(model_cfg, path="model")


def config_from_checkpoint(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Config:
    """The merged config stored inside a segkit checkpoint, with ``overrides`` applied.

    A checkpoint is data: the plugin modules its config names under ``imports:`` are **not**
    imported (they are listed in ``cfg.skipped_imports``, and an unknown component type names them
    with the ways to allow them). Modules the user gives in ``overrides`` (``imports=[my_plugin.py]``,
    relative to the current folder) are imported.

    Raises:
        CheckpointError: the file is missing, unreadable or unsafe, or carries no config.
        ConfigError: a malformed override, or an override's plugin module that cannot be imported.
    """
    from segkit.config import COMMAND_LINE, apply_overrides
    from segkit.registry import import_modules

    path = os.fspath(path)
    stored = checkpoint_config(read_checkpoint(path), path)
    try:
        check_bounds(stored)  # shared references in the file would expand when the config is copied
    except YamlBoundsError as exc:
        raise CheckpointError(f"the config stored in checkpoint '{path}' cannot be used: {exc}.") from None
    skipped = stored.pop("imports", None) or []
    skipped = [str(m) for m in skipped] if isinstance(skipped, (list, tuple)) else [str(skipped)]
    cfg = Config(stored, filename=f"{path} (stored config)", skipped_imports=skipped)
    apply_overrides(cfg, overrides)
    with config_errors(cfg):
        resolve_interpolations(cfg)  # a converted model's config may name ${env:...} data paths
        check_text(cfg)
        if cfg.origins.get("imports") == COMMAND_LINE and cfg.get("imports"):
            import_modules(cfg["imports"], path="imports", base_dir=os.getcwd())
            cfg.skipped_imports = []
    return cfg


def without_pretrained(model_cfg: Any) -> Any:
    """A copy of a model config with every ``pretrained`` key (the backbone's, a plugin's) set to None."""
    if isinstance(model_cfg, Mapping):
        return {k: None if k == "pretrained" else without_pretrained(v) for k, v in model_cfg.items()}
    if isinstance(model_cfg, list):
        return [without_pretrained(v) for v in model_cfg]
    return model_cfg


def load_model(checkpoint: str | os.PathLike[str], *, config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
               overrides: list[str] | None = None) -> nn.Module:
    """Build the model stored in ``checkpoint`` (from its own config unless ``config`` is given),
    load its weights and return it in eval mode.

    Example:
        >>> model = segkit.load_model("work_dirs/quickstart/checkpoints/best.ckpt")
        >>> outputs = model([image])  # list of dicts: boxes, labels, scores
    """
    if config is None:
        cfg: Mapping[str, Any] = config_from_checkpoint(checkpoint, overrides or ())
    elif isinstance(config, Mapping):
        cfg = config
    else:
        cfg = load_config(config, overrides or [])
    model = build_model(cfg, pretrained=False)  # the checkpoint's weights replace the pretrained ones
    load_checkpoint(model, checkpoint)
    return model.eval()
