"""U-Net's encoder (Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical Image
Segmentation"), as a backbone for :class:`~segkit_plugins.heads.unet_head.UNetHead`.

``depth`` levels of two 3x3 convs (each + norm + ReLU), a 2x2 max pool between levels, the channels
doubling from ``base_channels``. The paper's network is ``depth: 5, base_channels: 64, norm: null,
padding: valid``.

Padding:

- ``same`` (default): the convs pad by 1, a level keeps its size and a pool halves it (rounding down);
  the maps have strides 1, 2, 4, ... and any input size works.
- ``valid``: the paper's unpadded convs. Each conv loses a pixel on every side, so the network's output
  is smaller than its input; the missing context at the image border is extrapolated by mirroring the
  input (the paper's overlap-tile strategy). The input is mirrored by the network's margin (92 pixels
  for depth 5) on every side and a few more pixels at the bottom and right where the unpadded pools
  need an even size, so the decoder's output covers the whole input and starts at its top-left pixel.
  The stride-1 map is cut to the margin the decoder uses, which is how the head knows the input size.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from segkit.checkpoint import CheckpointError, extract_state_dict, load_state_dict_checked, read_checkpoint
from segkit.ops.conv import conv_norm_act
from segkit.ops.norm import check_norm
from segkit.ops.shape_spec import ShapeSpec
from segkit.registry import BACKBONES

__all__ = ["UNet", "ValidGeometry", "level_names", "mirror_pad"]

PADDINGS = ("same", "valid")


def level_names(depth: int) -> list[str]:
    """The map names of levels 0..depth-1 (strides 1, 2, 4, ...): ``c2..c5`` for strides 4..32 as every
    backbone names them, ``s<stride>`` otherwise."""
    names = []
    for level in range(depth):
        stride = 2 ** level
        names.append(f"c{level}" if 4 <= stride <= 32 else f"s{stride}")
    return names


@dataclass(frozen=True)
class ValidGeometry:
    """Where the maps of a valid-padding U-Net of ``depth`` levels lie, in input pixels.

    ``origin`` values are the centre of a map's first pixel relative to the first pixel of the unpadded
    input. ``margin`` is the mirroring each side needs so that the decoder's output starts at the input's
    first pixel; ``skip_origins[l]`` and ``up_origins[l]`` are the origins of the encoder's map of level
    ``l`` and of the decoder's upsampled map that is concatenated with it.
    """

    depth: int
    margin: int
    skip_origins: tuple[float, ...]
    up_origins: tuple[float, ...]

    @classmethod
    def of(cls, depth: int, convs: int = 2) -> ValidGeometry:
        def origins(margin: float) -> tuple[list[float], list[float], float]:
            skips, ups = [], [0.0] * depth
            origin, stride = -margin, 1.0
            for level in range(depth):
                if level:
                    origin, stride = origin + stride / 2, stride * 2  # 2x2 pool: the centre of two pixels
                origin += convs * stride  # each unpadded 3x3 conv drops a pixel
                skips.append(origin)
            for level in reversed(range(depth - 1)):
                stride /= 2
                origin -= stride / 2  # 2x2 transposed conv: two pixels around each input pixel
                ups[level] = origin
                origin += convs * stride
            return skips, ups, origin

        margin = origins(0.0)[2]  # the output's origin moves one for one with the margin
        skips, ups, end = origins(margin)
        assert end == 0 and margin == int(margin)
        return cls(depth=depth, margin=int(margin), skip_origins=tuple(skips), up_origins=tuple(ups))

    def skip_offset(self, level: int) -> int:
        """Rows (and columns) to drop from the top (left) of level ``level``'s encoder map to align it with
        the decoder's upsampled map."""
        return int((self.up_origins[level] - self.skip_origins[level]) / 2 ** level)

    def padded_size(self, size: int, convs: int = 2) -> int:
        """The smallest mirrored input side >= ``size + 2 * margin`` whose every pool meets an even side."""
        padded = size + 2 * self.margin
        while not _pools_evenly(padded, self.depth, convs):
            padded += 1
        return padded


def _pools_evenly(size: int, depth: int, convs: int) -> bool:
    for _ in range(depth - 1):
        size -= 2 * convs
        if size <= 0 or size % 2:
            return False
        size //= 2
    return size - 2 * convs > 0


def mirror_pad(x: Tensor, top: int, bottom: int, left: int, right: int) -> Tensor:
    """``x`` (Tensor[N, C, H, W]) extended by mirroring without repeating the edge pixel, by any amount: a
    margin wider than the image mirrors the mirrored image again (``F.pad``'s reflect allows less than a side)."""
    while top or bottom or left or right:
        height, width = x.shape[-2:]
        step = (min(top, height - 1), min(bottom, height - 1), min(left, width - 1), min(right, width - 1))
        if not any(step):
            raise ValueError(f"cannot mirror a {height}x{width} map: a side of 1 pixel has nothing to mirror")
        x = F.pad(x, (step[2], step[3], step[0], step[1]), mode="reflect")
        top, bottom, left, right = top - step[0], bottom - step[1], left - step[2], right - step[3]
    return x


def double_conv(in_channels: int, out_channels: int, *, norm: str | None, padding: str,
                owner: str) -> nn.Sequential:
    """Two 3x3 conv + norm + ReLU layers; ``padding: valid`` drops the convs' zero padding."""
    layers = [conv_norm_act(in_channels, out_channels, 3, norm=norm, activation=True, owner=owner),
              conv_norm_act(out_channels, out_channels, 3, norm=norm, activation=True, owner=owner)]
    if padding == "valid":
        for layer in layers:
            layer[0].padding = (0, 0)
    return nn.Sequential(*layers)


@BACKBONES.register()
class UNet(nn.Module):
    """U-Net's contracting path: the encoder maps of every level, for :class:`UNetHead`.

    Args:
        depth: number of levels (>= 2); the deepest map has stride ``2 ** (depth - 1)``.
        base_channels: channels of the first level; level ``l`` has ``base_channels * 2 ** l``.
        in_channels: channels of the input images.
        norm: after each conv: ``"BN"`` (default), ``"GN"``, ``"SyncBN"``, ``"FrozenBN"`` or ``None`` (the paper).
        padding: ``"same"`` or ``"valid"`` (the paper), see the module's description.
        pretrained: a local file of this encoder's weights: a checkpoint ``segkit train`` wrote (its
            ``backbone.`` weights are taken) or a state dict of the encoder; every weight must match.

    Returns (forward):
        ``{name: Tensor[N, C_l, H_l, W_l]}`` for the levels, named by :func:`level_names`
        (``s1, s2, c2, c3, c4`` for depth 5).

    Raises:
        ValueError: a value out of range, an unknown norm or padding.

    Example:
        >>> net = UNet(depth=4, base_channels=8)
        >>> {k: tuple(v.shape) for k, v in net(torch.rand(1, 3, 64, 64)).items()}
        {'s1': (1, 8, 64, 64), 's2': (1, 16, 32, 32), 'c2': (1, 32, 16, 16), 'c3': (1, 64, 8, 8)}
    """

    def __init__(self, *, depth: int = 5, base_channels: int = 64, in_channels: int = 3, norm: str | None = "BN",
                 padding: str = "same", pretrained: str | None = None) -> None:
        super().__init__()
        if not 2 <= depth <= 8:
            raise ValueError(f"UNet depth must be in 2..8 (levels, the paper has 5), got {depth}")
        if base_channels < 1 or in_channels < 1:
            raise ValueError(f"UNet base_channels and in_channels must be >= 1, got {base_channels}, {in_channels}")
        if padding not in PADDINGS:
            raise ValueError(f"UNet padding must be 'same' or 'valid', got {padding!r}")
        check_norm(norm, owner="UNet")
        self.depth = int(depth)
        self.padding = padding
        self.names = level_names(self.depth)
        self.geometry = ValidGeometry.of(self.depth) if padding == "valid" else None
        channels = [base_channels * 2 ** level for level in range(self.depth)]
        self.levels = nn.ModuleList(
            double_conv(c_in, c_out, norm=norm, padding=padding, owner="UNet")
            for c_in, c_out in zip([in_channels, *channels[:-1]], channels)
        )
        self.pool = nn.MaxPool2d(2)
        self._shapes = {name: ShapeSpec(channels=c, stride=2 ** level)
                        for level, (name, c) in enumerate(zip(self.names, channels))}
        if pretrained is not None:
            self.load_pretrained(pretrained)

    def load_pretrained(self, path: str) -> None:
        """Load the encoder's weights from a local file (see the class description).

        Raises:
            CheckpointError: the file cannot be read, or its weights are not this encoder's.
        """
        if "://" in str(path):
            raise CheckpointError(f"pretrained '{path}': no published weights exist for UNet; give a local file "
                                  f"(a checkpoint segkit train wrote, or the encoder's state dict)")
        state = extract_state_dict(read_checkpoint(path))
        if any(key.startswith("backbone.") for key in state):
            state = {key[len("backbone."):]: value for key, value in state.items() if key.startswith("backbone.")}
        load_state_dict_checked(self, state, source=f"pretrained weights '{path}'", strict=True,
                                hint="check depth and base_channels")

    def output_shape(self) -> dict[str, ShapeSpec]:
        """``{name: ShapeSpec(channels, stride)}`` of the returned maps."""
        return dict(self._shapes)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """The encoder maps of Tensor[N, C, H, W] images (see the class description)."""
        height, width = x.shape[-2:]
        if self.geometry is not None:
            margin = self.geometry.margin
            padded = self.geometry.padded_size(height), self.geometry.padded_size(width)
            x = mirror_pad(x, margin, padded[0] - height - margin, margin, padded[1] - width - margin)
        elif min(height, width) < 2 ** (self.depth - 1):
            raise ValueError(f"UNet of depth {self.depth} needs images of at least {2 ** (self.depth - 1)} pixels a "
                             f"side, got {height}x{width}")
        out: OrderedDict[str, Tensor] = OrderedDict()
        for level, (name, block) in enumerate(zip(self.names, self.levels)):
            if level:
                x = self.pool(x)
            x = block(x)
            out[name] = x
        if self.geometry is not None:
            # The stride-1 map without the extra bottom and right mirroring: its size tells the head the input's.
            extra = (padded[0] - height - 2 * self.geometry.margin, padded[1] - width - 2 * self.geometry.margin)
            first = out[self.names[0]]
            out[self.names[0]] = first[..., :first.shape[-2] - extra[0], :first.shape[-1] - extra[1]]
        return out
