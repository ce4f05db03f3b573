"""Box regression deltas ``(dx, dy, dw, dh)`` relative to reference boxes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["BoxCoder"]

_DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Encode target boxes as weighted deltas from reference boxes, and decode them back.

    ``dx = wx * (tx - rx) / rw``, ``dy = wy * (ty - ry) / rh``, ``dw = ww * log(tw / rw)``,
    ``dh = wh * log(th / rh)``, with centres ``(x, y)`` and sizes ``(w, h)``.

    Args:
        weights: ``(wx, wy, ww, wh)``; ``(1, 1, 1, 1)`` for the RPN, ``(10, 10, 5, 5)`` for R-CNN heads.
        scale_clamp: upper bound on decoded ``dw`` / ``dh`` (after dividing by the weights), so
            ``exp`` cannot overflow; ``log(1000 / 16)`` by default.

    Example:
        >>> coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
        >>> ref = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
        >>> coder.decode(coder.encode(ref + 1, ref), ref)
        tensor([[ 1.,  1., 11., 11.]])
    """

    def __init__(
        self, *, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), scale_clamp: float = _DEFAULT_SCALE_CLAMP
    ) -> None:
        if len(weights) != 4:
            raise ValueError(f"box coder weights must be four numbers (wx, wy, ww, wh), got {weights!r}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def encode(self, targets: Tensor, references: Tensor) -> Tensor:
        """Deltas that move each reference box onto its target box.

        Args:
            targets: Tensor[N, 4], xyxy boxes to reach.
            references: Tensor[N, 4], xyxy boxes to start from (anchors or proposals), positive size.

        Returns:
            Tensor[N, 4] of weighted deltas, the dtype of ``references``.
        """
        targets = targets.to(references.dtype)
        wx, wy, ww, wh = self.weights
        ref_w = references[:, 2] - references[:, 0]
        ref_h = references[:, 3] - references[:, 1]
        ref_x = references[:, 0] + 0.5 * ref_w
        ref_y = references[:, 1] + 0.5 * ref_h
        tgt_w = targets[:, 2] - targets[:, 0]
        tgt_h = targets[:, 3] - targets[:, 1]
        tgt_x = targets[:, 0] + 0.5 * tgt_w
        tgt_y = targets[:, 1] + 0.5 * tgt_h
        return torch.stack(
            (
                wx * (tgt_x - ref_x) / ref_w,
                wy * (tgt_y - ref_y) / ref_h,
                ww * torch.log(tgt_w / ref_w),
                wh * torch.log(tgt_h / ref_h),
            ),
            dim=1,
        )

    def decode(self, deltas: Tensor, references: Tensor) -> Tensor:
        """Apply deltas to reference boxes.

        Args:
            deltas: Tensor[N, 4 * K], K sets of weighted deltas per reference (one per class for
                class-specific regression).
            references: Tensor[N, 4], xyxy reference boxes.

        Returns:
            Tensor[N, 4 * K], xyxy boxes, the wider of the two dtypes (float32 reference boxes keep
            bfloat16 deltas of mixed precision from rounding the boxes to several pixels).
        """
        dtype = torch.promote_types(deltas.dtype, references.dtype)
        deltas, references = deltas.to(dtype), references.to(dtype)
        wx, wy, ww, wh = self.weights
        widths = (references[:, 2] - references[:, 0])[:, None]
        heights = (references[:, 3] - references[:, 1])[:, None]
        ctr_x = references[:, 0, None] + 0.5 * widths
        ctr_y = references[:, 1, None] + 0.5 * heights

        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)

        pred_x = dx * widths + ctr_x
        pred_y = dy * heights + ctr_y
        half_w = 0.5 * (torch.exp(dw) * widths)
        half_h = 0.5 * (torch.exp(dh) * heights)
        boxes = torch.stack((pred_x - half_w, pred_y - half_h, pred_x + half_w, pred_y + half_h), dim=2)
        return boxes.flatten(1)
