"""The LightningModule that trains and evaluates any registered segkit model.

The *system* (losses summed and logged, optimizer and schedule, evaluation across processes) lives
here; the *model* is a plain ``nn.Module`` built from the registries.

A step whose loss (on any process) or gradients are not finite is skipped: no weight update (and
the running statistics of BatchNorm are put back as they were before its forward pass), a
warning with the step and each loss, ``train/nonfinite_steps`` counts them; after
``engine.max_nonfinite_steps`` in a row training stops with :class:`TrainingDivergedError`. With
``engine.ema`` an average of the weights is updated after every optimizer step, evaluated in their
place, and stored in checkpoints (see :mod:`segkit.engine.callbacks`).
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from segkit.checkpoint import CLASSES_KEY, CONFIG_KEY, EMA_KEY
from segkit.engine.callbacks import EngineOptions, ModelEMA, engine_options
from segkit.engine.optim import BatchSize, build_optimizer, build_scheduler, fused_allowed
from segkit.errors import ConfigError, UserError
from segkit.fileio import atomic_write_json
from segkit.models.base import describe

__all__ = ["SegkitModule", "TrainingDivergedError", "EVALUATION_RESERVED_KEYS", "check_num_classes"]

# Keys of the ``evaluation:`` section read by the engine; the rest configure the evaluator.
EVALUATION_RESERVED_KEYS = ("main_metric", "interval")
#: Checkpoint key of the non-finite step counts (``{"total": n, "in_a_row": m}``).
NONFINITE_KEY = "segkit_nonfinite_steps"


class TrainingDivergedError(UserError):
    """Training stopped because too many steps in a row had a non-finite loss or gradients."""


class SegkitModule(pl.LightningModule):
    """Wraps a model for Lightning.

    Args:
        model: any model following the I/O contract (losses in train mode, per-image dicts in eval).
        config: the merged config (stored in every checkpoint so ``segkit eval CKPT`` needs no file).
        work_dir: where ``metrics.json`` is written.
        engine: the checked ``engine:`` section (default: read from ``config``).
    """

    def __init__(self, *, model: nn.Module, config: Mapping[str, Any], work_dir: str | None = None,
                 engine: EngineOptions | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = dict(config)
        self.work_dir = work_dir
        self.engine = engine if engine is not None else engine_options(self.config)
        self.ema: ModelEMA | None = None
        self._ema_pending: Mapping[str, Any] | None = None  # from a checkpoint, until the average exists
        self.nonfinite_steps = 0  # skipped steps in all
        self.nonfinite_in_a_row = 0  # skipped steps since the last weight update
        self._good_batches = 0  # batches with a finite loss since the last optimizer step
        self.evaluator: Any = None
        self.last_metrics: dict[str, float] = {}
        self.metrics_history: list[dict[str, Any]] = []
        self.class_names: list[str] | None = None
        #: Evaluators keep their per-image predictions (``segkit eval --results`` / ``--show``).
        self.keep_predictions = False

    # ------------------------------------------------------------------ training
    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        return self.model(images, targets)

    def training_step(self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        buffers = [b.clone() for b in self.model.buffers()]  # BatchNorm statistics before this batch
        losses = self.model(images, targets)
        loss = sum(losses.values())
        local_nonfinite = ~torch.isfinite(loss.detach())
        # Every process skips together (a process that skipped alone would leave the others waiting for it).
        if self._any_process(local_nonfinite):
            # A forward pass that overflowed has also put NaN into the running statistics: undo it too.
            with torch.no_grad():
                for buffer, before in zip(self.model.buffers(), buffers):
                    buffer.copy_(before)
            self._skip_step(f"the training loss is {loss.item()} ({_format_losses(losses)})"
                            if local_nonfinite.item() else "another process's training loss is not finite")
            return self._zero_loss()
        self._good_batches += 1
        batch_size = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        return loss

    def _zero_loss(self) -> torch.Tensor:
        """A loss whose backward pass gives every trainable parameter a zero gradient.

        It stands in for a skipped batch: backward still runs (DDP synchronises gradients in it on
        every process), and :meth:`on_before_optimizer_step` drops the gradients when no batch of
        the step was good, so the optimizer leaves the weights and its state alone.
        """
        return torch.stack([p.sum() for p in self.parameters() if p.requires_grad]).sum() * 0.0

    def _any_process(self, flag: torch.Tensor) -> bool:
        flag = flag.to(torch.float32)
        if self.trainer.world_size > 1:
            flag = self.trainer.strategy.reduce(flag, reduce_op="max")
        return bool(flag.item() > 0)

    def _skip_step(self, reason: str) -> None:
        """Count a step without weight update, warn, and stop after ``engine.max_nonfinite_steps`` in a row.

        Raises:
            TrainingDivergedError: when that many steps in a row were skipped.
        """
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        limit = self.engine.max_nonfinite_steps
        where = f"step {self.global_step} (epoch {self.current_epoch}" + (
            f", process {self.global_rank})" if self.trainer.world_size > 1 else ")")
        if self.nonfinite_in_a_row >= limit:
            raise TrainingDivergedError(
                f"training stopped at {where}: {self.nonfinite_in_a_row} step(s) in a row had a non-finite loss or "
                f"gradients (engine.max_nonfinite_steps: {limit}); the last one: {reason}. The run diverged: lower "
                f"optimizer.lr, add a warm-up (scheduler.warmup_iters) or clip gradients (trainer.gradient_clip_val), "
                f"then train again. {self.nonfinite_steps} step(s) were skipped in all."
            )
        warnings.warn(f"{where}: {reason}; skipped the step without updating the weights "
                      f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_steps} in all; training stops at "
                      f"{limit} in a row, engine.max_nonfinite_steps)", RuntimeWarning, stacklevel=2)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._good_batches == 0:  # every batch of this step was skipped
            optimizer.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
            return
        # Under a GradScaler (16-mixed) non-finite gradients are normal and the scaler skips those steps itself.
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        if _all_finite(grads):
            return
        optimizer.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
        self._skip_step("the gradients are not finite")

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._good_batches = 0
        # Gradients are left in place until the next step; none means the step was skipped.
        if any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
            self.nonfinite_in_a_row = 0
            if self.ema is not None:
                self.ema.update(self.model)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False, batch_size=1)

    def on_fit_start(self) -> None:
        options = self.engine.ema
        if options is not None and self.ema is None:
            self.ema = ModelEMA(self.model, decay=options.decay, warmup_iters=options.warmup_iters)
            if self._ema_pending is not None:
                self.ema.load_state_dict(self._ema_pending)
                self._ema_pending = None

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.model, self.config.get("optimizer") or {"type": "SGD", "lr": 0.01},
                                    batch_size=BatchSize.of_trainer(self.trainer),
                                    allow_fused=fused_allowed(self.trainer))
        total = int(self.trainer.estimated_stepping_batches)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        iters_per_epoch = max(1, math.ceil(total / epochs))
        scheduler = build_scheduler(optimizer, self.config.get("scheduler"), total_iters=total,
                                    iters_per_epoch=iters_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        split = "train" if stage == "fit" else ("test" if stage == "test" else "val")
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and datamodule.split_cfgs.get(split) is not None:
            dataset = datamodule.build_dataset(split)
            check_num_classes(self.config.get("model") or {}, dataset, split=split)
            if getattr(dataset, "classes", None) is not None:
                self.class_names = [str(name) for name in dataset.classes]
        if stage == "fit" and datamodule is not None and datamodule.split_cfgs.get("val") is not None \
                and self.evaluator is None:
            self.evaluator = self._build_evaluator()  # an evaluator that does not fit the data fails before training

    # ------------------------------------------------------------------ evaluation
    def _build_evaluator(self) -> Any:
        from segkit.registry import EVALUATORS

        cfg = {k: v for k, v in (self.config.get("evaluation") or {}).items() if k not in EVALUATION_RESERVED_KEYS}
        cfg.setdefault("type", self.model.default_evaluator)
        datamodule = self.trainer.datamodule
        split = "val" if self.trainer.state.stage != "test" or not datamodule.split_cfgs.get("test") else "test"
        defaults: dict[str, Any] = {"dataset": datamodule.build_dataset(split)}
        threshold = describe(self.model).mask_threshold
        if threshold is not None and "mask_threshold" in _parameters(EVALUATORS.get(str(cfg["type"]))):
            defaults["mask_threshold"] = threshold  # the model's test-time setting unless the config says
        # A constructor's ValueError (an evaluator that does not fit the dataset) names the evaluation section.
        evaluator = EVALUATORS.build_child(cfg, path="evaluation", **defaults)
        if self.keep_predictions:
            evaluator.keep_predictions = True
        return evaluator

    def on_validation_epoch_start(self) -> None:
        if self.evaluator is None:
            self.evaluator = self._build_evaluator()
        self.evaluator.reset()
        if self.ema is not None:
            self.ema.apply(self.model)  # evaluate the averaged weights; on_validation_epoch_end puts them back

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]], batch_idx: int) -> None:
        images, targets = batch
        outputs = self.model(images)
        # The size the model saw, so evaluators can map predictions back to ``orig_size``.
        targets = [{**t, "image_size": tuple(img.shape[-2:])} for t, img in zip(targets, images)]
        self.evaluator.process(targets, outputs)

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        if self.ema is not None:
            self.ema.restore(self.model)  # before any checkpoint of this evaluation is written
        if self.trainer.sanity_checking:
            return
        from segkit.evaluation.distributed import evaluate_distributed

        # Per-image results from every process, padding duplicates dropped, scored once on rank 0.
        metrics = evaluate_distributed(self.evaluator)
        self.last_metrics = metrics
        # Every rank logs the same numbers, so checkpoint callbacks agree across processes.
        self.log_dict({k: v for k, v in metrics.items() if math.isfinite(v)}, sync_dist=False)
        if self.trainer.is_global_zero:
            self._report(metrics)

    on_test_epoch_end = on_validation_epoch_end

    def _report(self, metrics: dict[str, float]) -> None:
        from segkit.evaluation.table import format_metrics_table

        stage = "test" if self.trainer.state.stage == "test" else "val"
        header = f"Evaluation ({stage}) after epoch {self.current_epoch}, step {self.global_step}"
        print(f"\n{header}\n{format_metrics_table(metrics)}", flush=True)
        self.metrics_history.append({"epoch": self.current_epoch, "step": self.global_step, "split": stage,
                                     "metrics": metrics})
        if self.work_dir and self.trainer.state.fn == "fit":
            # Latest numbers at the top level under their stable names, every evaluation in "history".
            latest = {**metrics, "epoch": self.current_epoch, "step": self.global_step}
            atomic_write_json(os.path.join(self.work_dir, "metrics.json"), {**latest, "history": self.metrics_history})

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.config
        if self.class_names is not None:
            checkpoint[CLASSES_KEY] = self.class_names
        checkpoint["segkit_metrics_history"] = self.metrics_history
        checkpoint[NONFINITE_KEY] = {"total": self.nonfinite_steps, "in_a_row": self.nonfinite_in_a_row}
        if self.ema is not None:
            state = checkpoint.get("state_dict")
            if isinstance(state, dict):  # the trained weights, also if a checkpoint is written during evaluation
                state.update({f"model.{name}": value for name, value in self.ema.live_parameters().items()})
            checkpoint[EMA_KEY] = self.ema.state_dict(self.model)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.metrics_history = list(checkpoint.get("segkit_metrics_history", []))
        self.class_names = checkpoint.get(CLASSES_KEY, self.class_names)
        counts = checkpoint.get(NONFINITE_KEY) or {}
        self.nonfinite_steps = int(counts.get("total", 0))
        self.nonfinite_in_a_row = int(counts.get("in_a_row", 0))
        ema = checkpoint.get(EMA_KEY)
        if isinstance(ema, Mapping) and self.engine.ema is not None:
            if self.ema is not None:
                self.ema.load_state_dict(ema)
            else:
                self._ema_pending = ema  # the average is made in on_fit_start, once the model is on its device


def check_num_classes(model_cfg: Mapping[str, Any], dataset: Any, *, split: str) -> None:
    """Refuse a model whose ``num_classes`` differs from the dataset's number of categories.

    Raises:
        ConfigError: naming the ``num_classes`` key, both numbers and the dataset's classes.
    """
    expected = getattr(dataset, "num_classes", None)
    if expected is None:
        return
    for key, value in _find_keys(model_cfg, "num_classes", "model"):
        if value != expected:
            names = ", ".join(getattr(dataset, "classes", [])[:10])
            raise ConfigError(
                f"{key}={value} but data.{split} has {expected} categories ({names}); set {key}: {expected}",
                key=key,
            )


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element is finite: one fused pass for the 2-norms (fast, but a norm of huge
    finite values can overflow), and only if one is not finite, the exact test by the largest |x|."""
    if bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, 2))).all()):
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf")))).all())


def _format_losses(losses: Mapping[str, torch.Tensor]) -> str:
    return ", ".join(f"{name}={float(value.detach()):.4g}" for name, value in losses.items())


def _find_keys(node: Any, name: str, path: str) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    if isinstance(node, Mapping):
        for key, value in node.items():
            sub = f"{path}.{key}"
            if key == name and isinstance(value, int):
                found.append((sub, value))
            else:
                found += _find_keys(value, name, sub)
    return found


def _parameters(obj: Any) -> set[str]:
    try:
        return set(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return set()
