"""Synchronised BatchNorm for multi-process training (``model.sync_bn: true``), on GPUs and CPUs.

With synchronised BatchNorm every process normalises with the mean and variance of the whole
batch over all processes instead of its own share, which matters when a process holds only a few
images. On CUDA devices the BatchNorm layers become PyTorch's ``nn.SyncBatchNorm``. PyTorch's
layer refuses CPU tensors, so CPU processes (the gloo backend) get :class:`CpuSyncBatchNorm`,
which all-reduces the per-channel sums. Lightning applies the conversion when a multi-process
fit starts (single-process training keeps plain BatchNorm) and reverts it when the fit ends; the
state dict keys do not change, so checkpoints load into the plain model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning.plugins.layer_sync import LayerSync, TorchSyncBatchNorm
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["CpuSyncBatchNorm", "SyncBatchNormPlugin"]


class CpuSyncBatchNorm(_BatchNorm):
    """BatchNorm over the batches of all processes, for any device and backend (gloo included).

    In training mode, with a process group of more than one process, the mean and the biased
    variance of every channel come from sums all-reduced over the processes (gradients flow
    through the reduction, as in ``nn.SyncBatchNorm``) and the running statistics are updated
    with the unbiased variance of the whole batch. Otherwise it is plain BatchNorm. Statistics
    are computed in float32 at least; the output has the input's dtype.

    Args:
        num_features, eps, momentum, affine, track_running_stats: as in ``nn.BatchNorm2d``.
        process_group: the processes to synchronise (default: all).

    Example:
        >>> bn = CpuSyncBatchNorm(16)
        >>> bn(torch.rand(2, 16, 8, 8)).shape  # plain BatchNorm outside a distributed run
        torch.Size([2, 16, 8, 8])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group
        self.source_type: type[nn.Module] | None = None  # the layer this one replaced, for revert()

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}")

    def _world_size(self) -> int:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group or dist.group.WORLD)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if self._world_size() == 1:
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        group = self.process_group or dist.group.WORLD
        x = input if input.dtype == torch.float64 else input.float()
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        count = x.new_tensor([x.numel() // max(1, x.shape[1])])
        sums = all_reduce(torch.cat([x.sum(dims), count]), group=group)
        total = sums[-1]
        mean = sums[:-1] / total
        centered = x - mean.view(shape)
        var = all_reduce(centered.square().sum(dims), group=group) / total
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            self._update_running_stats(mean.detach(), var.detach(), float(total))
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: float) -> None:
        assert self.num_batches_tracked is not None and self.running_mean is not None and self.running_var is not None
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (count / max(count - 1.0, 1.0))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def _replace_batchnorms(module: nn.Module, convert: Any) -> nn.Module:
    """``module`` with every layer for which ``convert`` returns a new one replaced, recursively."""
    replaced = convert(module)
    if replaced is not None:
        return replaced
    for name, child in module.named_children():
        new = _replace_batchnorms(child, convert)
        if new is not child:
            module.add_module(name, new)
    return module


def _move_state(source: nn.Module, target: nn.Module) -> nn.Module:
    """Give ``target`` the parameters, buffers and mode of ``source`` (the same tensors, not copies)."""
    if getattr(source, "affine", False):
        target.weight = source.weight
        target.bias = source.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if getattr(source, name, None) is not None:
            setattr(target, name, getattr(source, name))
    target.train(source.training)
    return target


def _to_cpu_sync(module: nn.Module) -> nn.Module | None:
    if not isinstance(module, _BatchNorm) or isinstance(module, CpuSyncBatchNorm):
        return None
    new = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                           module.track_running_stats)
    new.source_type = type(module)
    return _move_state(module, new)


def _from_cpu_sync(module: nn.Module) -> nn.Module | None:
    if not isinstance(module, CpuSyncBatchNorm):
        return None
    source = module.source_type or nn.BatchNorm2d
    new = source(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
    return _move_state(module, new)


class SyncBatchNormPlugin(LayerSync):
    """Lightning ``LayerSync`` plugin: PyTorch's SyncBatchNorm on accelerators, :class:`CpuSyncBatchNorm` on CPUs.

    Lightning calls :meth:`apply` when a multi-process fit starts (before the model moves to its
    device) and :meth:`revert` when it ends.
    """

    def apply(self, model: nn.Module) -> nn.Module:
        from pytorch_lightning.utilities.rank_zero import rank_zero_info

        count = sum(isinstance(m, _BatchNorm) for m in model.modules())
        on_cpu = _root_device(model).type == "cpu"
        rank_zero_info(f"model.sync_bn: {count} BatchNorm layer(s) synchronised across processes "
                       f"({'CpuSyncBatchNorm' if on_cpu else 'torch.nn.SyncBatchNorm'})")
        if not on_cpu:
            return TorchSyncBatchNorm().apply(model)
        return _replace_batchnorms(model, _to_cpu_sync)

    def revert(self, model: nn.Module) -> nn.Module:
        model = _replace_batchnorms(model, _from_cpu_sync)
        return TorchSyncBatchNorm().revert(model)


def _root_device(model: nn.Module) -> torch.device:
    """The device the strategy trains ``model`` (a LightningModule) on; CPU when no trainer is attached."""
    try:
        return model.trainer.strategy.root_device  # type: ignore[union-attr]
    except (AttributeError, RuntimeError):
        return torch.device("cpu")
