"""ResNet backbones (depth 18, 34, 50, 101, 152) returning the stage outputs ``c2``..``c5``.

Parameter names equal torchvision's ``resnetXX`` (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ...), without the classifier, so a torchvision ImageNet state dict loads
without any key mapping.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence

from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from segkit.checkpoint import extract_state_dict, load_state_dict_checked, read_checkpoint
from segkit.ops import ShapeSpec
from segkit.registry import BACKBONES

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "make_norm", "load_pretrained"]

_NORMS = ("BN", "FrozenBN", "GN")


def make_norm(norm: str, channels: int) -> nn.Module:
    """A normalisation layer by name: ``"BN"``, ``"FrozenBN"`` or ``"GN"`` (32 groups, fewer if needed)."""
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "GN":
        groups = math.gcd(32, channels)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm '{norm}'; choose one of {', '.join(_NORMS)}")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut; expansion 1."""

    expansion = 1

    def __init__(self, *, in_channels: int, width: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(width, out_channels, 3, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride, norm)

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand, with a shortcut; expansion 4 (the stride sits on the 3x3)."""

    expansion = 4

    def __init__(self, *, in_channels: int, width: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride, norm)

    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int, norm: Callable[[int], nn.Module]) -> nn.Module | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm(out_channels))


_ARCH: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


@BACKBONES.register()
class ResNet(nn.Module):
    """ResNet feature extractor returning the outputs of stages 1..4 as ``c2``..``c5`` (strides 4..32).

    Args:
        depth: 18, 34 (basic blocks) or 50, 101, 152 (bottlenecks).
        out_indices: stages to return, 0..3, named ``c2``..``c5``.
        frozen_stages: ``-1`` trains everything; ``0`` freezes the stem; ``i`` freezes the stem and
            stages 1..i (no gradients, normalisation layers kept in eval mode).
        norm: ``"BN"``, ``"FrozenBN"`` (fixed affine and statistics) or ``"GN"``.
        norm_eval: keep every BatchNorm in eval mode (running statistics fixed) during training.
        base_channels: stem width; stage ``i`` has width ``base_channels * 2**i`` (64 = torchvision).
        zero_init_residual: start each residual branch's last norm at zero scale.
        pretrained: path of a local state dict (torchvision key names; raw or under ``state_dict`` /
            ``model``), loaded after initialisation; ``fc.*`` keys are ignored.

    Example:
        >>> net = ResNet(depth=18, base_channels=16)
        >>> {k: tuple(v.shape) for k, v in net(torch.rand(1, 3, 64, 64)).items()}["c5"]
        (1, 128, 2, 2)
    """

    def __init__(
        self,
        *,
        depth: int = 50,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm: str = "BN",
        norm_eval: bool = False,
        base_channels: int = 64,
        zero_init_residual: bool = False,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        if depth not in _ARCH:
            raise ValueError(f"ResNet depth must be one of {sorted(_ARCH)}, got {depth}")
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or any(i not in range(4) for i in out_indices) or len(set(out_indices)) != len(out_indices):
            raise ValueError(f"out_indices must be distinct stage indices in 0..3 (c2..c5), got {out_indices}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages}")
        if norm not in _NORMS:
            raise ValueError(f"unknown norm '{norm}'; choose one of {', '.join(_NORMS)}")
        if base_channels <= 0:
            raise ValueError(f"base_channels must be positive, got {base_channels}")
        block, layers = _ARCH[depth]
        norm_layer = lambda c: make_norm(norm, c)  # noqa: E731
        self.depth = depth
        self.out_indices = tuple(sorted(out_indices))
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        self.conv1 = nn.Conv2d(3, base_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = base_channels
        self._shapes: dict[str, ShapeSpec] = {}
        num_stages = max(self.out_indices) + 1
        for i in range(num_stages):
            width = base_channels * 2**i
            blocks = []
            for b in range(layers[i]):
                stride = 2 if (b == 0 and i > 0) else 1
                blocks.append(block(in_channels=in_channels, width=width, stride=stride, norm=norm_layer))
                in_channels = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            if i in self.out_indices:
                self._shapes[f"c{i + 2}"] = ShapeSpec(in_channels, 2 ** (i + 2))
        self._init_weights(zero_init_residual)
        if pretrained is not None:
            load_pretrained(self, pretrained)
        self._freeze()

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_norm().weight)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        stages = [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1) if hasattr(self, f"layer{i}")]
        return [self.conv1, self.bn1, *stages]

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNet:
        """Set training mode, keeping frozen stages (and all BatchNorms with ``norm_eval``) in eval mode."""
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def output_shape(self) -> dict[str, ShapeSpec]:
        """``{name: ShapeSpec(channels, stride)}`` of the returned maps, e.g. ``c2: (256, 4)`` for ResNet-50."""
        return dict(self._shapes)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """Compute the stage outputs.

        Args:
            x: Tensor[N, 3, H, W], float, normalised images.

        Returns:
            Ordered ``{"c2": Tensor[N, C2, H/4, W/4], ...}`` for the stages in ``out_indices``.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs: OrderedDict[str, Tensor] = OrderedDict()
        for i in range(max(self.out_indices) + 1):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in self.out_indices:
                outputs[f"c{i + 2}"] = x
        return outputs


def load_pretrained(model: nn.Module, path: str) -> None:
    """Load a local torchvision-style state dict into ``model``, ignoring ``fc.*``.

    The file is read with ``weights_only=True``; a raw state dict or one under ``state_dict`` or
    ``model`` is accepted. Missing and unexpected keys are reported with a warning.

    Raises:
        CheckpointError: the file does not exist or holds no state dict, or a tensor's shape
            differs from the model's (the message names the key, both shapes and the file).
    """
    state = extract_state_dict(read_checkpoint(path))
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    report = load_state_dict_checked(model, state, source=f"pretrained weights '{path}'", strict=False,
                                     hint="check depth and base_channels")
    problems = [f"{kind} keys {report[kind]}" for kind in ("missing", "unexpected") if report[kind]]
    if problems:
        warnings.warn(f"loading '{path}' into {type(model).__name__}: " + "; ".join(problems), stacklevel=3)
