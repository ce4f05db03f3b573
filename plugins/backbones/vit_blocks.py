"""The parts of :class:`~segkit_plugins.backbones.vit.VisionTransformer`: the encoder block, with global or windowed
multi-head self-attention, optionally with decomposed relative position biases (ViTDet, Li et al. 2022, after
MViTv2), and the resizing of position embeddings and relative position tables to other grids.

Tokens are Tensor[N, L, dim]; where the block needs their layout, ``grid`` is the ``(rows, columns)`` patch grid
they fill in row-major order (``L = rows * columns``, no class token).

**Window attention.** A block with ``window_size > 0`` zero-pads its normalised tokens at the bottom and right to
multiples of the window, attends within each ``window_size x window_size`` window, and cuts the padding off
again. The padded tokens are keys of the windows they fall in, unmasked, as ViTDet and SAM compute it.

**Decomposed relative positions.** With ``rel_pos_size = (h, w)`` the attention learns ``rel_pos_h``
Tensor[2h - 1, head_dim] and ``rel_pos_w`` Tensor[2w - 1, head_dim], one row per offset between two rows (columns)
of the grid. The logit of query ``i`` and key ``j`` gains ``q_i . R_h[row_i - row_j] + q_i . R_w[col_i - col_j]``
(``q`` before the ``1 / sqrt(head_dim)`` scaling); on a grid of another size the tables are first interpolated
linearly (``align_corners=False``) to the offsets it has. The bias goes to ``F.scaled_dot_product_attention`` as
its ``attn_mask``; a block without relative positions calls it without one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

__all__ = ["EncoderBlock", "Attention", "resize_pos_embed", "resize_rel_pos", "rel_pos_bias", "window_partition", "window_unpartition"]

NORM_EPS = 1e-6  # torchvision's, timm's and ViTDet's ViTs


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


def resize_rel_pos(table: Tensor, length: int) -> Tensor:
    """A relative position table Tensor[L, C] interpolated linearly (``align_corners=False``) to Tensor[length, C]
    (the table itself when ``L == length``)."""
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.t()[None].float(), size=length, mode="linear", align_corners=False)
    return resized[0].t().to(table.dtype)


def _offsets(table: Tensor, size: int) -> Tensor:
    """Tensor[size, size, C]: at ``[i, j]`` the embedding of the offset ``i - j`` between two of ``size`` positions."""
    table = resize_rel_pos(table, 2 * size - 1)
    positions = torch.arange(size, device=table.device)
    return table[positions[:, None] - positions[None, :] + size - 1]


def rel_pos_bias(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, grid: Sequence[int]) -> Tensor:
    """The decomposed relative position bias of queries Tensor[B, heads, h * w, C] on an ``(h, w)`` grid attending
    to the same grid: Tensor[B, heads, h * w, h * w], ``q . R_h[row offset] + q . R_w[column offset]``."""
    batch, heads, tokens, channels = q.shape
    h, w = (int(s) for s in grid)
    grid_q = q.reshape(batch, heads, h, w, channels)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, _offsets(rel_pos_h, h).to(q.dtype))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, _offsets(rel_pos_w, w).to(q.dtype))
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(batch, heads, tokens, tokens)


def window_partition(x: Tensor, grid: Sequence[int], window: int) -> tuple[Tensor, tuple[int, int]]:
    """Tokens Tensor[N, h * w, C] of an ``(h, w)`` grid cut into windows Tensor[N * windows, window * window, C]
    (row-major windows, each row-major), the grid zero-padded at the bottom and right to multiples of ``window``;
    and the padded grid ``(hp, wp)``."""
    batch, _, channels = x.shape
    h, w = grid
    pad_h, pad_w = -h % window, -w % window
    x = x.reshape(batch, h, w, channels)
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(batch, hp // window, window, wp // window, window, channels).transpose(2, 3)
    return x.reshape(-1, window * window, channels), (hp, wp)


def window_unpartition(windows: Tensor, grid: Sequence[int], padded: Sequence[int], window: int) -> Tensor:
    """The inverse of :func:`window_partition`: windows back to tokens Tensor[N, h * w, C], padding removed."""
    (h, w), (hp, wp) = grid, padded
    channels = windows.shape[-1]
    x = windows.reshape(-1, hp // window, wp // window, window, window, channels).transpose(2, 3)
    return x.reshape(-1, hp, wp, channels)[:, :h, :w].reshape(-1, h * w, channels)


class Attention(nn.Module):
    """Multi-head self-attention of tokens Tensor[N, L, dim]; with ``rel_pos_size = (h, w)`` it learns decomposed
    relative position tables for an ``h x w`` grid (zero at first, as ViTDet) and needs the tokens' grid."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, rel_pos_size: Sequence[int] | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = self.rel_pos_w = None
        if rel_pos_size is not None:
            head_dim = dim // num_heads
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * int(rel_pos_size[0]) - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * int(rel_pos_size[1]) - 1, head_dim))

    def forward(self, x: Tensor, grid: Sequence[int] | None = None) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.rel_pos_h is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            if grid is None:
                raise ValueError("attention with relative positions needs the tokens' grid")
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, grid))
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    """``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` on tokens Tensor[N, L, dim]; each branch dropped per
    sample with probability ``drop_path`` in training (stochastic depth).

    Args:
        window_size: ``0`` attends over all tokens; ``k > 0`` within ``k x k`` windows of the grid.
        rel_pos_size: the grid ``(h, w)`` the relative position tables are made for (``(k, k)`` in a windowed
            block; ``None``: no relative positions).
    """

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, window_size: int = 0, rel_pos_size: Sequence[int] | None = None) -> None:
        super().__init__()
        self.window_size = int(window_size)
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, rel_pos_size)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = _MLP(dim, int(round(dim * mlp_ratio)))
        self.drop_path = StochasticDepth(drop_path, mode="row") if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, grid: Sequence[int] | None = None) -> Tensor:
        """Tokens Tensor[N, L, dim] to Tensor[N, L, dim]; ``grid`` (their ``(rows, columns)``) is needed by windows
        and relative positions."""
        if self.window_size > 0:
            if grid is None:
                raise ValueError("window attention needs the tokens' grid")
            windows, padded = window_partition(self.norm1(x), grid, self.window_size)
            windows = self.attn(windows, (self.window_size, self.window_size))
            x = x + self.drop_path(window_unpartition(windows, grid, padded, self.window_size))
        else:
            x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))
