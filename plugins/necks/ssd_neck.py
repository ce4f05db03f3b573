"""SSD's extra feature layers (Liu et al., "SSD: Single Shot MultiBox Detector", Fig. 2): after the
backbone's maps, blocks of a 1x1 conv + ReLU and a 3x3 conv + ReLU, each on the previous block's
output, give the coarser maps the head predicts on (``conv8_2``..``conv11_2`` for SSD300)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from segkit.ops import ShapeSpec
from segkit.registry import NECKS

__all__ = ["SSDExtraLayers", "SSD300_EXTRA_LAYERS"]

#: SSD300's extra blocks: ``(mid_channels, out_channels, stride, padding)`` of conv8_2..conv11_2.
SSD300_EXTRA_LAYERS = ((256, 512, 2, 1), (128, 256, 2, 1), (128, 256, 1, 0), (128, 256, 1, 0))


@NECKS.register()
class SSDExtraLayers(nn.Module):
    """The backbone maps ``in_features`` passed through, then one map per extra block.

    Block ``i`` is a 1x1 conv to ``mid_channels`` + ReLU and a 3x3 conv to ``out_channels`` with the
    block's ``stride`` and ``padding`` + ReLU, applied to the previous block's output (the first to
    the last of ``in_features``); its map is named ``conv{first_index + i}_2`` (``conv8_2`` first, as
    in the paper). Weights start as SSD's (Xavier-uniform, zero bias).

    The declared stride of a block's map is the previous one times 2 (the grid halves or, for
    SSD300's unpadded 3x3 blocks on 5x5 and 3x3 maps, nearly so; the head's default boxes take their
    own ``steps``).

    Args:
        in_shapes: the backbone's ``output_shape()``.
        in_features: backbone maps passed through, finest first (SSD: ``conv4`` (L2-normalised) and ``fc7``).
        extra_layers: ``(mid_channels, out_channels, stride, padding)`` of each block (SSD300's by default).
        first_index: the number in the first block's name.

    Example:
        >>> neck = SSDExtraLayers(in_shapes={"fc7": ShapeSpec(1024, 16)}, in_features=("fc7",))
        >>> {k: tuple(v.shape[-2:]) for k, v in neck({"fc7": torch.rand(1, 1024, 19, 19)}).items()}
        {'fc7': (19, 19), 'conv8_2': (10, 10), 'conv9_2': (5, 5), 'conv10_2': (3, 3), 'conv11_2': (1, 1)}
    """

    def __init__(
        self,
        *,
        in_shapes: Mapping[str, ShapeSpec],
        in_features: Sequence[str] = ("conv4", "fc7"),
        extra_layers: Sequence[Sequence[int]] = SSD300_EXTRA_LAYERS,
        first_index: int = 8,
    ) -> None:
        super().__init__()
        missing = [f for f in in_features if f not in in_shapes]
        if missing or not in_features:
            raise ValueError(f"SSDExtraLayers in_features {missing or '[]'} are not among the backbone maps "
                             f"{list(in_shapes)}")
        self.in_features = tuple(in_features)
        self._shapes = {f: in_shapes[f] for f in in_features}
        channels, stride = in_shapes[in_features[-1]]
        self.layers = nn.ModuleList()
        self.names = []
        for i, spec in enumerate(extra_layers):
            if len(spec) != 4:
                raise ValueError(f"SSDExtraLayers extra_layers[{i}] must be [mid_channels, out_channels, stride, "
                                 f"padding], got {list(spec)}")
            mid, out, block_stride, padding = (int(v) for v in spec)
            block = nn.Sequential(nn.Conv2d(channels, mid, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(mid, out, 3, stride=block_stride, padding=padding), nn.ReLU(inplace=True))
            for conv in (block[0], block[2]):
                nn.init.xavier_uniform_(conv.weight)
                nn.init.zeros_(conv.bias)
            self.layers.append(block)
            channels, stride = out, stride * 2
            name = f"conv{first_index + i}_2"
            self.names.append(name)
            self._shapes[name] = ShapeSpec(channels, stride)

    def output_shape(self) -> dict[str, ShapeSpec]:
        """The passed-through maps' shapes, then ``ShapeSpec(out_channels, stride)`` of each block."""
        return dict(self._shapes)

    def forward(self, features: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
        """``in_features`` of ``features`` (Tensor[N, C, H, W] each), then each block's map."""
        out = OrderedDict((f, features[f]) for f in self.in_features)
        x = features[self.in_features[-1]]
        for name, block in zip(self.names, self.layers):
            x = block(x)
            out[name] = x
        return out
