"""EncNet's Encoding layer and Context Encoding Module (Zhang et al., CVPR 2018).

The Encoding layer treats a feature map as a bag of ``M = H * W`` descriptors and aggregates, for
each of ``K`` learned codewords, the residuals of the descriptors to that codeword, weighted by a
soft assignment. The Context Encoding Module wraps it into a global context vector of the scene.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.ops.norm import make_norm

__all__ = ["ContextEncoding", "Encoding"]

#: Norm names accepted over the codewords of the Context Encoding Module (``None`` too).
_CODEWORD_NORMS = ("BN", "SyncBN", "GN")


class Encoding(nn.Module):
    """Residual encoding of a feature map against ``num_codes`` learned codewords.

    With descriptors ``x_i`` (the ``M = H * W`` pixels of the input, ``D`` channels), codewords
    ``c_k`` and smoothing factors ``s_k``:

    - residuals ``r_ik = x_i - c_k``;
    - soft assignment ``a_ik = softmax_k(s_k * ||r_ik||^2)`` (the factors start negative, so near
      codewords get the larger weight);
    - encoding ``e_k = sum_i a_ik * r_ik``.

    The squared distances are computed as ``||x||^2 - 2 x.c + ||c||^2`` and the aggregation as
    ``sum_i a_ik x_i - (sum_i a_ik) c_k``, so the memory is O(N * M * K), never O(N * M * K * D).
    The computation runs in at least float32 (autocast off) because the expanded distance cancels
    badly in half precision.

    Initialisation as the paper's code: codewords uniform in ``±1 / sqrt(K * D)``, smoothing
    factors uniform in ``(-1, 0)``.

    Args:
        channels: descriptor dimension D (the input's channels).
        num_codes: number of codewords K.

    Raises:
        ValueError: ``channels`` or ``num_codes`` is below 1.

    Example:
        >>> enc = Encoding(channels=64, num_codes=32)
        >>> enc(torch.rand(2, 64, 16, 16)).shape
        torch.Size([2, 32, 64])
    """

    def __init__(self, *, channels: int, num_codes: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"Encoding channels must be >= 1, got {channels}")
        if num_codes < 1:
            raise ValueError(f"Encoding num_codes must be >= 1, got {num_codes}")
        self.channels = int(channels)
        self.num_codes = int(num_codes)
        self.codewords = nn.Parameter(torch.empty(self.num_codes, self.channels))
        self.scale = nn.Parameter(torch.empty(self.num_codes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw codewords uniform in ``±1 / sqrt(K * D)`` and smoothing factors uniform in (-1, 0)."""
        bound = 1.0 / math.sqrt(self.num_codes * self.channels)
        nn.init.uniform_(self.codewords, -bound, bound)
        nn.init.uniform_(self.scale, -1.0, 0.0)

    def forward(self, x: Tensor) -> Tensor:
        """Encode a batch of feature maps.

        Args:
            x: Tensor[N, D, H, W] (any trailing spatial dims), floating point.

        Returns:
            Tensor[N, K, D]: the aggregated residuals ``e_k`` of each image, in the promotion of the
            input's dtype and float32.

        Raises:
            ValueError: ``x`` has not D channels in dim 1.
        """
        if x.dim() < 3 or x.shape[1] != self.channels:
            raise ValueError(
                f"Encoding expects Tensor[N, {self.channels}, H, W], got shape {tuple(x.shape)}"
            )
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)
            desc = x.flatten(2).transpose(1, 2).to(dtype)  # [N, M, D]
            codes = self.codewords.to(dtype)  # [K, D]
            sq_dist = desc.pow(2).sum(-1, keepdim=True) - 2.0 * (desc @ codes.t()) + codes.pow(2).sum(-1)
            # The expansion can dip slightly below zero by rounding; a distance cannot.
            assign = F.softmax(sq_dist.clamp_min(0.0) * self.scale.to(dtype), dim=-1)  # [N, M, K]
            return assign.transpose(1, 2) @ desc - assign.sum(1).unsqueeze(-1) * codes


def _codeword_norm(norm: str | None, num_codes: int) -> nn.Module:
    """A norm over the K codewords of Tensor[N, K, D] (the codewords are the channels)."""
    if norm is None:
        return nn.Identity()
    if norm == "BN":
        return nn.BatchNorm1d(num_codes)
    if norm == "SyncBN":
        return nn.SyncBatchNorm(num_codes)
    if norm == "GN":
        return nn.GroupNorm(math.gcd(32, num_codes), num_codes)
    raise ValueError(
        f"norm {norm!r} cannot normalise the codewords of the Context Encoding Module; "
        f"choose null or one of {', '.join(_CODEWORD_NORMS)}"
    )


class ContextEncoding(nn.Module):
    """The Context Encoding Module: a global context vector of a feature map.

    Order as the paper's code: 1x1 conv (``in_channels`` -> ``channels``) + norm + ReLU, then
    :class:`Encoding` with ``num_codes`` codewords, a norm over the codewords (BatchNorm1d with K
    channels for ``"BN"``) + ReLU, and the mean over the K codewords.

    Args:
        in_channels: channels of the input map.
        channels: descriptor dimension D of the encoding (default: ``in_channels``).
        num_codes: number of codewords K.
        norm: ``None``, ``"BN"``, ``"SyncBN"`` or ``"GN"`` after the conv and over the codewords
            (the conv then has no bias).

    Raises:
        ValueError: a size below 1 or an unsupported norm.

    Example:
        >>> module = ContextEncoding(in_channels=128, channels=64, num_codes=32)
        >>> module(torch.rand(2, 128, 16, 16)).shape
        torch.Size([2, 64])
    """

    def __init__(
        self,
        *,
        in_channels: int,
        channels: int | None = None,
        num_codes: int = 32,
        norm: str | None = "BN",
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"ContextEncoding in_channels must be >= 1, got {in_channels}")
        channels = in_channels if channels is None else channels
        self.encoding = Encoding(channels=channels, num_codes=num_codes)  # validates the sizes
        self.code_norm = _codeword_norm(norm, num_codes)
        self.conv = nn.Conv2d(in_channels, channels, 1, bias=norm is None)
        self.norm = nn.Identity() if norm is None else make_norm(norm, channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    @property
    def channels(self) -> int:
        """Length D of the context vector."""
        return self.encoding.channels

    def forward(self, x: Tensor) -> Tensor:
        """Context vector of each image.

        Args:
            x: Tensor[N, in_channels, H, W].

        Returns:
            Tensor[N, D]: the mean over the codewords of the normalised, rectified encodings (at
            least float32).
        """
        encoded = self.encoding(F.relu(self.norm(self.conv(x))))  # [N, K, D]
        return F.relu(self.code_norm(encoded)).mean(dim=1)
