"""Loading torchvision's, timm's (plain and SAM) or segkit's weights, from a local file or by name
(``timm://vit_base_patch16_224.mae``), into a :class:`~segkit_plugins.backbones.vit.VisionTransformer`, fitted to
its options: the class token and final norm dropped where the model has none, position embeddings and global
blocks' relative position tables interpolated to its grids, relative position tables zero where the weights
have none (ViTDet starts MAE's ViT so)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from segkit.checkpoint import (BACKBONE_INFO_KEY, CONFIG_KEY, CheckpointError, extract_state_dict,
                               load_state_dict_checked, read_checkpoint)
from segkit.weight_names import is_weight_name
from segkit.weight_sources import read_weights_file
from segkit.weights import named_backbone_weights
from segkit_plugins.backbones.vit_blocks import resize_pos_embed, resize_rel_pos
from segkit_plugins.backbones.vit_weights import (convert_timm_sam_vit, convert_timm_vit, convert_torchvision_vit,
                                                  infer_vit_arch, is_timm_sam_vit, is_timm_vit, is_torchvision_vit)

if TYPE_CHECKING:
    from segkit_plugins.backbones.vit import VisionTransformer

__all__ = ["load_pretrained", "read_vit_state", "fit_vit_state"]

_REL_POS = ".attn.rel_pos_"


def load_pretrained(model: VisionTransformer, path: str) -> None:
    """Load a file or a weight name into ``model`` (see ``pretrained`` of the ``VisionTransformer``).

    Raises:
        CheckpointError: the file or name cannot be read, holds another network or another ViT (naming
            the options that differ), or has unknown or missing keys (naming the file and the keys).
    """
    if is_weight_name(path) and model.stem != "patch":
        raise CheckpointError(f"pretrained '{path}': published ViT weights are for the patch stem; set stem: "
                              f"patch, or give a file of a {model.stem}-stem ViT that segkit trained")
    if is_weight_name(path):
        converted = named_backbone_weights(path)
        state, info = converted.state_dict, converted.config
    else:
        state, info = read_vit_state(path)
    if isinstance(info, Mapping) and info.get("type") not in (None, "VisionTransformer"):
        raise CheckpointError(f"pretrained weights '{path}' are a {info['type']} backbone's, not a "
                              f"VisionTransformer's; choose ViT weights.")
    source = f"pretrained weights '{path}'"
    arch = infer_vit_arch(state) if "patch_embed.weight" in state else {}  # a conv stem: the load checks
    differ = [f"{k}={v!r} in the weights but {model.arch[k]!r} in the model"
              for k, v in arch.items() if k in model.arch and v != model.arch[k]]
    if differ:
        raise CheckpointError(f"{source} were made for another ViT: " + "; ".join(differ) + ". Set these backbone "
                              "options (or arch) to the weights' values, or choose weights made for this backbone.")
    state = fit_vit_state(model, state, source)
    load_state_dict_checked(model, state, source=source, strict=True, hint="check the ViT's options")


def fit_vit_state(model: VisionTransformer, state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """``state`` (segkit's names) adapted to ``model``: the class token dropped where the model has none, the final
    norm dropped without ``final_norm``, the position embeddings interpolated to ``img_size``'s grid, the relative
    position tables fitted (zero where the weights have none, a global block's interpolated).

    Raises:
        CheckpointError: naming ``source``, for weights without a class token that the model has, and for
            unknown or missing keys.
    """
    state = dict(state)
    has_cls = "cls_token" in state
    if has_cls and not model.with_cls_token:
        del state["cls_token"]
        state["pos_embed"] = state["pos_embed"][:, 1:]
    elif model.with_cls_token and not has_cls:
        raise CheckpointError(f"{source} have no class token; set the backbone's with_cls_token: false.")
    if not model.final_norm:
        for key in ("norm.weight", "norm.bias"):
            state.pop(key, None)
    prefix = int(model.with_cls_token)
    pos = state["pos_embed"]
    side = round((pos.shape[1] - prefix) ** 0.5)
    if pos.shape[1] - prefix != model.grid[0] * model.grid[1] and side * side == pos.shape[1] - prefix:
        patches = resize_pos_embed(pos[:, prefix:], (side, side), model.grid)
        state["pos_embed"] = torch.cat([pos[:, :prefix], patches], dim=1)
        warnings.warn(f"{source}: position embeddings of a {side}x{side} grid interpolated to the backbone's "
                      f"{model.grid[0]}x{model.grid[1]} (img_size); set img_size: {side * model.patch_size} to keep "
                      f"them as trained.", stacklevel=5)
    state = _fit_rel_pos(model, state, source)
    own = model.state_dict()
    unknown, missing = [k for k in state if k not in own], [k for k in own if k not in state]
    if unknown or missing:
        problems = [f"{len(keys)} {kind} key(s) {_few(keys)}" for kind, keys in
                    (("unknown", unknown), ("missing", missing)) if keys]
        raise CheckpointError(f"{source} do not fit the VisionTransformer: " + " and ".join(problems) + ". It "
                              "reads torchvision's and timm's plain ViTs, timm's SAM ViTs (no layer scale, register "
                              "tokens, conv stem or q/k norm) and segkit's.")
    return state


def _fit_rel_pos(model: VisionTransformer, state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Relative position tables fitted to ``model``: all zero where the weights have none at all (MAE's and
    ImageNet's ViTs; ViTDet starts them at zero), a global block's interpolated linearly to its grid's length.
    Weights with some tables but not all keep the others missing (an error)."""
    own = {k: v for k, v in model.state_dict().items() if _REL_POS in k}
    if own and not any(_REL_POS in k for k in state):
        return {**state, **{k: torch.zeros_like(v) for k, v in own.items()}}
    resized = []
    for key, table in own.items():
        if key not in state or state[key].shape == table.shape:
            continue
        window = model.windows[int(key.split(".")[1])]
        if window or state[key].shape[1:] != table.shape[1:]:
            needs = f"{window}x{window} windows need" if window else "table holds"
            raise CheckpointError(f"{source}: {key} holds {tuple(state[key].shape)} relative positions, but the "
                                  f"block's {needs} {tuple(table.shape)}; set the backbone's window_size, "
                                  f"global_attn_indexes and num_heads to the weights' values.")
        state[key] = resize_rel_pos(state[key], table.shape[0])
        resized.append(key)
    if resized:
        grid = model.rel_pos_grid
        warnings.warn(f"{source}: {len(resized)} relative position table(s) of global blocks ({_few(resized, 2)}) "
                      f"interpolated to the backbone's {grid[0]}x{grid[1]} grid (rel_pos_img_size); set "
                      f"rel_pos_img_size to the size the weights were made for to keep them as trained.", stacklevel=5)
    return state


def read_vit_state(path: str) -> tuple[dict[str, Tensor], Any]:
    """The segkit-named state dict in the file ``path`` and the backbone config it records (or ``None``).

    Raises:
        CheckpointError: the file cannot be read or holds no Vision Transformer.
    """
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
    if is_timm_sam_vit(state):
        return convert_timm_sam_vit(state), info
    if is_timm_vit(state):
        return convert_timm_vit(state), info
    if not any(key.startswith("patch_embed.") for key in state):
        raise CheckpointError(f"pretrained weights '{path}' are not a Vision Transformer's (first keys: "
                              f"{', '.join(list(state)[:3])}); the VisionTransformer reads torchvision's vit_*, timm's "
                              f"vit_* and samvit_* state dicts and segkit's.")
    return state, info


def _few(keys: list[str], n: int = 5) -> str:
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"
