"""Training and evaluation runs: the Trainer from the ``trainer:`` section, work_dir layout.

A run writes to ``work_dir``::

    config.yaml              the merged config
    checkpoints/last.ckpt    the latest state (written atomically)
    checkpoints/best.ckpt    the best state by ``evaluation.main_metric`` (default bbox/AP)
    checkpoints/top-epochNNN.ckpt   the ``engine.keep_best`` best states, when it is above 1
    logs/version_N/metrics.csv   losses, learning rate, iteration times and metrics (CSV logger, one folder per run)
    logs/version_N/events.out.tfevents.*   the same for TensorBoard (``tensorboard --logdir work_dir/logs``)
    mlruns/, wandb/          the MLflow file store and W&B's files, when ``trainer.logger`` lists those loggers
    metrics.json             the latest evaluation under stable names, and every evaluation in "history"
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from segkit.api import build_model
from segkit.checkpoint import DIVERGED_FIX, check_resumable, load_checkpoint, nonfinite_tensors
from segkit.config import COMMAND_LINE, Config, config_errors, dump_config
from segkit.data.class_weights import resolve_class_weights, uses_median_frequency
from segkit.engine.config_check import check_run_config
from segkit.engine.callbacks import EngineOptions, EpochSeeding, engine_options
from segkit.engine.datamodule import build_datamodule
from segkit.engine.loggers import (build_callbacks, build_loggers, callback_specs, check_state_keys, logger_specs,
                                   storable_config)
from segkit.engine.workdir import (RunCSVLogger, SaveOnInterrupt, ended_by_sigterm, lock_work_dir, prepare_work_dir,
                                   writes_reported_once)
from segkit.engine.module import SegkitModule, TrainingDivergedError
from segkit.engine.sync_batchnorm import SyncBatchNormPlugin
from segkit.errors import ConfigError, UserError
from segkit.fileio import FileWriteError, atomic_open, atomic_write_text, make_folder, write_error
from segkit.registry import check_arguments

__all__ = ["AtomicCheckpointIO", "IterationTimer", "build_trainer", "default_loggers", "train", "evaluate", "evaluate_keeping_predictions",
           "resolve_work_dir", "DEFAULT_MAIN_METRIC"]

DEFAULT_MAIN_METRIC = "bbox/AP"


class TopKCheckpoint(ModelCheckpoint):
    """The ``engine.keep_best`` best checkpoints; its own class gives it its own state in checkpoints
    (Lightning keys a callback's state by class and monitor, which it shares with best.ckpt's)."""


_RESUME_HINT = "Then continue the run with `segkit train CONFIG --resume auto`."


class CheckpointWriteError(FileWriteError):
    """A checkpoint could not be written (full disk, no permission); the previous one is intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, flushes it to disk and renames it into place, so
    a crash or a full disk while saving never leaves a truncated ``last.ckpt``: the previous file
    stays until the new one is complete. A temporary file left by a killed process
    (``last.ckpt.tmp-<pid>``) is removed by the next save to the same path.

    A checkpoint whose weights hold NaN or infinity is not written (the run diverged): the previous
    one stays, and training stops with :class:`~segkit.engine.module.TrainingDivergedError`.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        path = os.fspath(path)
        _refuse_nonfinite(checkpoint, path)
        make_folder(os.path.dirname(os.path.abspath(path)), what="the checkpoint folder", hint=_RESUME_HINT)
        _remove_stale_temporaries(path)
        try:
            # A file object, not a path: torch then reports a failed write with the OSError behind it.
            with atomic_open(path, "wb", what="the checkpoint", hint=_RESUME_HINT,
                             temporary=f"{path}.tmp-{os.getpid()}") as f:
                torch.save(checkpoint, f)
        except FileWriteError as exc:
            raise CheckpointWriteError(str(exc), path=exc.path, errno=exc.errno) from exc


def _refuse_nonfinite(checkpoint: Mapping[str, Any], path: str) -> None:
    """Stop a diverged run instead of replacing a good checkpoint with weights holding NaN or infinity.

    Raises:
        TrainingDivergedError: naming the step, the tensors and the file that was kept.
    """
    state = checkpoint.get("state_dict")
    bad = nonfinite_tensors(state) if isinstance(state, Mapping) else []
    if bad:
        kept = "the previous one is intact" if os.path.isfile(path) else "no earlier one exists"
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise TrainingDivergedError(
            f"training stopped at step {checkpoint.get('global_step')} (epoch {checkpoint.get('epoch')}): the weights "
            f"hold NaN or infinity in {len(bad)} tensor(s) ({shown}), so the checkpoint '{path}' was not written "
            f"({kept}). The run diverged: {DIVERGED_FIX}, then train again."
        )


def _remove_stale_temporaries(path: str) -> None:
    """Delete ``path.tmp-<pid>`` files whose writing process no longer runs."""
    directory, prefix = os.path.dirname(os.path.abspath(path)), os.path.basename(path) + ".tmp-"
    for name in os.listdir(directory):
        pid = name[len(prefix):]
        if name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid() and not _process_exists(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def resolve_work_dir(cfg: Mapping[str, Any]) -> str:
    work_dir = cfg.get("work_dir")
    if not work_dir:
        stem = os.path.splitext(os.path.basename(getattr(cfg, "filename", "") or "run"))[0]
        work_dir = os.path.join("work_dirs", stem)
    return str(work_dir)


def _main_metric(cfg: Mapping[str, Any]) -> str:
    return str((cfg.get("evaluation") or {}).get("main_metric", DEFAULT_MAIN_METRIC))


def build_trainer(cfg: Mapping[str, Any], *, work_dir: str, evaluate_only: bool = False,
                  with_validation: bool = True, extra_callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    """A ``pytorch_lightning.Trainer`` from ``cfg["trainer"]`` (every Trainer option works there).

    segkit adds: CPU as the default accelerator, the loggers of ``trainer.logger`` (``true``, the
    default: the CSV and TensorBoard loggers; ``false`` for none; logger specs or objects, see
    :mod:`segkit.engine.loggers`), the callbacks of ``trainer.callbacks``, the learning rate (unless
    a LearningRateMonitor is configured) and iteration times in the logs, checkpoint callbacks under
    ``work_dir``, atomic checkpoint writing, and synchronised BatchNorm for ``model.sync_bn: true``.

    Raises:
        ConfigError: a Trainer option, logger or callback the config gets wrong, at its key.
    """
    kwargs = dict(cfg.get("trainer") or {})
    logger_value, callback_value = kwargs.pop("logger", True), kwargs.pop("callbacks", None)
    with config_errors(cfg):
        check_arguments(pl.Trainer, kwargs, path="trainer", type_name="Trainer", kind="section")
    kwargs.setdefault("accelerator", "cpu")
    kwargs.setdefault("devices", 1)
    kwargs.setdefault("default_root_dir", work_dir)
    if evaluate_only:
        kwargs["logger"] = False
        kwargs["enable_checkpointing"] = False
        return pl.Trainer(**kwargs)
    with config_errors(cfg):
        sync_bn = _sync_batchnorm(cfg, kwargs)
        logger_entries = logger_specs(logger_value)
        callback_entries = callback_specs(callback_value)
        loggers = default_loggers(work_dir) if logger_entries is None else build_loggers(logger_entries, work_dir=work_dir)
        user_callbacks = build_callbacks(callback_entries, work_dir=work_dir, main_metric=_main_metric(cfg))
    kwargs["logger"] = loggers or False
    callbacks = user_callbacks + list(extra_callbacks)
    if kwargs.get("enable_checkpointing", True):
        ckpt_dir = os.path.join(work_dir, "checkpoints")
        # "last" is written at the end of every epoch (after that epoch's evaluation, if any).
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, monitor=None,
                                         save_on_train_epoch_end=True, enable_version_counter=False))
        if with_validation:
            callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=_main_metric(cfg), mode="max",
                                             save_top_k=1, auto_insert_metric_name=False,
                                             enable_version_counter=False))
            with config_errors(cfg):
                keep = engine_options(cfg).keep_best
            if keep > 1:  # the k best evaluations as top-epochNNN.ckpt, best.ckpt still the best one
                callbacks.append(TopKCheckpoint(dirpath=ckpt_dir, filename="top-epoch{epoch:03d}",
                                                 monitor=_main_metric(cfg), mode="max", save_top_k=keep,
                                                 auto_insert_metric_name=False, enable_version_counter=False))
    if loggers:
        if not any(isinstance(c, LearningRateMonitor) for c in callbacks):
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        callbacks.append(IterationTimer())
    with config_errors(cfg):
        check_state_keys(callbacks, user_callbacks, callback_entries)
    kwargs["callbacks"] = callbacks
    plugins = list(kwargs.pop("plugins", None) or [])
    plugins.append(AtomicCheckpointIO())
    if sync_bn:
        plugins.append(SyncBatchNormPlugin())
    kwargs["plugins"] = plugins
    return pl.Trainer(**kwargs)


def default_loggers(work_dir: str) -> list[Logger]:
    """The CSV and TensorBoard loggers of a run, both writing to ``work_dir/logs/version_N``.

    A new ``version_N`` per run, so a resumed or repeated run never deletes earlier logs; the CSV
    files are what ``segkit plot`` reads.
    """
    csv_logger = RunCSVLogger(save_dir=work_dir, name="logs")
    try:
        import tensorboard  # noqa: F401  (TensorBoardLogger needs it, or tensorboardX)
    except ImportError:
        warnings.warn("TensorBoard logs need the tensorboard package (pip install tensorboard); writing CSV logs "
                      "only", stacklevel=2)
        return [csv_logger]
    return [csv_logger, TensorBoardLogger(save_dir=work_dir, name="logs", version=csv_logger.version,
                                          default_hp_metric=False)]


class IterationTimer(pl.Callback):
    """Logs the seconds of every training iteration as ``time/data`` and ``time/step``.

    ``time/data`` is the time from the end of one iteration to the start of the next (the data
    loader's share, including the first batch of an epoch), ``time/step`` the rest: forward,
    backward and optimizer step.
    """

    def __init__(self) -> None:
        self._last_end: float | None = None
        self._start = 0.0
        self._data = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_end = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._start = time.perf_counter()
        self._data = self._start - self._last_end if self._last_end is not None else 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        end = time.perf_counter()
        pl_module.log("time/data", self._data, on_step=True, on_epoch=False, batch_size=1)
        pl_module.log("time/step", end - self._start, on_step=True, on_epoch=False, batch_size=1)
        self._last_end = end


def _sync_batchnorm(cfg: Mapping[str, Any], trainer_kwargs: dict[str, Any]) -> bool:
    """Whether BatchNorm is synchronised across processes: ``model.sync_bn`` or ``trainer.sync_batchnorm`` true.

    Removes ``sync_batchnorm`` from ``trainer_kwargs``: segkit's plugin does the conversion, also
    for CPU processes, where PyTorch's SyncBatchNorm does not run.

    Raises:
        ConfigError: a value that is not true, false or null.
    """
    values = {"model.sync_bn": (cfg.get("model") or {}).get("sync_bn"),
              "trainer.sync_batchnorm": trainer_kwargs.pop("sync_batchnorm", None)}
    for key, value in values.items():
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}", key=key)
    return any(values.values())


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

    Args:
        cfg: the merged config.
        resume: a ``last.ckpt`` (or any checkpoint ``segkit train`` wrote) to continue from: the
            weights, optimizer, learning-rate schedule, epoch and step, the average of the weights
            (``engine.ema``) and the skipped-step counts. Resumed from the end of an epoch, the run
            ends with the same weights as an uninterrupted one (same config, ``trainer.deterministic:
            true`` where the accelerator needs it).

    Raises:
        CheckpointError: ``resume`` is missing, truncated, unsafe, not a training checkpoint, holds
            weights that are not finite, or was written with another model, optimizer or schedule
            (checked before anything is built).
        FileWriteError: ``work_dir`` or a file of the run cannot be written (a file in the way, a full
            or read-only disk, no permission); what was written before is intact.
        TrainingDivergedError: ``engine.max_nonfinite_steps`` steps in a row had a non-finite loss
            or gradients, or the weights became NaN or infinite (that checkpoint is not written).
        SIGTERMException: the process received SIGTERM; ``checkpoints/interrupted.ckpt`` was written.

    Example:
        >>> metrics = segkit.engine.runner.train(segkit.load_config("configs/quickstart.yaml"))
    """
    _quiet_lightning()
    # Resuming within an epoch continues with the epoch's remaining batches (EpochSeeding says so itself).
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")
    check_run_config(cfg)  # every value, before any data is read or model built
    with config_errors(cfg):
        options = engine_options(cfg)
    if resume is not None:
        rank_zero_info(check_resumable(resume, cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)))
    work_dir = prepare_work_dir(resolve_work_dir(cfg))
    lock = lock_work_dir(work_dir)  # held while training: a second run in the same folder is refused
    try:
        seed = int(cfg.get("seed", 0))
        pl.seed_everything(seed, workers=True, verbose=False)
        datamodule = build_datamodule(cfg)
        datamodule.seed = seed
        if uses_median_frequency(cfg.get("model")):  # class_weight: median_frequency, from the training labels
            with config_errors(cfg):
                cfg = resolve_class_weights(cfg, datamodule.build_dataset("train"))
        model = build_model(cfg, pretrained=resume is None)  # resuming replaces every weight
        if options.load_from is not None and resume is None:
            _init_from(model, options.load_from)
        stored = storable_config(cfg)  # logger and callback objects recorded by their class_path
        atomic_write_text(os.path.join(work_dir, "config.yaml"), dump_config(stored))
        module = SegkitModule(model=model, config=stored.to_dict() if isinstance(stored, Config) else dict(stored),
                              work_dir=work_dir, engine=options)
        with_val = (cfg.get("data") or {}).get("val") is not None
        trainer = build_trainer(cfg, work_dir=work_dir, with_validation=with_val,
                                extra_callbacks=_engine_callbacks(cfg, options, work_dir=work_dir, seed=seed))
        with config_errors(cfg), writes_reported_once():
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
            except Exception as exc:
                if ended_by_sigterm(trainer, exc, wait=0.0):  # data-loading workers ended by the same SIGTERM
                    raise SIGTERMException() from exc
                error = _log_write_error(exc, work_dir)
                if error is None:
                    raise
                raise error from exc
    finally:
        if lock is not None:
            lock.close()
    return dict(module.last_metrics)


def _log_write_error(exc: Exception, work_dir: str) -> FileWriteError | None:
    """A full or read-only disk met by a logger (TensorBoard writes its event files itself) as a
    :class:`FileWriteError` naming the file, or the logs folder where the error does not say which."""
    if isinstance(exc, UserError):  # segkit's own writes say which file themselves
        return None
    path = getattr(exc, "filename", None) or os.path.join(work_dir, "logs")
    return write_error(os.fsdecode(path), exc, what="the training logs")


def _from_command_line(cfg: Mapping[str, Any], key: str) -> bool:
    """Whether ``trainer.<key>`` was given on the command line: an evaluation scores the whole split
    unless told otherwise there (a training config's limit, stored in its checkpoints, is for the
    validation during training)."""
    return isinstance(cfg, Config) and cfg.origins.get(f"trainer.{key}") == COMMAND_LINE


def _engine_callbacks(cfg: Mapping[str, Any], options: EngineOptions, *, work_dir: str, seed: int) -> list[pl.Callback]:
    callbacks: list[pl.Callback] = [EpochSeeding(seed), SaveOnInterrupt(os.path.join(work_dir, "checkpoints"))]
    every = options.checkpoint_every_n_steps
    if every is not None and (cfg.get("trainer") or {}).get("enable_checkpointing", True):
        # The same last.ckpt as at the end of each epoch, also every `every` optimizer steps.
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(work_dir, "checkpoints"), filename="last",
                                         every_n_train_steps=every, save_top_k=1, monitor=None,
                                         enable_version_counter=False))
    return callbacks


def _init_from(model: torch.nn.Module, path: str) -> None:
    """``engine.load_from``: the checkpoint's weights where they fit, reported in one line each."""
    from segkit.checkpoint import init_from_checkpoint

    report = init_from_checkpoint(model, path)
    rank_zero_info(f"initialised {len(report['loaded'])} tensors from {path}")
    if report["reinitialised"]:
        rank_zero_info(f"  kept the new initialisation of {len(report['reinitialised'])} tensors of another shape "
                       f"(trained from scratch): {', '.join(report['reinitialised'])}")
    if report["missing"]:
        rank_zero_info(f"  {len(report['missing'])} tensors are not in the checkpoint: {', '.join(report['missing'][:8])}")


def evaluate(cfg: Mapping[str, Any], checkpoint: str | None, *, split: str = "val") -> dict[str, float]:
    """Evaluate ``checkpoint`` (weights) with the model and data of ``cfg`` on ``split``.

    Raises:
        ConfigError: a value of ``cfg`` out of range (checked before any data is read).
        CheckpointError: ``checkpoint`` is missing, unreadable, or does not fit the model.
    """
    return evaluate_keeping_predictions(cfg, checkpoint, split=split, keep_predictions=False)[0]


def evaluate_keeping_predictions(cfg: Mapping[str, Any], checkpoint: str | None, *, split: str = "val",
                                 keep_predictions: bool = True) -> tuple[dict[str, float], Any]:
    """:func:`evaluate`, also returning the evaluator, whose per-image predictions are kept.

    Under DDP the evaluator of rank 0 holds the results of every image (merged from all ranks, the
    sampler's padding duplicates dropped); the other ranks' hold their own images only.

    Returns:
        ``(metrics, evaluator)``.
    """
    _quiet_lightning()
    check_run_config(cfg, training=False)
    work_dir = resolve_work_dir(cfg)
    datamodule = build_datamodule(cfg)
    model = build_model(cfg, pretrained=checkpoint is None)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    plain = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    module = SegkitModule(model=model, config=plain, work_dir=None)
    module.keep_predictions = keep_predictions
    trainer_cfg = dict(cfg)
    trainer_cfg["trainer"] = {k: v for k, v in (cfg.get("trainer") or {}).items()
                              if k in ("accelerator", "devices", "num_nodes", "strategy", "precision",
                                       "enable_progress_bar")
                              or (k in ("limit_val_batches", "limit_test_batches") and _from_command_line(cfg, k))}
    trainer = build_trainer(trainer_cfg, work_dir=work_dir, evaluate_only=True)
    with config_errors(cfg):
        if split == "test":
            trainer.test(module, datamodule=datamodule, verbose=False)
        else:
            trainer.validate(module, datamodule=datamodule, verbose=False)
    return dict(module.last_metrics), module.evaluator
