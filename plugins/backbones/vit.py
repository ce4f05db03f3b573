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
Parameter names are timm's (``blocks.N.attn.qkv``), but ``patch_embed`` for timm's ``patch_embed.proj``;
:mod:`segkit_plugins.backbones.vit_weights` maps torchvision's and timm's weights onto them.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from segkit.checkpoint import (BACKBONE_INFO_KEY, CONFIG_KEY, CheckpointError, extract_state_dict,
                               load_state_dict_checked, read_checkpoint)
from segkit.ops import ShapeSpec
from segkit.ops.norm import hold_in_eval
from segkit.registry import BACKBONES
from segkit.weight_names import is_weight_name
from segkit.weight_sources import read_weights_file
from segkit.weights import named_backbone_weights
from segkit_plugins.backbones.timm_backbone import level_names
from segkit_plugins.backbones.vit_weights import (convert_timm_vit, convert_torchvision_vit, infer_vit_arch,
                                                  is_timm_vit, is_torchvision_vit)

__all__ = ["VisionTransformer", "EncoderBlock", "VIT_ARCHS", "resize_pos_embed"]

#: Presets of ``arch``: torchvision's ``vit_b_16`` and DeiT's small and tiny widths (timm's ``vit_small`` /
#: ``vit_tiny_patch16_224``), all with 16-pixel patches at 224 px.
VIT_ARCHS: dict[str, dict[str, Any]] = {
    "vit_t_16": {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3, "mlp_ratio": 4.0},
    "vit_s_16": {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, "mlp_ratio": 4.0},
    "vit_b_16": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0},
    "vit_l_16": {"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0},
}
_NORM_EPS = 1e-6  # torchvision's and timm's ViTs


def _patch_embedding(stem: str, patch_size: int, embed_dim: int,
                     stem_channels: Sequence[int] | None) -> nn.Module:
    """The module turning a batch into a ``patch_size``-stride map of ``embed_dim`` channels (see ``stem``)."""
    if stem == "patch":
        if stem_channels is not None:
            raise ValueError("stem_channels sets the widths of stem: conv; the patch stem has none")
        return nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
    if stem != "conv":
        raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
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


def resize_pos_embed(grid_embed: Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> Tensor:
    """Position embeddings of a ``old_grid`` patch grid, Tensor[1, gh * gw, D] (row-major), interpolated
    bicubically in 2-D (``align_corners=False``) to ``new_grid``: Tensor[1, new_h * new_w, D]."""
    old_h, old_w = (int(v) for v in old_grid)
    new_h, new_w = (int(v) for v in new_grid)
    if (old_h, old_w) == (new_h, new_w):
        return grid_embed
    dim = grid_embed.shape[-1]
    grid = grid_embed.reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_h, new_w), mode="bicubic", align_corners=False)
    return grid.to(grid_embed.dtype).permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    """``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` on tokens Tensor[N, L, dim]; each branch dropped
    per sample with probability ``drop_path`` in training (stochastic depth)."""

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_NORM_EPS)
        self.attn = _Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=_NORM_EPS)
        self.mlp = _MLP(dim, int(round(dim * mlp_ratio)))
        self.drop_path = StochasticDepth(drop_path, mode="row") if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


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
            Help Transformers See Better"), which trains from scratch far more readily. Published ViT
            weights are for the patch stem.
        stem_channels: the conv stem's widths, one per stride-2 conv (default: doubling up to
            ``embed_dim / 2`` at the last).
        pretrained: a file of weights (torchvision's ``vit_*`` or timm's ``vit_*`` state dict, classifier
            ignored; a file written by ``segkit convert``; a segkit checkpoint of this backbone or of a model
            whose backbone it is) or a weight name (``torchvision://vit_b_16.IMAGENET1K_V1``,
            ``timm://vit_base_patch16_224.mae``). Position embeddings of another grid than ``img_size``'s are
            interpolated to it; unknown and missing keys are refused naming the file.

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
        drop_path_rate: float = 0.0,
        out_indices: Sequence[int] | None = None,
        final_norm: bool = True,
        frozen_stages: int = -1,
        stem: str = "patch",
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
                     "mlp_ratio": self.mlp_ratio}
        self.with_cls_token, self.final_norm = bool(with_cls_token), bool(final_norm)
        self.frozen_stages = int(frozen_stages)

        self.stem = stem
        self.patch_embed = _patch_embedding(stem, self.patch_size, self.embed_dim, stem_channels)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim)) if self.with_cls_token else None
        prefix = int(self.with_cls_token)
        self.pos_embed = nn.Parameter(torch.zeros(1, prefix + self.grid[0] * self.grid[1], self.embed_dim))
        rates = [drop_path_rate * k / max(self.depth - 1, 1) for k in range(self.depth)]
        self.blocks = nn.ModuleList(EncoderBlock(dim=self.embed_dim, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                                                 qkv_bias=qkv_bias, drop_path=rate) for rate in rates)
        self.norm = nn.LayerNorm(self.embed_dim, eps=_NORM_EPS) if self.final_norm else None
        names = level_names([self.patch_size] * len(blocks), blocks)
        self._outputs = dict(zip(blocks, names))
        self._init_weights()
        if pretrained is not None:
            self.load_pretrained(pretrained)
        self._freeze()

    def _init_weights(self) -> None:
        # torchvision's: the patch projection from N(0, 1 / fan_in), the position embeddings N(0, 0.02), the
        # class token zero; the linear layers as timm's (truncated N(0, 0.02), zero bias).
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
        """``{name: ShapeSpec(embed_dim, patch_size)}`` of the returned maps."""
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
        tokens = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens) if self.norm is not None else tokens

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """The maps of the ``out_indices`` blocks of a normalised batch Tensor[N, 3, H, W]:
        ``[N, embed_dim, H / patch_size, W / patch_size]`` each, the last block's after the final norm."""
        batch, grid = len(x), (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = self.embed(x)
        prefix, last = int(self.with_cls_token), max(self._outputs)
        outputs: OrderedDict[str, Tensor] = OrderedDict()
        for index, block in enumerate(self.blocks[: last + 1]):
            tokens = block(tokens)
            if index in self._outputs:
                out = self.norm(tokens) if index == self.depth - 1 and self.norm is not None else tokens
                outputs[self._outputs[index]] = out[:, prefix:].transpose(1, 2).reshape(batch, -1, *grid)
        return outputs

    # ------------------------------------------------------------------------------------ weights
    def load_pretrained(self, path: str) -> None:
        """Load a file or a weight name (see the class docstring).

        Raises:
            CheckpointError: the file or name cannot be read, holds another network or another ViT (naming
                the options that differ), or has unknown or missing keys (naming the file and the keys).
        """
        if is_weight_name(path) and self.stem != "patch":
            raise CheckpointError(f"pretrained '{path}': published ViT weights are for the patch stem; set stem: "
                                  f"patch, or give a file of a {self.stem}-stem ViT that segkit trained")
        if is_weight_name(path):
            converted = named_backbone_weights(path)
            state, info = converted.state_dict, converted.config
        else:
            state, info = _read_state(path)
        if isinstance(info, Mapping) and info.get("type") not in (None, "VisionTransformer"):
            raise CheckpointError(f"pretrained weights '{path}' are a {info['type']} backbone's, not a "
                                  f"VisionTransformer's; choose ViT weights.")
        source = f"pretrained weights '{path}'"
        arch = infer_vit_arch(state) if "patch_embed.weight" in state else {}  # a conv stem: the load checks
        differ = [f"{k}={v!r} in the weights but {self.arch[k]!r} in the model"
                  for k, v in arch.items() if k in self.arch and v != self.arch[k]]
        if differ:
            raise CheckpointError(f"{source} were made for another ViT: " + "; ".join(differ) + ". Set these backbone "
                                  "options (or arch) to the weights' values, or choose weights made for this backbone.")
        state = self._fit(state, source)
        load_state_dict_checked(self, state, source=source, strict=True, hint="check the ViT's options")

    def _fit(self, state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
        """``state`` adapted to this model: the class token dropped where the model has none, the final norm
        dropped without ``final_norm``, the position embeddings interpolated to ``img_size``'s grid."""
        state = dict(state)
        has_cls = "cls_token" in state
        if has_cls and not self.with_cls_token:
            del state["cls_token"]
            state["pos_embed"] = state["pos_embed"][:, 1:]
        elif self.with_cls_token and not has_cls:
            raise CheckpointError(f"{source} have no class token; set the backbone's with_cls_token: false.")
        if not self.final_norm:
            for key in ("norm.weight", "norm.bias"):
                state.pop(key, None)
        prefix = int(self.with_cls_token)
        pos = state["pos_embed"]
        side = round((pos.shape[1] - prefix) ** 0.5)
        if pos.shape[1] - prefix != self.grid[0] * self.grid[1] and side * side == pos.shape[1] - prefix:
            patches = resize_pos_embed(pos[:, prefix:], (side, side), self.grid)
            state["pos_embed"] = torch.cat([pos[:, :prefix], patches], dim=1)
            warnings.warn(f"{source}: position embeddings of a {side}x{side} grid interpolated to the backbone's "
                          f"{self.grid[0]}x{self.grid[1]} (img_size); set img_size: {side * self.patch_size} to keep "
                          f"them as trained.", stacklevel=4)
        own = self.state_dict()
        unknown, missing = [k for k in state if k not in own], [k for k in own if k not in state]
        if unknown or missing:
            problems = [f"{len(keys)} {kind} key(s) {_few(keys)}" for kind, keys in
                        (("unknown", unknown), ("missing", missing)) if keys]
            raise CheckpointError(f"{source} do not fit the VisionTransformer: " + " and ".join(problems) + ". It "
                                  "reads torchvision's and timm's plain ViTs (no layer scale, register tokens, conv "
                                  "stem or q/k norm) and segkit's.")
        return state

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


def _grid(img_size: int | Sequence[int], patch_size: int) -> tuple[int, int]:
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or any(not isinstance(s, int) or s < patch_size or s % patch_size for s in size):
        raise ValueError(f"img_size must be an integer or [height, width], multiples of patch_size {patch_size}, "
                         f"got {img_size}")
    return size[0] // patch_size, size[1] // patch_size


def _read_state(path: str) -> tuple[dict[str, Tensor], Any]:
    """The segkit-named state dict in the file ``path`` and the backbone config it records (or ``None``)."""
    if str(path).endswith(".safetensors"):
        ckpt: Mapping[str, Any] = {"state_dict": read_weights_file(str(path))}
    else:
        ckpt = read_checkpoint(path)
    state, info = extract_state_dict(ckpt), ckpt.get(BACKBONE_INFO_KEY)
    if info is None and isinstance(ckpt.get(CONFIG_KEY), Mapping):
        info = (ckpt[CONFIG_KEY].get("model") or {}).get("backbone")
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if is_torchvision_vit(state):
        return convert_torchvision_vit(state), info
    if is_timm_vit(state):
        return convert_timm_vit(state), info
    if not any(key.startswith("patch_embed.") for key in state):
        raise CheckpointError(f"pretrained weights '{path}' are not a Vision Transformer's (first keys: "
                              f"{', '.join(list(state)[:3])}); the VisionTransformer reads torchvision's vit_* and "
                              f"timm's vit_* state dicts and segkit's.")
    return state, info


def _few(keys: list[str], n: int = 5) -> str:
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"
