"""The ResNet family (ResNet, ResNeXt, SE-ResNet, SE-ResNeXt, SENet-154) returning stage outputs ``c2``..``c5``.

Parameter names equal torchvision's ``resnetXX`` / ``resnextXX`` (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.0``, ...) and timm's ``seresnet*`` / ``seresnext*``
(``layer1.0.se.fc1``), without the classifier, so those state dicts load without a key map; timm's
``legacy_senet154`` and deep-stem layouts load through :func:`segkit_plugins.backbones.resnet_weights.convert_timm_resnet`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from segkit.ops import ModulatedDeformConv2d, ShapeSpec
from segkit.registry import BACKBONES
from segkit.ops.norm import check_norm, fold_conv_norm, hold_in_eval
from segkit_plugins.backbones.resnet_blocks import BasicBlock, Bottleneck, DeformOptions, make_norm
from segkit_plugins.backbones.resnet_loading import load_pretrained

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "make_norm", "load_pretrained", "STAGE_BLOCKS"]

STAGE_BLOCKS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
_STEMS = ("default", "deep")
_VARIANTS = ("resnet", "senet")


@BACKBONES.register()
class ResNet(nn.Module):
    """ResNet-family feature extractor returning the outputs of stages 1..4 as ``c2``..``c5``.

    Args:
        depth: 18, 34 (basic blocks) or 50, 101, 152 (bottlenecks).
        groups: groups of each bottleneck's 3x3 convolution (ResNeXt cardinality, e.g. 32).
        width_per_group: channels per group in the first stage (64 = ResNet, 4 in "32x4d").
        se_reduction: squeeze-and-excitation after each residual branch with this reduction
            (16 in SE-ResNet / SENet); ``None`` for none.
        variant: ``"resnet"`` (torchvision / timm layout) or ``"senet"`` (SENet-154 as published:
            a first 1x1 convolution of half width, 3x3 projection shortcuts in stages 2..4 and a
            stem max-pool without padding that rounds up).
        stem: ``"default"`` (one 7x7 convolution) or ``"deep"`` (three 3x3 convolutions of widths
            ``stem_channels / 2``, ``stem_channels / 2``, ``stem_channels``).
        stem_channels: output width of the stem; ``None`` means ``base_channels``.
        strides: stride of each stage (stage 1 usually 1). Stride 1 in a later stage keeps the
            resolution, as in dilated ResNet: output stride 16 = ``(1, 2, 2, 1)``, 8 = ``(1, 2, 1, 1)``.
        dilations: dilation of each stage's 3x3 convolutions, e.g. ``(1, 1, 2, 4)`` for output stride 8.
        multi_grid: unit rates of the last stage, multiplied by its dilation (e.g. ``(1, 2, 4)``);
            repeated if the stage has more blocks.
        contract_dilation: the first block of a dilated stage keeps the previous stage's rate (half
            the stage's dilation), as torchvision's ``replace_stride_with_dilation`` builds it (the
            backbone of its DeepLabV3 and FCN); the other blocks use the stage's dilation. Without it
            every block of the stage is dilated. A stage with ``multi_grid`` follows its unit rates.
        out_indices: stages to return, 0..3, named ``c2``..``c5``.
        dcn_stages: one flag per stage (``c2``..``c5``): make every 3x3 convolution of the stage's blocks
            (ResNeXt's grouped ones included) a modulated deformable convolution,
            :class:`~segkit.ops.deform_conv.ModulatedDeformConv2d` (DCNv2, Zhu et al. 2019).
            ``(False, True, True, True)`` is DCNv2's placement, c3..c5. Each keeps its convolution's
            ``weight`` and adds a zero-initialised offset-and-mask convolution ``conv2.conv_offset``, so
            ImageNet weights load (only those keys are new) and, with ``dcn_mask_scale=2``, the network
            starts as the plain one with the same weights.
        dcn_deform_groups: channel groups with their own offsets and masks in each deformable convolution.
        dcn_mask_scale: the masks' upper bound, ``mask = dcn_mask_scale * sigmoid(logit)``: 2 makes them 1 at
            initialisation (a pretrained convolution keeps its function), 1 is DCNv2's (0.5 at
            initialisation; for weights trained with DCNv2's masks).
        frozen_stages: ``-1`` trains everything; ``0`` freezes the stem; ``i`` freezes the stem and
            stages 1..i (no gradients, normalisation layers kept in eval mode).
        norm: ``"BN"``, ``"SyncBN"``, ``"GN"`` or ``"FrozenBN"`` (fixed affine and statistics).
        norm_eval: keep every BatchNorm in eval mode (running statistics fixed) during training.
        fold_norm: compute each convolution and the norm after it as one convolution wherever the norm
            is a fixed affine map (FrozenBN; a BatchNorm in eval mode: frozen stages, ``norm_eval``,
            inference), saving a pass over each map forward and backward (:func:`segkit.ops.norm.fold_conv_norm`).
            The result equals the unfolded one up to float rounding, and is as close to the exact (float64)
            result; ``False`` keeps torchvision's order of operations, for bit-level parity.
        base_channels: stage ``i`` has base width ``base_channels * 2**i`` (64 = torchvision).
        zero_init_residual: start each residual branch's last norm at zero scale.
        drop_path_rate: stochastic depth; the drop probability grows linearly over the blocks from 0
            to this value (0 = off).
        pretrained: path of a local state dict (torchvision or timm key names, or a file written by
            ``segkit convert``), or a weight name resolved through its library's cache
            (``torchvision://resnet50.IMAGENET1K_V1``, ``timm://resnet50c.gluon_in1k``; the backbone of
            ``torchvision://maskrcnn_resnet50_fpn``), loaded after initialisation; classifier keys are ignored.
        pretrained_format: ``"auto"`` (recognised from the keys), ``"torchvision"``, ``"timm"`` or ``"segkit"``
            (for a local file; a name says its format itself).

    Example:
        >>> net = ResNet(depth=18, base_channels=16)
        >>> {k: tuple(v.shape) for k, v in net(torch.rand(1, 3, 64, 64)).items()}["c5"]
        (1, 128, 2, 2)
        >>> ResNet(depth=50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4)).output_shape()["c5"].stride
        8
        >>> type(ResNet(depth=50, dcn_stages=(False, True, True, True)).layer2[0].conv2).__name__
        'ModulatedDeformConv2d'
    """

    def __init__(
        self,
        *,
        depth: int = 50,
        groups: int = 1,
        width_per_group: int = 64,
        se_reduction: int | None = None,
        variant: str = "resnet",
        stem: str = "default",
        stem_channels: int | None = None,
        strides: Sequence[int] = (1, 2, 2, 2),
        dilations: Sequence[int] = (1, 1, 1, 1),
        multi_grid: Sequence[int] | None = None,
        contract_dilation: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        dcn_stages: Sequence[bool] = (False, False, False, False),
        dcn_deform_groups: int = 1,
        dcn_mask_scale: float = 2.0,
        frozen_stages: int = -1,
        norm: str = "BN",
        norm_eval: bool = False,
        fold_norm: bool = False,
        base_channels: int = 64,
        zero_init_residual: bool = False,
        drop_path_rate: float = 0.0,
        pretrained: str | None = None,
        pretrained_format: str = "auto",
    ) -> None:
        super().__init__()
        strides, dilations = _four("strides", strides), _four("dilations", dilations)
        out_indices = tuple(int(i) for i in out_indices)
        deform = _deform_options(dcn_stages, dcn_deform_groups, dcn_mask_scale, frozen_stages)
        _check(depth=depth, groups=groups, width_per_group=width_per_group, se_reduction=se_reduction,
               variant=variant, stem=stem, strides=strides, multi_grid=multi_grid, out_indices=out_indices,
               frozen_stages=frozen_stages, norm=norm, base_channels=base_channels, drop_path_rate=drop_path_rate)
        block, layers = STAGE_BLOCKS[depth]
        stem_channels = base_channels if stem_channels is None else int(stem_channels)
        self.arch: dict[str, Any] = {
            "depth": depth, "groups": groups, "width_per_group": width_per_group, "se_reduction": se_reduction,
            "variant": variant, "stem": stem, "stem_channels": stem_channels, "base_channels": base_channels,
        }
        self.out_indices = tuple(sorted(out_indices))
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.fold_norm = bool(fold_norm)
        self._build_stem(stem, stem_channels, variant, lambda c: make_norm(norm, c))

        num_stages = max(self.out_indices) + 1
        rates = [drop_path_rate * k / max(sum(layers) - 1, 1) for k in range(sum(layers))]
        in_channels, stride_so_far, k = stem_channels, 4, 0
        self._shapes: dict[str, ShapeSpec] = {}
        for i in range(num_stages):
            blocks = []
            for b in range(layers[i]):
                options: dict[str, Any] = {"se_reduction": se_reduction, "drop_path": rates[k]}
                if block is Bottleneck:
                    options.update(groups=groups, width_per_group=width_per_group, half_first=variant == "senet",
                                   shortcut_kernel=3 if variant == "senet" and i > 0 else 1)
                dilation = _block_dilation(dilations[i], b, multi_grid if i == 3 else None, contract_dilation)
                blk = block(in_channels=in_channels, width=base_channels * 2**i, stride=strides[i] if b == 0 else 1,
                            norm=lambda c: make_norm(norm, c), dilation=dilation, fold_norm=self.fold_norm,
                            deform=deform[i], **options)
                blocks.append(blk)
                in_channels, k = base_channels * 2**i * block.expansion, k + 1
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            stride_so_far *= strides[i]
            if i in self.out_indices:
                self._shapes[f"c{i + 2}"] = ShapeSpec(in_channels, stride_so_far)
        self._init_weights(zero_init_residual)
        if pretrained is not None:
            load_pretrained(self, pretrained, format=pretrained_format)
        self._freeze()

    def _build_stem(self, stem: str, channels: int, variant: str, norm: Any) -> None:
        if stem == "default":
            self.conv1 = nn.Conv2d(3, channels, 7, stride=2, padding=3, bias=False)
            self.bn1 = norm(channels)
        else:
            half = channels // 2
            self.conv1 = nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False)
            self.bn1 = norm(half)
            self.conv2 = nn.Conv2d(half, half, 3, padding=1, bias=False)
            self.bn2 = norm(half)
            self.conv3 = nn.Conv2d(half, channels, 3, padding=1, bias=False)
            self.bn3 = norm(channels)
        self.relu = nn.ReLU(inplace=True)
        # SENet-154's published weights were trained with an unpadded max-pool that rounds up.
        if variant == "senet":
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)
        else:
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def _stem_modules(self) -> list[nn.Module]:
        names = ("conv1", "bn1") if self.arch["stem"] == "default" else ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
        return [getattr(self, n) for n in names]

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, ModulatedDeformConv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # The loop above drew the offset convolutions too (they are nn.Conv2d): start them at zero again.
        for m in self.modules():
            if isinstance(m, ModulatedDeformConv2d):
                m.zero_offsets()
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_norm().weight)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        stages = [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1) if hasattr(self, f"layer{i}")]
        return [*self._stem_modules(), *stages]

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNet:
        """Set training mode, keeping frozen stages (and all BatchNorms with ``norm_eval``) in eval mode."""
        super().train(mode)
        if mode:
            hold_in_eval(self._frozen_modules(), self, norm_eval=self.norm_eval)
        return self

    def output_shape(self) -> dict[str, ShapeSpec]:
        """``{name: ShapeSpec(channels, stride)}`` of the returned maps, e.g. ``c2: (256, 4)`` for ResNet-50."""
        return dict(self._shapes)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """Compute the stage outputs.

        Args:
            x: Tensor[N, 3, H, W], float, normalised images.

        Returns:
            Ordered ``{"c2": Tensor[N, C2, H/4, W/4], ...}`` for the stages in ``out_indices``; each
            map's stride is given by :meth:`output_shape`.
        """
        x = self.relu(fold_conv_norm(self.conv1, self.bn1, x, self.fold_norm))
        if self.arch["stem"] == "deep":
            x = self.relu(fold_conv_norm(self.conv2, self.bn2, x, self.fold_norm))
            x = self.relu(fold_conv_norm(self.conv3, self.bn3, x, self.fold_norm))
        x = self.maxpool(x)
        outputs: OrderedDict[str, Tensor] = OrderedDict()
        for i in range(max(self.out_indices) + 1):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in self.out_indices:
                outputs[f"c{i + 2}"] = x
        return outputs


def _block_dilation(dilation: int, block: int, multi_grid: Sequence[int] | None, contract: bool) -> int:
    """The dilation of block ``block`` of a stage of dilation ``dilation``."""
    if multi_grid:
        return dilation * int(multi_grid[block % len(multi_grid)])
    if contract and block == 0 and dilation > 1:
        return dilation // 2
    return dilation


def _deform_options(stages: Sequence[bool], deform_groups: int, mask_scale: float,
                    frozen_stages: int) -> tuple[DeformOptions | None, ...]:
    """Per stage, the options of its deformable convolutions, or ``None`` for plain ones.

    Raises:
        ValueError: naming the option, for anything but four booleans, a deformable stage that
            ``frozen_stages`` freezes (its offsets would stay zero), or bad group count or mask scale.
    """
    stages = tuple(stages) if isinstance(stages, (list, tuple)) else (stages,)
    if len(stages) != 4 or not all(isinstance(s, bool) for s in stages):
        raise ValueError(f"dcn_stages must be four booleans, one per stage c2..c5 (e.g. [false, true, true, true] "
                         f"for DCNv2's c3..c5), got {list(stages)}")
    frozen = [f"c{i + 2}" for i in range(4) if stages[i] and i < frozen_stages]
    if frozen:
        raise ValueError(f"dcn_stages makes {', '.join(frozen)} deformable but frozen_stages={frozen_stages} freezes "
                         f"{', '.join(frozen)}: frozen offsets would never learn; lower frozen_stages or drop those "
                         f"stages from dcn_stages")
    if isinstance(deform_groups, bool) or not isinstance(deform_groups, int) or deform_groups < 1:
        raise ValueError(f"dcn_deform_groups must be a positive integer, got {deform_groups!r}")
    if isinstance(mask_scale, bool) or not isinstance(mask_scale, (int, float)) or not mask_scale > 0:
        raise ValueError(f"dcn_mask_scale must be a positive number (2, or DCNv2's 1), got {mask_scale!r}")
    options = DeformOptions(deform_groups=deform_groups, mask_scale=float(mask_scale))
    return tuple(options if s else None for s in stages)


def _four(name: str, values: Sequence[int]) -> tuple[int, int, int, int]:
    values = tuple(int(v) for v in values)
    if len(values) != 4 or any(v < 1 for v in values):
        raise ValueError(f"{name} must be four positive integers, one per stage, got {values}")
    return values  # type: ignore[return-value]


def _check(*, depth: int, groups: int, width_per_group: int, se_reduction: int | None, variant: str, stem: str,
           strides: tuple[int, ...], multi_grid: Sequence[int] | None, out_indices: tuple[int, ...],
           frozen_stages: int, norm: str, base_channels: int, drop_path_rate: float) -> None:
    """Raise ``ValueError`` naming the valid choices for the first bad argument."""
    if depth not in STAGE_BLOCKS:
        raise ValueError(f"ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")
    if variant not in _VARIANTS:
        raise ValueError(f"unknown ResNet variant '{variant}'; choose one of {', '.join(_VARIANTS)}")
    if stem not in _STEMS:
        raise ValueError(f"unknown stem '{stem}'; choose one of {', '.join(_STEMS)}")
    check_norm(norm, owner="ResNet", optional=False)
    basic = STAGE_BLOCKS[depth][0] is BasicBlock
    if basic and (groups != 1 or width_per_group != 64 or variant != "resnet"):
        raise ValueError(f"depth {depth} uses basic blocks, which support only groups=1, width_per_group=64 and "
                         f"variant='resnet'; use depth 50, 101 or 152 for ResNeXt / SENet")
    if groups < 1 or width_per_group < 1 or base_channels < 1:
        raise ValueError("groups, width_per_group and base_channels must be positive, got "
                         f"{groups}, {width_per_group}, {base_channels}")
    if se_reduction is not None and se_reduction < 1:
        raise ValueError(f"se_reduction must be a positive integer (16 in SENet) or None, got {se_reduction}")
    if any(s not in (1, 2) for s in strides):
        raise ValueError(f"strides must be 1 or 2 per stage, got {strides}")
    if multi_grid is not None and (not multi_grid or any(int(r) < 1 for r in multi_grid)):
        raise ValueError(f"multi_grid must be positive unit rates such as (1, 2, 4), or None, got {multi_grid}")
    if not out_indices or any(i not in range(4) for i in out_indices) or len(set(out_indices)) != len(out_indices):
        raise ValueError(f"out_indices must be distinct stage indices in 0..3 (c2..c5), got {out_indices}")
    if not -1 <= frozen_stages <= 4:
        raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
