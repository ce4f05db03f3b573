"""segkit: plugin-based object detection, instance segmentation and semantic segmentation.

Example:
    >>> import segkit
    >>> cfg = segkit.load_config("configs/quickstart.yaml", ["trainer.max_epochs=1"])
    >>> model = segkit.build_model(cfg)
"""

from __future__ import annotations

from segkit.api import build_model, config_from_checkpoint, load_model
from segkit.checkpoint import load_checkpoint
from segkit.config import Config, load_config
from segkit.errors import ConfigError, UserError
from segkit.predict import Predictor

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "Predictor",
    "UserError",
    "build_model",
    "config_from_checkpoint",
    "load_checkpoint",
    "load_config",
    "load_model",
    "__version__",
]
