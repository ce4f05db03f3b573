"""Path Aggregation FPN (PANet, Liu et al., CVPR 2018): our FPN plus an augmented bottom-up path.

The top-down path is :class:`~segkit_plugins.necks.fpn.FPN` unchanged (same parameter names, so
an FPN state dict loads into the top-down part). The bottom-up path then walks from the finest
level to the coarsest::

    N_2 = P_2
    N_{i+1} = relu(bottom_up_conv_i( relu(downsample_conv_i(N_i)) + P_{i+1} ))

``downsample_conv_i`` is a 3x3 stride-2 conv and ``bottom_up_conv_i`` a 3x3 conv, both
``out_channels`` wide and followed by the configured norm. The outputs keep FPN's names: ``p<k>``
carries ``N_k``, so heads reading ``p2``..``p5`` use the augmented maps unchanged, and the extra
level (``p6``) is ``N_5`` subsampled by a max-pool with kernel 1, stride 2, or, with
``extra_block="p6p7"`` (RetinaNet, FCOS), ``p6``/``p7`` come from ``N_5`` (or ``C_5``) by two stride-2 convs.

Two published wirings differ in what travels upward (``bottom_up_input``):

* ``"output"`` (default; the paper's Fig. 2 and the authors' code, github.com/ShuLiu1993/PANet):
  the next level is built from ``N_i``, the output of level ``i``'s 3x3 conv.
* ``"sum"`` (MMDetection's ``PAFPN``): the next level is built from ``S_i``, the pre-conv sum
  ``relu(downsample_conv(S_{i-1})) + P_i`` (``S_2 = P_2``); each output is still
  ``N_i = relu(bottom_up_conv(S_i))``, but the 3x3 ``bottom_up_conv`` of a level never feeds the
  levels above it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from segkit.ops import ShapeSpec
from segkit.registry import NECKS
from segkit.ops.conv import conv_norm_act
from segkit.ops.norm import check_norm
from segkit_plugins.necks.fpn import FPN

__all__ = ["PAFPN"]

_BOTTOM_UP_INPUTS = ("output", "sum")


@NECKS.register()
class PAFPN(FPN):
    """FPN with PANet's bottom-up path augmentation, over backbone maps ``c2``..``c5``.

    Output ``p<k>`` (stride ``2**k``, ``out_channels`` wide) is the augmented map ``N_k``; with
    ``extra_block="maxpool"`` the extra level is the coarsest ``N`` subsampled by 2. With
    ``bottom_up=False`` the module is exactly :class:`FPN` (same parameters, same outputs).

    Parameters (``L`` = number of ``in_features``): the FPN's ``lateral_convs.{i}`` and
    ``output_convs.{i}``, then, for ``i`` in ``0..L-2`` (level ``i`` to level ``i + 1``),
    ``downsample_convs.{i}`` (3x3 stride-2 conv [+ norm]) and ``bottom_up_convs.{i}``
    (3x3 conv [+ norm]) — each an ``nn.Sequential`` whose ``0`` is the conv and ``1`` the norm.

    Args:
        in_shapes: the backbone's ``output_shape()``.
        in_features: names of the backbone maps to use, finest first; with ``bottom_up`` each
            stride must be twice the previous one.
        out_channels: channels of every conv and output map.
        extra_block: ``"maxpool"`` to add the subsampled extra level, ``"p6p7"`` for RetinaNet's two conv
            levels (as :class:`FPN`, but from the coarsest augmented map ``N``), or ``None``.
        extra_from: what the first ``p6p7`` conv reads: ``"output"`` (the coarsest ``N``) or ``"input"``
            (the coarsest backbone map).
        norm: ``None``, ``"BN"``, ``"SyncBN"`` or ``"GN"`` after every conv of both paths
            (convs have a bias only without a norm).
        bottom_up: add the bottom-up path; ``False`` gives plain FPN outputs (for ablations).
        bottom_up_input: ``"output"`` (paper, authors' code) feeds ``N_i`` upward, ``"sum"``
            (MMDetection) feeds the pre-conv sum; see the module docstring.

    Raises:
        ValueError: an unknown ``norm``, ``bottom_up_input`` or ``extra_block``, missing
            ``in_features``, or strides that do not double from level to level.

    Example:
        >>> shapes = {"c2": ShapeSpec(64, 4), "c3": ShapeSpec(128, 8)}
        >>> PAFPN(in_shapes=shapes, in_features=("c2", "c3"), out_channels=32).output_shape()
        {'p2': ShapeSpec(channels=32, stride=4), 'p3': ShapeSpec(channels=32, stride=8), 'p4': ShapeSpec(channels=32, stride=16)}
    """

    def __init__(
        self,
        *,
        in_shapes: Mapping[str, ShapeSpec],
        in_features: Sequence[str] = ("c2", "c3", "c4", "c5"),
        out_channels: int = 256,
        extra_block: str | None = "maxpool",
        extra_from: str = "output",
        norm: str | None = None,
        bottom_up: bool = True,
        bottom_up_input: str = "output",
    ) -> None:
        check_norm(norm, owner="PAFPN")
        if bottom_up_input not in _BOTTOM_UP_INPUTS:
            raise ValueError(f"PAFPN bottom_up_input must be one of {_BOTTOM_UP_INPUTS}, got {bottom_up_input!r}")
        super().__init__(
            in_shapes=in_shapes, in_features=in_features, out_channels=out_channels,
            extra_block=extra_block, extra_from=extra_from, norm=norm,
        )
        self.bottom_up = bool(bottom_up)
        self.bottom_up_input = bottom_up_input
        if not self.bottom_up:
            return
        strides = [int(in_shapes[f].stride) for f in in_features]
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(
                "PAFPN's bottom-up path subsamples by 2 per level, so in_features strides must double "
                f"from level to level, got {dict(zip(in_features, strides))}; choose consecutive levels "
                "or set bottom_up: false"
            )
        num_steps = len(in_features) - 1
        self.downsample_convs = nn.ModuleList(
            conv_norm_act(out_channels, out_channels, 3, norm=norm, stride=2, init="kaiming_uniform")
            for _ in range(num_steps))
        self.bottom_up_convs = nn.ModuleList(
            conv_norm_act(out_channels, out_channels, 3, norm=norm, init="kaiming_uniform") for _ in range(num_steps))

    def forward(self, features: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
        """Build the top-down pyramid, then the augmented bottom-up one.

        Args:
            features: backbone maps by name; ``in_features`` must be present, Tensor[N, C_i, H_i, W_i].

        Returns:
            Ordered ``{"p2": N_2, ..., "p5": N_5[, "p6"]}``, each Tensor[N, out_channels, H_k, W_k],
            finest first (the FPN's own outputs when ``bottom_up`` is off).
        """
        inputs = [features[f] for f in self.in_features]
        top_down = self.top_down(inputs)
        if not self.bottom_up:
            return OrderedDict(zip(self._shapes, self.add_extra_levels(top_down, inputs)))
        outputs = [top_down[0]]
        upward = top_down[0]
        for i, lateral in enumerate(top_down[1:]):
            merged = F.relu(self.downsample_convs[i](upward)) + lateral
            outputs.append(F.relu(self.bottom_up_convs[i](merged)))
            upward = outputs[-1] if self.bottom_up_input == "output" else merged
        return OrderedDict(zip(self._shapes, self.add_extra_levels(outputs, inputs)))
