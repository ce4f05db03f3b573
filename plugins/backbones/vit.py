"""The Vision Transformer (Dosovitskiy et al. 2021) as a backbone: patch tokens reshaped to maps.

An image is cut into ``patch_size`` patches, each projected to ``embed_dim`` channels (a convolution of
that kernel and stride); a class token may lead the sequence; learned position embeddings are added; a
stack of pre-norm encoder blocks (LayerNorm, multi-head self-attention, LayerNorm, MLP with GELU, each
with a residual) follows, then a final LayerNorm. The returned maps are the patch tokens of chosen blocks
as ``[N, embed_dim, H / patch_size, W / patch_size]``, named by their stride as :class:`TimmBackbone`
names maps (``c4`` for 16-pixel patches, ``c3`` for 8, ``s14`` for 14; ``c4_5`` / ``c4_11`` where several
blocks are returned).

Any input size whose sides are multiples of ``patch_size`` is taken: the position embeddings of the
pretraining grid (``img_size / patch_size``) are interpolated in 2-D to the input's grid, the class
token's embedding kept apart, as the paper fine-tunes at higher resolution (bicubic, ``align_corners=False``
without antialiasing, as ViTDet; torchvision's ``interpolate_embeddings`` uses ``align_corners=True`` and
timm antialiases when it shrinks the grid).

ViTDet's attention is an option (:mod:`segkit_plugins.backbones.vit_blocks`): ``window_size`` makes the blocks
attend within windows of the patch grid (padded to whole windows), except ``global_attn_indexes``, and
``use_rel_pos`` adds decomposed relative position biases. The default, ``window_size: 0`` without relative
positions, is the paper's ViT: every block attends globally, and published weights load as they are.

Parameter names are timm's (``blocks.N.attn.qkv``, ``blocks.N.attn.rel_pos_h``), but ``patch_embed`` for timm's
``patch_embed.proj``; :mod:`segkit_plugins.backbones.vit_weights` maps torchvision's and timm's (plain and SAM)
weights onto them, :mod:`segkit_plugins.backbones.vit_loading` fits them to the model's options.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from segkit.ops import ShapeSpec
from segkit.ops.norm import hold_in_eval
from segkit.registry import BACKBONES
from segkit_plugins.backbones.timm_backbone import level_names
from segkit_plugins.backbones.vit_blocks import NORM_EPS, EncoderBlock, resize_pos_embed
from segkit_plugins.backbones.vit_loading import load_pretrained

__all__ = ["VisionTransformer", "EncoderBlock", "VIT_ARCHS", "resize_pos_embed"]

#: Presets of ``arch``: torchvision's ``vit_b_16`` and DeiT's small and tiny widths (timm's ``vit_small`` /
#: ``vit_tiny_patch16_224``), all with 16-pixel patches at 224 px.
VIT_ARCHS: dict[str, dict[str, Any]] = {
    "vit_t_16": {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3, "mlp_ratio": 4.0},
    "vit_s_16": {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, "mlp_ratio": 4.0},
    "vit_b_16": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0},
    "vit_l_16": {"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0},
}


class HybridStem(nn.Module):
    """The paper's hybrid input: a CNN backbone's map (its one output) projected to ``embed_dim`` channels by
    a 1x1 conv, each position a token ("patch size 1" on the map)."""

    def __init__(self, cfg: Mapping[str, Any], embed_dim: int) -> None:
        super().__init__()
        self.cnn = BACKBONES.build_child(cfg, path="stem")
        shapes = self.cnn.output_shape()
        if len(shapes) != 1:
            raise ValueError(f"stem: a {cfg['type']} stem must return one map (the tokens' source), it returns "
                             f"{sorted(shapes)}: make it return one (its out_indices or out_features)")
        (self.feature, shape), = shapes.items()
        self.stride = int(shape.stride)
        self.proj = nn.Conv2d(shape.channels, embed_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.cnn(x)[self.feature])


def _patch_embedding(stem: str | Mapping[str, Any], patch_size: int, embed_dim: int,
                     stem_channels: Sequence[int] | None) -> nn.Module:
    """The module turning a batch into a ``patch_size``-stride map of ``embed_dim`` channels (see ``stem``)."""
    if isinstance(stem, Mapping):
        if stem_channels is not None:
            raise ValueError("stem_channels sets the widths of stem: conv; a backbone stem has its own options")
        hybrid = HybridStem(stem, embed_dim)
        if hybrid.stride != patch_size:
            raise ValueError(f"the {stem['type']} stem's map has stride {hybrid.stride}, so each token covers "
                             f"{hybrid.stride} px: set patch_size: {hybrid.stride} (it is {patch_size})")
        return hybrid
    if stem == "patch":
        if stem_channels is not None:
            raise ValueError("stem_channels sets the widths of stem: conv; the patch stem has none")
        return nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
    if stem != "conv":
        raise ValueError(f"stem must be 'patch', 'conv' or a backbone config ({{type: ResNet, ...}}), got {stem!r}")
    convs = patch_size.bit_length() - 1
    if patch_size < 2 or 2 ** convs != patch_size:
        raise ValueError(f"stem: conv halves the resolution per conv, so patch_size must be a power of 2 >= 2, "
                         f"got {patch_size}")
    widths = (list(stem_channels) if stem_channels is not None
              else [max(embed_dim // 2 ** (convs - i), 1) for i in range(convs)])
    if len(widths) != convs or min(widths) < 1:
        raise ValueError(f"stem_channels lists {convs} widths >= 1 for patch_size {patch_size} (one per stride-2 "
                         f"conv), got {list(widths)}")
    layers: list[nn.Module] = []
    for c_in, c_out in zip([3, *widths[:-1]], widths):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
    layers.append(nn.Conv2d(widths[-1], embed_dim, 1))
    return nn.Sequential(*layers)


@BACKBONES.register()
class VisionTransformer(nn.Module):
    """Vision Transformer returning the patch tokens of chosen blocks as maps of stride ``patch_size``.

    Args:
        arch: a preset of :data:`VIT_ARCHS` (``vit_b_16``, ``vit_s_16``, ``vit_t_16``, ``vit_l_16``) giving
            ``patch_size``, ``embed_dim``, ``depth``, ``num_heads`` and ``mlp_ratio``; an explicit value of
            one of them overrides the preset's. ``None``: all five must be given.
        patch_size, embed_dim, depth, num_heads, mlp_ratio: the architecture (``embed_dim`` divisible by
            ``num_heads``; the MLP's hidden width is ``embed_dim * mlp_ratio``).
        img_size: the input size the position embeddings are learned for (an int or ``[h, w]``, multiples
            of ``patch_size``): the pretraining size (224 for the published weights). Other input sizes
            get the embeddings interpolated.
        with_cls_token: lead the sequence with a learned class token (it has a position embedding of its
            own, not interpolated). Weights with a class token load into a model without one (ViTDet):
            the token and its embedding are dropped.
        qkv_bias: biases in the query, key and value projections.
        window_size: ``0`` (default): every block attends over all tokens. ``k > 0``: the blocks attend within
            ``k x k`` windows of the patch grid (ViTDet: 14), the grid zero-padded at the bottom and right to whole
            windows and cut back after, except the blocks of ``global_attn_indexes``. Needs ``with_cls_token: false``.
        global_attn_indexes: the blocks (0-based) that attend globally when ``window_size > 0`` (ViTDet's ViT-B:
            ``[2, 5, 8, 11]``); ignored when ``window_size`` is 0.
        use_rel_pos: add decomposed relative position biases to every block's attention (ViTDet, MViTv2): tables
            ``rel_pos_h`` / ``rel_pos_w`` of ``2 * size - 1`` rows per block, ``size`` the window side in a windowed
            block and the ``rel_pos_img_size`` grid in a global one, interpolated linearly on another grid. They
            start at zero, and weights without them (MAE's, ImageNet's) load with zero tables. Needs
            ``with_cls_token: false``.
        rel_pos_img_size: the input size (an int or ``[h, w]``, multiples of ``patch_size``) the global blocks'
            relative position tables are made for (ViTDet: 1024, its training crop, while the position
            embeddings keep the pretraining 224); ``None``: ``img_size``. Ignored without ``use_rel_pos``.
        drop_path_rate: stochastic depth; the drop probability grows linearly over the blocks from 0 to this.
        out_indices: the blocks (0-based) whose patch tokens are returned; ``None``: the last block.
            Blocks after the last of them are not run (their parameters get no gradients: freeze them, or
            give multi-process training ``find_unused_parameters``).
        final_norm: apply the final LayerNorm to the last block's tokens (torchvision's and timm's encoder
            output); ``False`` drops that norm (ViTDet's pyramid reads the last block's tokens as they
            are), and its weights in a file are ignored.
        frozen_stages: ``-1`` trains everything; ``0`` freezes the patch embedding, the class token and the
            position embeddings; ``k`` also the first ``k`` blocks.
        stem: ``"patch"`` (the paper's ViT: one ``patch_size`` conv of that stride) or ``"conv"``: the
            paper's hybrid input, tokens from a small CNN's map - ``log2(patch_size)`` 3x3 stride-2 convs
            with BatchNorm and ReLU, then a 1x1 conv to ``embed_dim`` (Xiao et al. 2021, "Early Convolutions
            Help Transformers See Better"), which trains from scratch far more readily; or a backbone config
            (``{type: ResNet, depth: 18, out_features: [c3]}``): the paper's hybrid ViT, whose tokens are the
            positions of a CNN's map (one output, of stride ``patch_size``) projected by a 1x1 conv. Published
            ViT weights are for the patch stem.
        stem_channels: the conv stem's widths, one per stride-2 conv (default: doubling up to
            ``embed_dim / 2`` at the last).
        pretrained: a file of weights (torchvision's ``vit_*``, timm's ``vit_*`` or timm's SAM ``samvit_*``
            state dict, classifier and SAM's neck ignored; a file written by ``segkit convert``; a segkit
            checkpoint of this backbone or of a model whose backbone it is) or a weight name
            (``torchvision://vit_b_16.IMAGENET1K_V1``, ``timm://vit_base_patch16_224.mae``). Position
            embeddings of another grid than ``img_size``'s are interpolated to it, as are global blocks'
            relative position tables; weights without relative position tables give zero tables; unknown and
            missing keys are refused naming the file, as are weights of another window layout.

    Example:
        >>> net = VisionTransformer(arch="vit_t_16", depth=2)
        >>> net.output_shape()
        {'c4': ShapeSpec(channels=192, stride=16)}
        >>> net(torch.rand(1, 3, 64, 96))["c4"].shape
        torch.Size([1, 192, 4, 6])
    """

    def __init__(
        self,
        *,
        arch: str | None = "vit_b_16",
        patch_size: int | None = None,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        img_size: int | Sequence[int] = 224,
        with_cls_token: bool = True,
        qkv_bias: bool = True,
        window_size: int = 0,
        global_attn_indexes: Sequence[int] = (),
        use_rel_pos: bool = False,
        rel_pos_img_size: int | Sequence[int] | None = None,
        drop_path_rate: float = 0.0,
        out_indices: Sequence[int] | None = None,
        final_norm: bool = True,
        frozen_stages: int = -1,
        stem: str | Mapping[str, Any] = "patch",
        stem_channels: Sequence[int] | None = None,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        given = {"patch_size": patch_size, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads,
                 "mlp_ratio": mlp_ratio}
        options = _architecture(arch, given)
        self.patch_size, self.embed_dim = int(options["patch_size"]), int(options["embed_dim"])
        self.depth, self.num_heads = int(options["depth"]), int(options["num_heads"])
        self.mlp_ratio = float(options["mlp_ratio"])
        self.grid = _grid(img_size, self.patch_size)
        self.rel_pos_grid = _grid(img_size if rel_pos_img_size is None else rel_pos_img_size, self.patch_size,
                                  name="rel_pos_img_size")
        self.windows = _windows(window_size, global_attn_indexes, self.depth)
        self.use_rel_pos = bool(use_rel_pos)
        if with_cls_token and (any(self.windows) or self.use_rel_pos):
            raise ValueError("with_cls_token: true does not combine with window_size > 0 or use_rel_pos: true (windows "
                             "and relative positions are laid over the patch grid, which the class token is not on); "
                             "set with_cls_token: false, as ViTDet does")
        chosen = [int(i) for i in (out_indices if out_indices is not None else [-1])]
        blocks = sorted({i + self.depth if i < 0 else i for i in chosen})
        if not blocks or blocks[0] < 0 or blocks[-1] >= self.depth:
            raise ValueError(f"out_indices must be blocks 0..{self.depth - 1} (or negative from the end), "
                             f"got {out_indices}")
        if not -1 <= frozen_stages <= self.depth:
            raise ValueError(f"frozen_stages must be in -1..{self.depth} (0: the embeddings, k: and k blocks), "
                             f"got {frozen_stages}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.arch = {"patch_size": self.patch_size, "embed_dim": self.embed_dim, "depth": self.depth,
                     "mlp_ratio": self.mlp_ratio, "use_rel_pos": self.use_rel_pos, "window_size": max(self.windows),
                     "global_attn_indexes": [i for i, window in enumerate(self.windows) if not window]}
        self.with_cls_token, self.final_norm = bool(with_cls_token), bool(final_norm)
        self.frozen_stages = int(frozen_stages)

        self.stem = stem if isinstance(stem, str) else "backbone"
        self.patch_embed = _patch_embedding(stem, self.patch_size, self.embed_dim, stem_channels)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim)) if self.with_cls_token else None
        prefix = int(self.with_cls_token)
        self.pos_embed = nn.Parameter(torch.zeros(1, prefix + self.grid[0] * self.grid[1], self.embed_dim))
        rates = [drop_path_rate * k / max(self.depth - 1, 1) for k in range(self.depth)]
        self.blocks = nn.ModuleList(
            EncoderBlock(dim=self.embed_dim, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=qkv_bias,
                         drop_path=rate, window_size=window, rel_pos_size=self._rel_pos_size(window))
            for rate, window in zip(rates, self.windows))
        self.norm = nn.LayerNorm(self.embed_dim, eps=NORM_EPS) if self.final_norm else None
        names = level_names([self.patch_size] * len(blocks), blocks)
        self._outputs = dict(zip(blocks, names))
        self._init_weights()
        if pretrained is not None:
            self.load_pretrained(pretrained)
        self._freeze()

    def _rel_pos_size(self, window: int) -> tuple[int, int] | None:
        if not self.use_rel_pos:
            return None
        return (window, window) if window else self.rel_pos_grid

    def _init_weights(self) -> None:
        # torchvision's: the patch projection from N(0, 1 / fan_in), the position embeddings N(0, 0.02), the
        # class token zero; the linear layers as timm's (truncated N(0, 0.02), zero bias); the relative position
        # tables zero, as ViTDet's.
        if self.stem == "patch":
            nn.init.trunc_normal_(self.patch_embed.weight, std=(1.0 / self.patch_embed.weight[0].numel()) ** 0.5)
            nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------------------- shapes
    def output_shape(self) -> dict[str, ShapeSpec]:
        """``{name: ShapeSpec(embed_dim, patch_size)}`` of the returned maps (windows change no map: their
        padding is cut off in each block)."""
        return {name: ShapeSpec(self.embed_dim, self.patch_size) for name in self._outputs.values()}

    def block_outputs(self) -> dict[str, int]:
        """``{name: block index}``: which block each returned map comes from."""
        return {name: block for block, name in self._outputs.items()}

    def position_embeddings(self, grid: Sequence[int]) -> Tensor:
        """The position embeddings used for a ``grid`` of patches ``(rows, columns)``: Tensor[1, P + rows *
        columns, embed_dim], the class token's first (``P = 1``) where there is one."""
        prefix = int(self.with_cls_token)
        patches = resize_pos_embed(self.pos_embed[:, prefix:], self.grid, grid)
        return torch.cat([self.pos_embed[:, :prefix], patches], dim=1) if prefix else patches

    def embed(self, x: Tensor) -> Tensor:
        """The token sequence entering the first block, Tensor[N, P + h * w, embed_dim], of a normalised
        batch Tensor[N, 3, H, W] (``h, w = H / patch_size, W / patch_size``).

        Raises:
            ValueError: a side of the batch is not a multiple of ``patch_size``.
        """
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"VisionTransformer takes inputs whose sides are multiples of its patch size {self.patch_size}, got "
                f"{height}x{width}: set the model's size_divisor to a multiple of {self.patch_size} (a detector's or "
                f"segmentor's padding), or crop the inputs to such sizes.")
        tokens = self.patch_embed(x)
        grid = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        return tokens + self.position_embeddings(grid)

    def forward_tokens(self, x: Tensor) -> Tensor:
        """The encoder's output of every token, Tensor[N, P + h * w, embed_dim] (the class token first): all
        blocks, then the final norm (with ``final_norm``) - torchvision's ``encoder`` output and timm's
        ``forward_features``."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens, grid)
        return self.norm(tokens) if self.norm is not None else tokens

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """The maps of the ``out_indices`` blocks of a normalised batch Tensor[N, 3, H, W]:
        ``[N, embed_dim, H / patch_size, W / patch_size]`` each, the last block's after the final norm."""
        batch, grid = len(x), (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = self.embed(x)
        prefix, last = int(self.with_cls_token), max(self._outputs)
        outputs: OrderedDict[str, Tensor] = OrderedDict()
        for index, block in enumerate(self.blocks[: last + 1]):
            tokens = block(tokens, grid)
            if index in self._outputs:
                out = self.norm(tokens) if index == self.depth - 1 and self.norm is not None else tokens
                outputs[self._outputs[index]] = out[:, prefix:].transpose(1, 2).reshape(batch, -1, *grid)
        return outputs

    # ---------------------------------------------------------------------------- layer-wise decay
    @property
    def num_layers(self) -> int:
        """The layers that :meth:`layer_id` counts: the blocks."""
        return self.depth

    def layer_id(self, name: str) -> int:
        """The layer of the parameter ``name`` (as :meth:`named_parameters` names it), for layer-wise
        learning-rate decay: ``0`` for the patch embedding, the class token and the position embeddings, ``i + 1``
        for block ``i``, ``num_layers + 1`` for the final norm (ViTDet's numbering).

        Raises:
            ValueError: ``name`` is not one of the backbone's parameters.
        """
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
            return 0
        if name.startswith("blocks.") and name.split(".")[1].isdigit() and int(name.split(".")[1]) < self.depth:
            return int(name.split(".")[1]) + 1
        if name in ("norm.weight", "norm.bias") and self.norm is not None:
            return self.depth + 1
        raise ValueError(f"'{name}' is not a parameter of the VisionTransformer")

    # ------------------------------------------------------------------------------------ weights
    def load_pretrained(self, path: str) -> None:
        """Load a file or a weight name (see the class docstring and
        :func:`~segkit_plugins.backbones.vit_loading.load_pretrained`).

        Raises:
            CheckpointError: the file or name cannot be read, holds another network or another ViT (naming
                the options that differ), or has unknown or missing keys (naming the file and the keys).
        """
        load_pretrained(self, path)

    # ----------------------------------------------------------------------------------- freezing
    def _frozen_parts(self) -> tuple[list[nn.Module], list[nn.Parameter]]:
        if self.frozen_stages < 0:
            return [], []
        params = [p for p in (self.cls_token, self.pos_embed) if p is not None]
        return [self.patch_embed, *self.blocks[: self.frozen_stages]], params

    def _freeze(self) -> None:
        modules, params = self._frozen_parts()
        for p in [*params, *(p for m in modules for p in m.parameters())]:
            p.requires_grad_(False)
        for module in modules:
            module.eval()

    def train(self, mode: bool = True) -> VisionTransformer:
        """Set training mode, keeping the frozen modules in eval mode (no drop path there)."""
        super().train(mode)
        if mode:
            hold_in_eval(self._frozen_parts()[0], self, norm_eval=False)
        return self


def _architecture(arch: str | None, given: Mapping[str, Any]) -> dict[str, Any]:
    if arch is not None and arch not in VIT_ARCHS:
        raise ValueError(f"unknown ViT arch '{arch}'; choose one of {', '.join(VIT_ARCHS)} or null (with "
                         f"patch_size, embed_dim, depth, num_heads and mlp_ratio)")
    options = {**(VIT_ARCHS[arch] if arch is not None else {}), **{k: v for k, v in given.items() if v is not None}}
    absent = [k for k in given if k not in options]
    if absent:
        raise ValueError(f"a ViT without arch needs {', '.join(absent)}")
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        if isinstance(options[key], bool) or not isinstance(options[key], int) or options[key] < 1:
            raise ValueError(f"{key} must be a positive integer, got {options[key]!r}")
    if options["embed_dim"] % options["num_heads"]:
        raise ValueError(f"embed_dim {options['embed_dim']} is not divisible by num_heads {options['num_heads']}")
    if not options["mlp_ratio"] > 0:
        raise ValueError(f"mlp_ratio must be > 0, got {options['mlp_ratio']}")
    return options


def _grid(img_size: int | Sequence[int], patch_size: int, *, name: str = "img_size") -> tuple[int, int]:
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or any(not isinstance(s, int) or s < patch_size or s % patch_size for s in size):
        raise ValueError(f"{name} must be an integer or [height, width], multiples of patch_size {patch_size}, "
                         f"got {img_size}")
    return size[0] // patch_size, size[1] // patch_size


def _windows(window_size: int, global_attn_indexes: Sequence[int], depth: int) -> list[int]:
    """Each block's window side, ``0`` for a block attending globally."""
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 0:
        raise ValueError(f"window_size must be an integer >= 0 (0: every block attends globally), got {window_size!r}")
    indexes = list(global_attn_indexes)
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth for i in indexes):
        raise ValueError(f"global_attn_indexes must be blocks 0..{depth - 1}, got {indexes}")
    return [0 if i in indexes else window_size for i in range(depth)]
