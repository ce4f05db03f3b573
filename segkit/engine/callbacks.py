"""segkit's own run options (the ``engine:`` section) and what carries them out.

``trainer:`` goes to ``pytorch_lightning.Trainer`` unchanged; ``engine:`` holds the options that
segkit implements itself::

    engine:
      ema: {decay: 0.9998, warmup_iters: 2000}  # average of the weights, used for evaluation (off unless given)
      max_nonfinite_steps: 10                   # stop after this many non-finite steps in a row
      checkpoint_every_n_steps: null            # also write last.ckpt every N optimizer steps
      keep_best: 1                              # keep the k best checkpoints by evaluation.main_metric
      load_from: null                           # start from a checkpoint's (or a named model's) weights

Exact resume: the training order and every random draw of an epoch are a function of
``(seed, epoch, rank)`` only. :class:`EpochSampler` orders the training set by ``seed + epoch``
and seeds the loader's workers from its own generator; :class:`EpochSeeding` reseeds the global
random generators (``torch``, ``numpy``, ``random``) when each training epoch starts. A run
resumed from an end-of-epoch checkpoint therefore replays the following epochs exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from segkit.config_types import is_integer
from segkit.errors import ConfigError
from segkit.registry import check_arguments

__all__ = ["EMAOptions", "EngineOptions", "engine_options", "epoch_seed", "seed_all", "EpochSampler",
           "EpochSeeding", "ModelEMA"]


# ---------------------------------------------------------------------------- the engine: section
@dataclass(frozen=True)
class EMAOptions:
    """``engine.ema``: the decay and the number of updates over which it warms up (0: none)."""

    decay: float = 0.9998
    warmup_iters: int = 2000


@dataclass(frozen=True)
class EngineOptions:
    """The checked ``engine:`` section (see the module docstring)."""

    ema: EMAOptions | None = None
    max_nonfinite_steps: int = 10
    checkpoint_every_n_steps: int | None = None
    keep_best: int = 1
    load_from: str | None = None


def _engine_keys(*, ema: Any = None, max_nonfinite_steps: int = 10,
                 checkpoint_every_n_steps: int | None = None, keep_best: int = 1,
                 load_from: str | None = None) -> None:
    """The keys of ``engine:`` (a signature for ``check_arguments``)."""


def _ema_keys(*, decay: float = 0.9998, warmup_iters: int = 2000) -> None:
    """The keys of ``engine.ema`` (a signature for ``check_arguments``)."""


def engine_options(cfg: Mapping[str, Any]) -> EngineOptions:
    """Read and check the ``engine:`` section of ``cfg`` (absent: the defaults).

    Raises:
        ConfigError: an unknown key (with the nearest valid name) or a value out of range, naming
            ``engine.<key>``.

    Example:
        >>> engine_options({"engine": {"ema": {"decay": 0.999}}}).ema.decay
        0.999
    """
    section = cfg.get("engine")
    if section is None:
        return EngineOptions()
    if not isinstance(section, Mapping):
        raise ConfigError(f"engine must be a mapping such as {{max_nonfinite_steps: 10}}, got {section!r}",
                          key="engine")
    check_arguments(_engine_keys, section, path="engine", type_name="engine", kind="section")
    max_nonfinite = section.get("max_nonfinite_steps", 10)
    if not is_integer(max_nonfinite) or max_nonfinite < 1:
        raise ConfigError(f"max_nonfinite_steps is how many non-finite steps in a row stop training, a positive "
                          f"integer (1: stop at the first); got {max_nonfinite!r}", key="engine.max_nonfinite_steps")
    every = section.get("checkpoint_every_n_steps")
    if every is not None and (not is_integer(every) or every < 1):
        raise ConfigError(f"checkpoint_every_n_steps is a positive number of optimizer steps or null, got {every!r}",
                          key="engine.checkpoint_every_n_steps")
    keep_best = section.get("keep_best", 1)
    if not is_integer(keep_best) or keep_best < 1:
        raise ConfigError(f"keep_best is how many of the best checkpoints (by evaluation.main_metric) to keep, a "
                          f"positive integer; got {keep_best!r}", key="engine.keep_best")
    load_from = section.get("load_from")
    if load_from is not None and not isinstance(load_from, str):
        raise ConfigError(f"load_from is the path of a checkpoint to start from, or a weight name such as "
                          f"torchvision://maskrcnn_resnet50_fpn, got {load_from!r}", key="engine.load_from")
    return EngineOptions(ema=_ema_options(section.get("ema")), max_nonfinite_steps=int(max_nonfinite),
                         checkpoint_every_n_steps=None if every is None else int(every), keep_best=int(keep_best),
                         load_from=load_from)


def _ema_options(value: Any) -> EMAOptions | None:
    if value is None or value is False:
        return None
    if value is True:
        return EMAOptions()
    if not isinstance(value, Mapping):
        raise ConfigError(f"ema takes a mapping such as {{decay: 0.9998, warmup_iters: 2000}}, true or null; "
                          f"got {value!r}", key="engine.ema")
    check_arguments(_ema_keys, value, path="engine.ema", type_name="ema", kind="option")
    decay = value.get("decay", EMAOptions.decay)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ConfigError(f"decay is the weight of the old average per update, a number in [0, 1) such as 0.9998; "
                          f"got {decay!r}", key="engine.ema.decay")
    warmup = value.get("warmup_iters", EMAOptions.warmup_iters)
    if not is_integer(warmup) or warmup < 0:
        raise ConfigError(f"warmup_iters is a number of updates >= 0 (0: no warm-up), got {warmup!r}",
                          key="engine.ema.warmup_iters")
    return EMAOptions(decay=float(decay), warmup_iters=int(warmup))



# ---------------------------------------------------------------------------- seeding
def epoch_seed(seed: int, epoch: int, rank: int = 0, *, stream: int = 0) -> int:
    """A 32-bit seed that depends only on its arguments (well mixed: nearby inputs give unrelated seeds).

    Args:
        seed: the config's ``seed``.
        epoch: the training epoch (from 0).
        rank: the process's global rank.
        stream: tells apart generators seeded for the same epoch.
    """
    return int(np.random.SeedSequence([int(seed) % 2**32, int(epoch), int(rank), int(stream)]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Seed ``torch`` (CPU and every CUDA device), ``numpy`` and ``random`` with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochSampler(DistributedSampler):
    """Orders the training set by ``(seed, epoch)`` only, and seeds the loader's workers likewise.

    A ``DistributedSampler`` (in one process: every index), so Lightning keeps it under DDP. Its
    ``generator`` is meant for the DataLoader: the workers' base seed, from which Lightning's
    worker seeding derives each worker's seed, is drawn from it, and it is reseeded from
    ``(seed, epoch, rank)`` whenever the epoch changes.

    Args:
        dataset: the training dataset.
        seed: the config's ``seed``.
        epoch: the epoch the first iteration belongs to.
        num_replicas, rank: the number of processes and this one's rank.
    """

    def __init__(self, dataset: Dataset, *, seed: int, epoch: int = 0, num_replicas: int = 1,
                 rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.generator = torch.Generator()
        #: The epoch of the most recent ``__iter__`` (``None`` before the first).
        self.iterated_epoch: int | None = None
        #: Indices to leave out at the start of the next iteration (a run resumed within an epoch).
        self.skip = 0
        self.epoch = -1
        self.set_epoch(epoch)

    @classmethod
    def for_trainer(cls, dataset: Dataset, trainer: pl.Trainer | None, *, seed: int) -> EpochSampler | None:
        """The sampler for ``trainer``'s next training epoch (``None`` without a trainer)."""
        if trainer is None:
            return None
        return cls(dataset, seed=seed, epoch=trainer.fit_loop.epoch_progress.current.processed,
                   num_replicas=trainer.world_size, rank=trainer.global_rank)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.generator.manual_seed(epoch_seed(self.seed, epoch, self.rank, stream=1))

    def __iter__(self) -> Iterator[int]:
        self.iterated_epoch = self.epoch
        skip, self.skip = self.skip, 0
        return iter(list(super().__iter__())[skip:])


class EpochSeeding(pl.Callback):
    """Reseeds the global random generators from ``(seed, epoch, rank)`` when a training epoch starts.

    Everything random in an epoch (the model's sampling of proposals, augmentations drawn in the
    main process) then depends on the epoch and the weights only, not on what ran before.

    When a run starts from a checkpoint, Lightning has made the loader's iterator before the
    checkpoint's epoch was known; with loader workers that iterator is made again. A checkpoint
    written within an epoch (``engine.checkpoint_every_n_steps``) resumes with the batches of the
    epoch that were not trained yet, in their order; the random draws of the rest of that epoch
    (augmentations, the model's sampling) differ from an uninterrupted run's, the following
    epochs' do not.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.fit_loop.epoch_progress.current.processed
        within = bool(getattr(trainer.fit_loop, "restarted_mid_epoch", False))
        if within:  # Lightning calls no on_train_epoch_start for the epoch it continues
            seed_all(epoch_seed(self.seed, epoch, trainer.global_rank))
        sampler = _epoch_sampler(trainer)
        if sampler is None:
            return
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed if within else 0
        if 0 < done < trainer.num_training_batches:
            sampler.skip = done * int(trainer.train_dataloader.batch_size or 1)
            rank_zero_info(f"continuing epoch {epoch} after its first {done} batches (the random draws of the rest "
                           f"of this epoch differ from an uninterrupted run's)")
        if sampler.iterated_epoch is None or (sampler.iterated_epoch == epoch and not sampler.skip):
            return  # no iterator yet, or the right one
        sampler.set_epoch(epoch)
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if fetcher is None:
            warnings.warn(f"the training data of epoch {epoch} were prepared before the checkpoint was restored "
                          f"and cannot be prepared again; the resumed run may draw other samples than an "
                          f"uninterrupted one", RuntimeWarning, stacklevel=2)
            return
        iter(fetcher)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed_all(epoch_seed(self.seed, trainer.current_epoch, trainer.global_rank))


def _epoch_sampler(trainer: pl.Trainer) -> EpochSampler | None:
    loader = trainer.train_dataloader
    sampler = getattr(loader, "sampler", None)
    return sampler if isinstance(sampler, EpochSampler) else None


# ---------------------------------------------------------------------------- EMA of the weights
class ModelEMA:
    """An exponential moving average of a model's trainable parameters.

    After each optimizer step, ``ema = d * ema + (1 - d) * param`` for every parameter that
    requires gradients, with ``d = decay * (1 - exp(-updates / warmup_iters))`` (``d = decay``
    when ``warmup_iters`` is 0), as in YOLOX and timm: early on the average follows the
    fast-changing weights closely. Buffers (BatchNorm statistics) and frozen parameters are not
    averaged: the averaged model uses the live model's values for them.

    Args:
        model: the model whose parameters are averaged (the average starts as a copy of them).
        decay, warmup_iters: see above.

    Example:
        >>> ema = ModelEMA(model, decay=0.9998, warmup_iters=2000)
        >>> optimizer.step(); ema.update(model)
        >>> with ema.applied_to(model):
        ...     evaluate(model)
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.9998, warmup_iters: int = 2000) -> None:
        self.decay = float(decay)
        self.warmup_iters = int(warmup_iters)
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
        }
        self._backup: dict[str, torch.Tensor] | None = None

    def decay_at(self, updates: int) -> float:
        """The decay ``d`` of the ``updates``-th update."""
        if self.warmup_iters <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-updates / self.warmup_iters))

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = dict(model.named_parameters())
        missing = [name for name in self.shadow if name not in params]
        if missing:
            raise RuntimeError(f"the averaged weights name parameters the model does not have: {missing[:5]}")
        live = [params[name].detach() for name in self.shadow]
        for (name, avg), p in zip(list(self.shadow.items()), live):
            if avg.device != p.device or avg.dtype != p.dtype:
                self.shadow[name] = avg.to(device=p.device, dtype=p.dtype)
        return list(self.shadow.values()), live

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current parameters (call after each optimizer step)."""
        self.updates += 1
        averages, live = self._pairs(model)
        if averages:
            # lerp(avg, p, 1 - d) = d * avg + (1 - d) * p, and leaves a parameter that did not move unchanged.
            torch._foreach_lerp_(averages, live, 1.0 - self.decay_at(self.updates))

    def averaged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the averaged parameters in place of the live ones."""
        state = model.state_dict()
        for name, value in self.shadow.items():
            if name in state:
                state[name] = value.detach()
        return state

    def state_dict(self, model: nn.Module) -> dict[str, Any]:
        """What a checkpoint stores: the averaged model's full state dict and the update count."""
        return {"state_dict": self.averaged_state_dict(model), "updates": self.updates, "decay": self.decay,
                "warmup_iters": self.warmup_iters}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the update count and the averages)."""
        saved = state.get("state_dict") or {}
        for name in self.shadow:
            if name in saved:
                self.shadow[name] = saved[name].detach().clone().to(self.shadow[name])
        self.updates = int(state.get("updates", 0))

    @property
    def applied(self) -> bool:
        """Whether the averaged parameters are currently in the model (see :meth:`apply`)."""
        return self._backup is not None

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Put the averaged parameters into ``model``, keeping its own to :meth:`restore` later."""
        if self._backup is not None:
            return
        averages, live = self._pairs(model)
        self._backup = {name: p.clone() for name, p in zip(self.shadow, live)}
        torch._foreach_copy_(live, averages)

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put back the parameters that :meth:`apply` replaced."""
        if self._backup is None:
            return
        params = dict(model.named_parameters())
        for name, value in self._backup.items():
            params[name].detach().copy_(value)
        self._backup = None

    def live_parameters(self) -> dict[str, torch.Tensor]:
        """The model's own parameters while the averages are applied (empty otherwise)."""
        return dict(self._backup or {})

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run a block with the averaged parameters in ``model``; its own come back afterwards."""
        self.apply(model)
        try:
            yield model
        finally:
            self.restore(model)
