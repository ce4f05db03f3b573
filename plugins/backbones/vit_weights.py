"""Weights of other libraries for the Vision Transformer: torchvision's ``vit_*``, timm's ``vit_*`` and timm's
SAM ViT (``samvit_*``, ``VisionTransformerSAM``) state dicts renamed for segkit's
:class:`~segkit_plugins.backbones.vit.VisionTransformer`, the architecture a state dict was made for, and the
``TorchvisionViT`` / ``TimmViT`` / ``TimmSamViT`` converters of ``segkit convert`` and of
``pretrained: torchvision://vit_b_16.IMAGENET1K_V1`` / ``timm://vit_base_patch16_224.mae``.

==================================================== ================================
torchvision                                          segkit (timm's names, but ``patch_embed``)
==================================================== ================================
``conv_proj``                                        ``patch_embed``
``class_token``                                      ``cls_token``
``encoder.pos_embedding``                            ``pos_embed``
``encoder.layers.encoder_layer_N.ln_1`` / ``ln_2``   ``blocks.N.norm1`` / ``norm2``
``...self_attention.in_proj_weight`` / ``_bias``     ``blocks.N.attn.qkv.weight`` / ``bias``
``...self_attention.out_proj``                       ``blocks.N.attn.proj``
``...mlp.0`` / ``mlp.3``                             ``blocks.N.mlp.fc1`` / ``fc2``
``encoder.ln``                                       ``norm``
==================================================== ================================

timm's layout differs only in ``patch_embed.proj`` (segkit: ``patch_embed``). Both libraries stack the
query, key and value projections in one ``[3 * D, D]`` matrix in that order, so the attention weights are
taken as they are. The classifier (torchvision's ``heads``, timm's ``head``, ``fc_norm``, ``attn_pool``)
is dropped; any other key (a conv stem, layer scale, register tokens, a q/k norm) is left under its name,
so that loading refuses it naming the file.

timm's SAM ViT (ViTDet's and SAM's image encoder: window attention and decomposed relative positions, no class
token) has the same block names, ``blocks.N.attn.rel_pos_h`` / ``rel_pos_w`` included; its position embeddings
are a ``[1, H, W, D]`` grid, flattened row-major to segkit's ``[1, H * W, D]``, and its ``neck`` (SAM's convs, or
the LayerNorm of a model without them) and ``head`` are dropped. The window layout is read from the relative
position tables where they tell it (windowed blocks' tables are shorter than the global blocks').
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from segkit.checkpoint import CheckpointError
from segkit.registry import CONVERTERS
from segkit.weights import ConvertedWeights, WeightConverter

__all__ = ["convert_torchvision_vit", "convert_timm_vit", "convert_timm_sam_vit", "infer_vit_arch",
           "is_torchvision_vit", "is_timm_vit", "is_timm_sam_vit", "TorchvisionViT", "TimmViT", "TimmSamViT",
           "VIT_CLASSIFIER_PREFIXES", "HEADS_BY_WIDTH"]

#: Keys of the classifiers (torchvision, timm), which the backbone does not have.
VIT_CLASSIFIER_PREFIXES = ("heads.", "head.", "fc_norm.", "attn_pool.")
#: Attention heads of the published ViTs by width (Ti, S, B, L, H): the weights do not record them.
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}

_TORCHVISION_RULES = tuple((re.compile(p), r) for p, r in (
    (r"^conv_proj\.(weight|bias)$", r"patch_embed.\1"),
    (r"^class_token$", "cls_token"),
    (r"^encoder\.pos_embedding$", "pos_embed"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_([12])\.(weight|bias)$", r"blocks.\1.norm\2.\3"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    # torchvision's MLPBlock is a Sequential (mlp.0, mlp.3); before 0.13 it named them linear_1 / linear_2
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:0|linear_1)\.(weight|bias)$", r"blocks.\1.mlp.fc1.\2"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:3|linear_2)\.(weight|bias)$", r"blocks.\1.mlp.fc2.\2"),
    (r"^encoder\.ln\.(weight|bias)$", r"norm.\1"),
))


def is_torchvision_vit(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether the keys are those of a torchvision ``VisionTransformer`` (``encoder.pos_embedding``)."""
    return "encoder.pos_embedding" in state_dict


def is_timm_vit(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether the keys are those of a timm ``VisionTransformer`` (``patch_embed.proj`` and ``blocks.0.attn.qkv``,
    not a SAM ViT's)."""
    return ("patch_embed.proj.weight" in state_dict and "blocks.0.attn.qkv.weight" in state_dict
            and not is_timm_sam_vit(state_dict))


def is_timm_sam_vit(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether the keys are those of a timm ``VisionTransformerSAM`` (a ``patch_embed.proj`` and position embeddings
    as a ``[1, H, W, D]`` grid or relative position tables)."""
    pos = state_dict.get("pos_embed")
    return "patch_embed.proj.weight" in state_dict and (
        (pos is not None and pos.ndim == 4) or any(k.endswith(".attn.rel_pos_h") for k in state_dict))


def convert_torchvision_vit(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision ``vit_*`` state dict for segkit's ``VisionTransformer``; the classifier
    (``heads.*``) is dropped and keys that match no rule are kept as they are (loading refuses them).

    Example:
        >>> tv = torchvision.models.vit_b_16()
        >>> VisionTransformer(arch="vit_b_16").load_state_dict(convert_torchvision_vit(tv.state_dict()))
    """
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(VIT_CLASSIFIER_PREFIXES):
            continue
        new_key = next((pattern.sub(replacement, key) for pattern, replacement in _TORCHVISION_RULES
                        if pattern.match(key)), key)
        converted[new_key] = value
    return converted


def convert_timm_vit(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a timm ``vit_*`` state dict for segkit's ``VisionTransformer`` (``patch_embed.proj`` becomes
    ``patch_embed``); the classifier (``head``, ``fc_norm``, ``attn_pool``) is dropped."""
    return {re.sub(r"^patch_embed\.proj\.", "patch_embed.", key): value for key, value in state_dict.items()
            if not key.startswith(VIT_CLASSIFIER_PREFIXES)}


def convert_timm_sam_vit(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a timm ``VisionTransformerSAM`` state dict for segkit's ``VisionTransformer`` (``with_cls_token:
    false``): ``patch_embed.proj`` becomes ``patch_embed``, the ``[1, H, W, D]`` position embeddings are flattened
    row-major, and the ``neck`` and ``head`` are dropped.

    Example:
        >>> sam = timm.models.vision_transformer_sam.VisionTransformerSAM(img_size=128, window_size=4, use_rel_pos=True)
        >>> convert_timm_sam_vit(sam.state_dict())["pos_embed"].shape
        torch.Size([1, 64, 768])
    """
    converted = {}
    for key, value in state_dict.items():
        if key.startswith(("neck.", "head.")):
            continue
        if key == "pos_embed" and value.ndim == 4:
            value = value.reshape(value.shape[0], -1, value.shape[-1])
        converted[re.sub(r"^patch_embed\.proj\.", "patch_embed.", key)] = value
    return converted


def _window_layout(state_dict: Mapping[str, Tensor], depth: int, grid: int | None,
                   patch_size: int) -> dict[str, Any]:
    """``use_rel_pos`` and, where the tables tell them apart, ``window_size`` and ``global_attn_indexes`` (and
    ``rel_pos_img_size`` where it is not the position embeddings' size): windowed blocks hold square tables
    shorter than the global blocks'. Empty for weights without relative positions."""
    sides = []
    for block in range(depth):
        h, w = (state_dict.get(f"blocks.{block}.attn.rel_pos_{axis}") for axis in "hw")
        if h is None or w is None:
            return {}
        sides.append(((h.shape[0] + 1) // 2, (w.shape[0] + 1) // 2))
    layout: dict[str, Any] = {"use_rel_pos": True}
    distinct = sorted(set(sides))
    if len(distinct) == 2 and distinct[0][0] == distinct[0][1] and distinct[0] < distinct[1]:
        window, global_side = distinct[0][0], distinct[1]
        layout.update(window_size=window, global_attn_indexes=[i for i, s in enumerate(sides) if s == global_side])
        if grid is None or global_side != (grid, grid):
            layout["rel_pos_img_size"] = [global_side[0] * patch_size, global_side[1] * patch_size]
    return layout


def infer_vit_arch(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """The ``VisionTransformer`` options that a segkit-named state dict was made for.

    ``num_heads`` is in the weights only through relative position tables (one column per channel of a head);
    without them it is that of the published model of the same width (:data:`HEADS_BY_WIDTH`), else one head
    per 64 channels. ``img_size`` is the side of the square
    patch grid the position embeddings hold (``None`` where the grid is not square). Weights with relative
    position tables add ``use_rel_pos: true`` and, where the tables' lengths tell them (two lengths, the windows'
    the shorter), ``window_size``, ``global_attn_indexes`` and ``rel_pos_img_size`` (where it is not
    ``img_size``); without tables the window layout is not in the weights.

    Returns:
        ``{"patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "img_size", "with_cls_token",
        "qkv_bias"}``, ``"final_norm": False`` for weights without a final norm (a SAM ViT's) and the window
        layout above.

    Raises:
        CheckpointError: the keys are not those of a ViT (naming the key looked for).
    """
    required = ("patch_embed.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight")
    absent = [k for k in required if k not in state_dict]
    if absent:
        raise CheckpointError(f"the state dict is not a Vision Transformer: key '{absent[0]}' is missing (first keys: "
                              f"{', '.join(list(state_dict)[:3])}). segkit converts torchvision vit_* and timm "
                              f"vit_* models with a plain patch embedding.")
    patch = state_dict["patch_embed.weight"]
    embed_dim, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"^blocks\.(\d+)\.", k)))
    with_cls = "cls_token" in state_dict
    tokens = int(state_dict["pos_embed"].shape[1]) - int(with_cls)
    grid = round(tokens ** 0.5)
    square = grid * grid == tokens
    return {
        "patch_size": patch_size, "embed_dim": embed_dim, "depth": depth,
        "num_heads": embed_dim // int(table.shape[1]) if (table := state_dict.get("blocks.0.attn.rel_pos_h")) is not None
        else HEADS_BY_WIDTH.get(embed_dim, max(embed_dim // 64, 1)),
        "mlp_ratio": int(state_dict["blocks.0.mlp.fc1.weight"].shape[0]) / embed_dim,
        "img_size": grid * patch_size if square else None, "with_cls_token": with_cls,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict, **({} if "norm.weight" in state_dict else {"final_norm": False}),
        **_window_layout(state_dict, depth, grid if square else None, patch_size),
    }


class _ViTConverter(WeightConverter):
    def rename(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def convert(self, state_dict: Mapping[str, Tensor]) -> ConvertedWeights:
        state = self.rename(state_dict)
        arch = infer_vit_arch(state)
        if arch["img_size"] is None:
            raise CheckpointError(f"the ViT's position embeddings hold {int(state['pos_embed'].shape[1])} positions "
                                  f"(class token included), not a square grid; segkit converts square models.")
        options = ", ".join(f"{k}: {v}" for k, v in arch.items())
        return ConvertedWeights(state, "backbone", {"type": "VisionTransformer", "arch": None, **arch},
                                f"VisionTransformer backbone ({options})")


@CONVERTERS.register()
class TorchvisionViT(_ViTConverter):
    """torchvision ``vit_b_16`` / ``vit_b_32`` / ``vit_l_16`` / ``vit_l_32`` / ``vit_h_14`` state dicts to a
    ``VisionTransformer`` backbone (:func:`convert_torchvision_vit`)."""

    source = "torchvision"
    accepts = "torchvision vit_* models (classifier dropped)"

    def matches(self, state_dict: Mapping[str, Tensor]) -> bool:
        return is_torchvision_vit(state_dict)

    def rename(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return convert_torchvision_vit(state_dict)


@CONVERTERS.register()
class TimmViT(_ViTConverter):
    """timm ``vit_*`` state dicts (plain patch embedding, class token or none) to a ``VisionTransformer``
    backbone (:func:`convert_timm_vit`)."""

    source = "timm"
    accepts = "timm vit_* models with a plain patch embedding (classifier dropped)"

    def matches(self, state_dict: Mapping[str, Tensor]) -> bool:
        return is_timm_vit(state_dict)

    def rename(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return convert_timm_vit(state_dict)


@CONVERTERS.register()
class TimmSamViT(_ViTConverter):
    """timm ``samvit_*`` / ``VisionTransformerSAM`` state dicts (ViTDet's and SAM's image encoder: window attention,
    relative positions) to a ``VisionTransformer`` backbone without class token (:func:`convert_timm_sam_vit`)."""

    source = "timm"
    accepts = "timm samvit_* models (VisionTransformerSAM; neck and classifier dropped)"

    def matches(self, state_dict: Mapping[str, Tensor]) -> bool:
        return is_timm_sam_vit(state_dict)

    def rename(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return convert_timm_sam_vit(state_dict)
