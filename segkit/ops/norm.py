"""Normalisation layers by name, as configs spell them (``norm: GN``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from segkit.ops.deform_conv import ModulatedDeformConv2d

__all__ = ["NORMS", "LayerNorm2d", "check_norm", "fixed_affine", "fold_conv_norm", "hold_in_eval", "make_norm"]

#: Names :func:`make_norm` accepts.
NORMS = ("BN", "SyncBN", "GN", "FrozenBN", "LN")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each position of a Tensor[N, C, H, W] (the norm of ViTDet's simple
    feature pyramid and of ConvNeXt's downsampling layers): ``nn.LayerNorm(C)`` applied to the channels-last
    map, so that its ``weight`` and ``bias`` are per channel and it counts as a LayerNorm for weight decay."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


def make_norm(norm: str, channels: int) -> nn.Module:
    """A normalisation layer by name: ``"BN"``, ``"SyncBN"``, ``"FrozenBN"``, ``"GN"`` (32 groups, fewer if
    needed) or ``"LN"`` (:class:`LayerNorm2d`, eps 1e-6 as ViTDet and ConvNeXt)."""
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "LN":
        return LayerNorm2d(channels, eps=1e-6)
    raise ValueError(f"unknown norm '{norm}'; choose one of {', '.join(NORMS)}")


def check_norm(norm: str | None, *, owner: str = "the layer", optional: bool = True) -> None:
    """Refuse a norm name outside :data:`NORMS` (``None``, no norm, is allowed where ``optional``).

    Raises:
        ValueError: naming ``owner`` and the allowed names.
    """
    if norm is None and optional or norm in NORMS:
        return
    allowed = ("null or " if optional else "") + f"one of {', '.join(NORMS)}"
    raise ValueError(f"{owner} norm must be {allowed}, got {norm!r}")


def hold_in_eval(frozen: Iterable[nn.Module], root: nn.Module, *, norm_eval: bool) -> None:
    """Put the ``frozen`` modules back in eval mode after ``root.train()``, and with ``norm_eval`` every
    BatchNorm under ``root`` (their statistics stay fixed while the rest trains)."""
    for module in frozen:
        module.eval()
    if norm_eval:
        for m in root.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def fixed_affine(norm: nn.Module) -> tuple[Tensor, Tensor] | None:
    """The per-channel ``(scale, shift)`` that ``norm`` applies, where it is a fixed affine map.

    A FrozenBN always is; a BatchNorm is in eval mode with running statistics (frozen stages, ``norm_eval``,
    inference). ``None`` for anything else (a BatchNorm in training mode, GroupNorm). The scale and shift
    keep the autograd graph to the norm's weight and bias, so a trainable BatchNorm in eval mode still
    learns through them.
    """
    if isinstance(norm, FrozenBatchNorm2d):
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        return scale, norm.bias - norm.running_mean * scale
    if (isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training
            and norm.running_mean is not None and norm.running_var is not None):
        scale = (norm.running_var + norm.eps).rsqrt()
        shift = -norm.running_mean * scale
        if norm.weight is not None:
            scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
        return scale, shift
    return None


def fold_conv_norm(conv: nn.Conv2d | ModulatedDeformConv2d, norm: nn.Module, x: Tensor, fold: bool = True) -> Tensor:
    """``norm(conv(x))``, computed as one convolution when ``fold`` and the norm is a fixed affine map.

    The norm's scale goes into the convolution's weights and its shift into the bias
    (:func:`fixed_affine`): the map the norm would read and write is never made, in the forward pass or
    the backward. The result equals ``norm(conv(x))`` up to float rounding (the products are formed in
    another order). Modules with hooks, or a padding mode other than zeros, take the two-module path. A
    :class:`~segkit.ops.deform_conv.ModulatedDeformConv2d` is linear in its weights too: it folds the same
    way (:meth:`~segkit.ops.deform_conv.ModulatedDeformConv2d.forward_affine`).
    """
    affine = None
    deformable = isinstance(conv, ModulatedDeformConv2d)
    if fold and not (conv._forward_hooks or conv._forward_pre_hooks or norm._forward_hooks or norm._forward_pre_hooks
            or not deformable and conv.padding_mode != "zeros"):
        affine = fixed_affine(norm)
    if affine is None:
        return norm(conv(x))
    scale, shift = affine
    if deformable:
        return conv.forward_affine(x, scale, shift)
    if conv.bias is not None:
        shift = conv.bias * scale + shift
    if torch.is_grad_enabled() and not isinstance(conv.padding, str):
        if any(t.requires_grad for t in (x, conv.weight, scale, shift)):
            return _FoldedConv.apply(x, conv.weight, scale, shift, conv.stride, conv.padding, conv.dilation,
                                     conv.groups)
    return F.conv2d(x, conv.weight * scale.reshape(-1, 1, 1, 1), shift, conv.stride, conv.padding, conv.dilation,
                    conv.groups)


class _FoldedConv(torch.autograd.Function):
    """``conv2d(x, weight * scale, shift)`` that keeps ``weight`` and ``scale`` for the backward pass, not
    their product: autograd would hold a scaled copy of every folded weight (the size of the backbone)
    from the forward pass to the backward; here the product is formed again when it is needed."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, stride: Any, padding: Any,
                dilation: Any, groups: int) -> Tensor:
        ctx.save_for_backward(x, weight, scale)
        ctx.options = (stride, padding, dilation, groups)
        return F.conv2d(x, weight * scale.reshape(-1, 1, 1, 1), shift, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, scale = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.options
        need_x, need_weight, need_scale, need_shift = ctx.needs_input_grad[:4]
        folded = weight * scale.reshape(-1, 1, 1, 1)
        # Under autocast the forward convolution ran in the gradient's dtype: so does its backward.
        grad_x, grad_folded, _ = torch.ops.aten.convolution_backward(
            grad, x.to(grad.dtype), folded.to(grad.dtype), None, list(stride), list(padding), list(dilation), False,
            [0] * len(stride), groups, [need_x, need_weight or need_scale, False])
        if grad_folded is not None:
            grad_folded = grad_folded.to(weight.dtype)
        return (grad_x.to(x.dtype) if need_x else None,
                grad_folded * scale.reshape(-1, 1, 1, 1) if need_weight else None,
                (grad_folded * weight).sum((1, 2, 3)) if need_scale else None,
                grad.sum((0, 2, 3)).to(scale.dtype) if need_shift else None,
                None, None, None, None)
