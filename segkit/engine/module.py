"""The LightningModule that trains and evaluates any registered segkit model.

The *system* (losses summed and logged, optimizer and schedule, evaluation across processes) lives
here; the *model* is a plain ``nn.Module`` built from the registries.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from segkit.checkpoint import CLASSES_KEY, CONFIG_KEY
from segkit.engine.optim import build_optimizer, build_scheduler
from segkit.errors import ConfigError
from segkit.fileio import atomic_write_json

__all__ = ["SegkitModule", "EVALUATION_RESERVED_KEYS", "check_num_classes"]

# Keys of the ``evaluation:`` section read by the engine; the rest configure the evaluator.
EVALUATION_RESERVED_KEYS = ("main_metric", "interval")


class SegkitModule(pl.LightningModule):
    """Wraps a model for Lightning.

    Args:
        model: any model following the I/O contract (losses in train mode, per-image dicts in eval).
        config: the merged config (stored in every checkpoint so ``segkit eval CKPT`` needs no file).
        work_dir: where ``metrics.json`` is written.
    """

    def __init__(self, *, model: nn.Module, config: Mapping[str, Any], work_dir: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = dict(config)
        self.work_dir = work_dir
        self.evaluator: Any = None
        self.last_metrics: dict[str, float] = {}
        self.metrics_history: list[dict[str, Any]] = []
        self.class_names: list[str] | None = None

    # ------------------------------------------------------------------ training
    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        return self.model(images, targets)

    def training_step(self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the training loss became {loss.item()} at step {self.global_step} "
                f"({ {k: round(float(v), 4) for k, v in losses.items()} }); lower optimizer.lr or add warmup."
            )
        batch_size = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.model, self.config.get("optimizer") or {"type": "SGD", "lr": 0.01})
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

    # ------------------------------------------------------------------ evaluation
    def _build_evaluator(self) -> Any:
        from segkit.registry import EVALUATORS

        cfg = {k: v for k, v in (self.config.get("evaluation") or {}).items() if k not in EVALUATION_RESERVED_KEYS}
        cfg.setdefault("type", "CocoEvaluator")
        datamodule = self.trainer.datamodule
        split = "val" if self.trainer.state.stage != "test" or not datamodule.split_cfgs.get("test") else "test"
        defaults: dict[str, Any] = {"dataset": datamodule.build_dataset(split)}
        threshold = getattr(self.model, "mask_threshold", None)
        if threshold is not None and "mask_threshold" in _parameters(EVALUATORS.get(str(cfg["type"]))):
            defaults["mask_threshold"] = threshold  # the model's test-time setting unless the config says
        return EVALUATORS.build(cfg, path="evaluation", **defaults)

    def on_validation_epoch_start(self) -> None:
        if self.evaluator is None:
            self.evaluator = self._build_evaluator()
        self.evaluator.reset()

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]], batch_idx: int) -> None:
        images, targets = batch
        outputs = self.model(images)
        # The size the model saw, so evaluators can map predictions back to ``orig_size``.
        targets = [{**t, "image_size": tuple(img.shape[-2:])} for t, img in zip(targets, images)]
        self.evaluator.process(targets, outputs)

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.metrics_history = list(checkpoint.get("segkit_metrics_history", []))
        self.class_names = checkpoint.get(CLASSES_KEY, self.class_names)


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
