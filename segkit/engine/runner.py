"""Training and evaluation runs: the Trainer from the ``trainer:`` section, work_dir layout.

A run writes to ``work_dir``::

    config.yaml              the merged config
    checkpoints/last.ckpt    the latest state (written atomically)
    checkpoints/best.ckpt    the best state by ``evaluation.main_metric`` (default bbox/AP)
    logs/version_N/metrics.csv   losses, learning rate and metrics (CSV logger, one folder per run)
    metrics.json             the latest evaluation under stable names, and every evaluation in "history"
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO

from segkit.api import build_model
from segkit.checkpoint import load_checkpoint
from segkit.config import Config, config_errors, dump_config
from segkit.engine.datamodule import build_datamodule
from segkit.engine.module import SegkitModule
from segkit.fileio import atomic_write_text
from segkit.registry import check_arguments

__all__ = ["AtomicCheckpointIO", "build_trainer", "train", "evaluate", "resolve_work_dir", "DEFAULT_MAIN_METRIC"]

DEFAULT_MAIN_METRIC = "bbox/AP"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place, so a crash while
    saving never leaves a truncated ``last.ckpt``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def resolve_work_dir(cfg: Mapping[str, Any]) -> str:
    work_dir = cfg.get("work_dir")
    if not work_dir:
        stem = os.path.splitext(os.path.basename(getattr(cfg, "filename", "") or "run"))[0]
        work_dir = os.path.join("work_dirs", stem)
    return str(work_dir)


def _main_metric(cfg: Mapping[str, Any]) -> str:
    return str((cfg.get("evaluation") or {}).get("main_metric", DEFAULT_MAIN_METRIC))


def build_trainer(cfg: Mapping[str, Any], *, work_dir: str, evaluate_only: bool = False,
                  with_validation: bool = True) -> pl.Trainer:
    """A ``pytorch_lightning.Trainer`` from ``cfg["trainer"]`` (every Trainer option works there).

    segkit adds: CPU as the default accelerator, the CSV logger and checkpoint callbacks under
    ``work_dir``, and atomic checkpoint writing.
    """
    kwargs = dict(cfg.get("trainer") or {})
    with config_errors(cfg):
        check_arguments(pl.Trainer, kwargs, path="trainer", type_name="Trainer", kind="section")
    kwargs.setdefault("accelerator", "cpu")
    kwargs.setdefault("devices", 1)
    kwargs.setdefault("default_root_dir", work_dir)
    if evaluate_only:
        kwargs["logger"] = False
        kwargs["enable_checkpointing"] = False
        return pl.Trainer(**kwargs)
    if kwargs.get("logger", True) is True:
        # logs/version_N per run, so a resumed or repeated run never deletes earlier logs.
        kwargs["logger"] = CSVLogger(save_dir=work_dir, name="logs")
    callbacks = list(kwargs.pop("callbacks", None) or [])
    if kwargs.get("enable_checkpointing", True):
        ckpt_dir = os.path.join(work_dir, "checkpoints")
        # "last" is written at the end of every epoch (after that epoch's evaluation, if any).
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, monitor=None,
                                         save_on_train_epoch_end=True, enable_version_counter=False))
        if with_validation:
            callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=_main_metric(cfg), mode="max",
                                             save_top_k=1, auto_insert_metric_name=False,
                                             enable_version_counter=False))
    if kwargs.get("logger"):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    kwargs["callbacks"] = callbacks
    plugins = list(kwargs.pop("plugins", None) or [])
    plugins.append(AtomicCheckpointIO())
    kwargs["plugins"] = plugins
    return pl.Trainer(**kwargs)


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _quiet_lightning() -> None:
    rank_zero_logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvertisements) for f in rank_zero_logger.filters):
        rank_zero_logger.addFilter(_DropAdvertisements())
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=r".*predefined `Trainer` argument.*")


def train(cfg: Config, *, resume: str | None = None) -> dict[str, float]:
    """Train the model described by ``cfg``; returns the metrics of the last evaluation.

    Example:
        >>> metrics = segkit.engine.train(segkit.load_config("configs/quickstart.yaml"))
    """
    _quiet_lightning()
    work_dir = resolve_work_dir(cfg)
    pl.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    model = build_model(cfg)
    os.makedirs(work_dir, exist_ok=True)
    atomic_write_text(os.path.join(work_dir, "config.yaml"), dump_config(cfg))
    module = SegkitModule(model=model, config=cfg.to_dict() if isinstance(cfg, Config) else dict(cfg),
                          work_dir=work_dir)
    with_val = (cfg.get("data") or {}).get("val") is not None
    trainer = build_trainer(cfg, work_dir=work_dir, with_validation=with_val)
    with config_errors(cfg):
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    return dict(module.last_metrics)


def evaluate(cfg: Mapping[str, Any], checkpoint: str | None, *, split: str = "val") -> dict[str, float]:
    """Evaluate ``checkpoint`` (weights) with the model and data of ``cfg`` on ``split``."""
    _quiet_lightning()
    work_dir = resolve_work_dir(cfg)
    datamodule = build_datamodule(cfg)
    model = build_model(cfg)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    plain = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    module = SegkitModule(model=model, config=plain, work_dir=None)
    trainer_cfg = dict(cfg)
    trainer_cfg["trainer"] = {k: v for k, v in (cfg.get("trainer") or {}).items()
                              if k in ("accelerator", "devices", "num_nodes", "strategy", "precision",
                                       "enable_progress_bar", "limit_val_batches", "limit_test_batches")}
    trainer = build_trainer(trainer_cfg, work_dir=work_dir, evaluate_only=True)
    with config_errors(cfg):
        if split == "test":
            trainer.test(module, datamodule=datamodule, verbose=False)
        else:
            trainer.validate(module, datamodule=datamodule, verbose=False)
    return dict(module.last_metrics)
