"""Inputs of ``segkit bench``: synthetic batches of a given size for detectors and segmentors, the
config's own datasets and loaders (errors kept as reasons to skip a phase), and the ``data`` and
``eval`` phases, which time the train ``DataLoader`` and the config's evaluator.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from segkit.bench.measure import sync_device
from segkit.errors import UserError
from segkit.models.base import describe

Batch = tuple[list[Tensor], list[dict[str, Any]]]


def synthetic_batch(batch_size: int, size: tuple[int, int], task: str, num_classes: int, masks: bool, *,
                    generator: torch.Generator) -> Batch:
    """Random images in [0, 1] with targets for ``task`` (``"detection"`` or ``"semantic"``).

    Detection: six boxes per image (xyxy pixels inside the image, 10-40 % of its sides), labels in
    1..K and, with ``masks``, the boxes filled as uint8 masks. Semantic: ``sem_seg`` int64 [H, W]
    with classes 0..K-1.
    """
    height, width = size
    images, targets = [], []
    ys, xs = torch.arange(height)[:, None], torch.arange(width)[None, :]
    scale = torch.tensor([width, height], dtype=torch.float32)
    for _ in range(batch_size):
        images.append(torch.rand(3, height, width, generator=generator))
        if task == "semantic":
            targets.append({"sem_seg": torch.randint(0, num_classes, (height, width), generator=generator)})
            continue
        xy = torch.rand(6, 2, generator=generator) * 0.6 * scale
        wh = (0.1 + 0.3 * torch.rand(6, 2, generator=generator)) * scale
        boxes = torch.cat([xy, xy + wh], 1)
        target = {"boxes": boxes, "labels": torch.randint(1, num_classes + 1, (6,), generator=generator)}
        if masks:
            target["masks"] = ((xs >= boxes[:, 0, None, None]) & (xs < boxes[:, 2, None, None])
                               & (ys >= boxes[:, 1, None, None]) & (ys < boxes[:, 3, None, None])).to(torch.uint8)
        targets.append(target)
    return images, targets


def model_task(model: nn.Module) -> tuple[str, int, bool]:
    """``(task, num_classes, masks)`` of a model, for synthetic targets."""
    info = describe(model)
    return ("detection" if info.is_detector else "semantic"), info.num_classes, info.has_masks


def to_device(batch: Batch, device: torch.device) -> Batch:
    images, targets = batch
    return ([image.to(device) for image in images],
            [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets])


class DataSource:
    """The config's datasets and loaders, built on first use; errors are kept as reasons, not raised."""

    def __init__(self, cfg: Mapping[str, Any], batch_size: int) -> None:
        self.cfg = cfg
        self.batch_size = batch_size
        self.errors: dict[str, str] = {}
        self._datasets: dict[str, Any] = {}
        self._module: Any = None

    def module(self) -> Any:
        if self._module is None and "datamodule" not in self.errors:
            from segkit.engine.datamodule import build_datamodule

            try:
                self._module = build_datamodule(self.cfg)
            except (UserError, OSError) as exc:
                self.errors["datamodule"] = str(exc)
            else:
                self._module.batch_size = self.batch_size
        return self._module

    def get(self, split: str) -> Any:
        if split not in self._datasets and split not in self.errors:
            module = self.module()
            if module is None:
                return None
            try:
                self._datasets[split] = module.build_dataset(split)
            except (UserError, OSError) as exc:
                self.errors[split] = str(exc)
        return self._datasets.get(split)

    def eval_dataset(self) -> Any:
        return self.get("val") if (self.cfg.get("data") or {}).get("val") is not None else self.get("train")

    def first_error(self) -> str:
        return next(iter(self.errors.values()), "no data section")

    def batches(self, count: int) -> tuple[list[Batch], Batch]:
        """``count`` training batches from data.train (cycled through it) and one inference batch."""
        from segkit.data.collate import collate

        train, evaluation = self.get("train"), self.eval_dataset()
        samples = [train[i % len(train)] for i in range(count * self.batch_size)]
        batches = [collate(samples[i:i + self.batch_size]) for i in range(0, len(samples), self.batch_size)]
        return batches, collate([evaluation[i % len(evaluation)] for i in range(self.batch_size)])


def bench_data(data: DataSource, batch_size: int, iters: int, log: Callable[[str], None]) -> dict[str, Any] | str:
    """Images/s through the train DataLoader, from the first batch's arrival (worker start-up is
    ``data_first_batch_s``); at least 4 batches per worker so prefetched batches do not dominate."""
    if data.get("train") is None:
        return f"data.train cannot be read: {data.errors.get('train') or data.first_error()}"
    module = data.module()
    count = max(iters, 4 * module.num_workers)
    log(f"segkit bench: data loading, batch {batch_size}, {module.num_workers} worker(s): up to {count} batches")
    start = time.perf_counter()
    iterator: Iterator[Batch] = iter(module.train_dataloader())
    first = next(iterator)
    first_s = time.perf_counter() - start
    images = batches = 0
    start = time.perf_counter()
    for batch in itertools.islice(iterator, count):
        images += len(batch[0])
        batches += 1
    elapsed = time.perf_counter() - start
    del iterator
    if batches == 0:  # one batch in the whole dataset: start-up included
        images, elapsed = len(first[0]), first_s
    return {"data_img_s": images / elapsed if elapsed > 0 else None, "data_first_batch_s": first_s,
            "data_batches": batches, "data_images": images, "data_workers": module.num_workers}


def bench_eval(cfg: Mapping[str, Any], model: nn.Module, data: DataSource, device: torch.device, iters: int,
                log: Callable[[str], None]) -> dict[str, Any] | str:
    """The config's evaluator on ``iters`` validation batches: ``process`` of each batch's outputs
    and one ``evaluate``; the model's own time is ``eval_model_s``."""
    from segkit.config import config_errors
    from segkit.engine.module import EVALUATION_RESERVED_KEYS
    from segkit.registry import EVALUATORS

    split = "val" if (cfg.get("data") or {}).get("val") is not None else None
    dataset = data.get(split) if split else None
    if split is None:
        return "the config has no data.val"
    if dataset is None:
        return f"data.val cannot be read: {data.errors.get('val') or data.first_error()}"
    eval_cfg = {k: v for k, v in (cfg.get("evaluation") or {}).items() if k not in EVALUATION_RESERVED_KEYS}
    threshold = describe(model).mask_threshold  # (refuses a model without the contract)
    eval_cfg.setdefault("type", model.default_evaluator)
    defaults: dict[str, Any] = {"dataset": dataset}
    with config_errors(cfg):
        evaluator_class = EVALUATORS.get(str(eval_cfg["type"]), key="evaluation.type")
        if threshold is not None and "mask_threshold" in inspect.signature(evaluator_class).parameters:
            defaults["mask_threshold"] = threshold  # the model's test-time setting, as in training
        evaluator = EVALUATORS.build(eval_cfg, path="evaluation", **defaults)
    evaluator.reset()
    log(f"segkit bench: evaluation with {eval_cfg['type']}: {iters} validation batch(es)")
    model.eval()
    model_s = process_s = 0.0
    images = 0
    with torch.no_grad():
        for batch in itertools.islice(iter(data.module().val_dataloader()), iters):
            inputs, targets = to_device(batch, device)
            start = time.perf_counter()
            outputs = model(inputs)
            sync_device(device)
            model_s += time.perf_counter() - start
            targets = [{**t, "image_size": tuple(img.shape[-2:])} for t, img in zip(targets, inputs)]
            start = time.perf_counter()
            evaluator.process(targets, outputs)
            process_s += time.perf_counter() - start
            images += len(inputs)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # pycocotools prints its tables
        evaluator.evaluate()
    evaluate_s = time.perf_counter() - start
    return {"eval_s": process_s + evaluate_s, "eval_process_s": process_s, "eval_evaluate_s": evaluate_s,
            "eval_images": images, "eval_model_s": model_s}


def keep_input_size(cfg: dict[str, Any], size: tuple[int, int]) -> list[str]:
    """Make a resizing detector keep synthetic images at their size, unless the command line set it."""
    from segkit.config import COMMAND_LINE

    model = cfg.get("model") or {}
    origins = getattr(cfg, "origins", {})
    if model.get("min_size") is None or COMMAND_LINE in (origins.get("model.min_size"), origins.get("model.max_size")):
        return []
    old = (model.get("min_size"), model.get("max_size"))
    model["min_size"], model["max_size"] = min(size), max(size)
    return [f"model.min_size/max_size {old[0]}/{old[1]} -> {min(size)}/{max(size)} so the network sees the "
            f"{size[0]}x{size[1]} synthetic images unresized (set them on the command line to keep a resize)"]
