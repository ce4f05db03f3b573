"""The Python entry points used by notebooks, scripts and the CLI."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from segkit.checkpoint import checkpoint_config, load_checkpoint, read_checkpoint
from segkit.config import Config, config_errors, load_config, resolve_interpolations
from segkit.errors import ConfigError

__all__ = ["build_model", "load_model", "config_from_checkpoint"]


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """Build the model described by ``cfg["model"]`` with the registries.

    Example:
        >>> cfg = segkit.load_config("configs/quickstart.yaml")
        >>> model = segkit.build_model(cfg)

    Raises:
        ConfigError: naming the file, the dotted key and the nearest valid name.
    """
    from segkit.registry import MODELS

    if "model" not in cfg:
        raise ConfigError("the config has no 'model' section", key="model",
                          file=getattr(cfg, "filename", None) or None)
    model_cfg = cfg["model"]
    if isinstance(model_cfg, Mapping) and "sync_bn" in model_cfg:
        # A training option (synchronised BatchNorm across processes) that the engine reads, not a model argument.
        model_cfg = {k: v for k, v in model_cfg.items() if k != "sync_bn"}
    with config_errors(cfg):
        return MODELS.build(model_cfg, path="model")


def config_from_checkpoint(path: str | os.PathLike[str]) -> Config:
    """The merged config stored inside a segkit checkpoint (plugins under ``imports:`` imported)."""
    from segkit.registry import import_modules

    path = os.fspath(path)
    cfg = Config(checkpoint_config(read_checkpoint(path), path), filename=f"{path} (stored config)")
    with config_errors(cfg):
        resolve_interpolations(cfg)  # a converted model's config may name ${env:...} data paths
    if cfg.get("imports"):
        with config_errors(cfg):
            import_modules(cfg["imports"], path="imports")
    return cfg


def load_model(checkpoint: str | os.PathLike[str], *, config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
               overrides: list[str] | None = None) -> nn.Module:
    """Build the model stored in ``checkpoint`` (from its own config unless ``config`` is given),
    load its weights and return it in eval mode.

    Example:
        >>> model = segkit.load_model("work_dirs/quickstart/checkpoints/best.ckpt")
        >>> outputs = model([image])  # list of dicts: boxes, labels, scores
    """
    if config is None:
        cfg: Mapping[str, Any] = config_from_checkpoint(checkpoint)
        if overrides:
            from segkit.config import apply_overrides

            apply_overrides(cfg, overrides)  # type: ignore[arg-type]
    elif isinstance(config, Mapping):
        cfg = config
    else:
        cfg = load_config(config, overrides or [])
    model = build_model(cfg)
    load_checkpoint(model, checkpoint)
    return model.eval()
