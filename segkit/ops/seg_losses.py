"""Losses of semantic segmentation: (class-weighted) cross-entropy and Dice, and the ``loss:`` option
of the decode heads that combines them.

A decode head's ``loss:`` is one term or a list of terms::

    loss: {type: CrossEntropy, class_weight: [0.2, 1.5, 1.5, 2.0]}
    loss: [{type: CrossEntropy, class_weight: median_frequency}, {type: Dice, weight: 0.5}]

``class_weight: median_frequency`` is replaced, before the model is built for training, by the weights
:func:`segkit.data.class_weights.median_frequency_weights` computes from the training labels (a model
built with it for inference needs no numbers; computing the loss without them is an error).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.errors import did_you_mean

__all__ = ["CrossEntropyTerm", "DiceTerm", "LOSS_TERMS", "SegLoss", "dice_loss", "weighted_cross_entropy"]

MEDIAN_FREQUENCY = "median_frequency"


def weighted_cross_entropy(logits: Tensor, labels: Tensor, *, ignore_index: int,
                           class_weight: Tensor | None = None) -> Tensor:
    """Cross-entropy of Tensor[N, K, H, W] logits against Tensor[N, H, W] labels, averaged over the pixels
    that are not ``ignore_index``; with ``class_weight`` (Tensor[K]) each pixel counts with its class's
    weight, in the sum and in the count (``F.cross_entropy(weight=...)``'s mean). No counted pixel gives
    0, still in the graph."""
    labels = labels.long()
    total = F.cross_entropy(logits, labels, weight=class_weight, ignore_index=ignore_index, reduction="sum")
    valid = labels != ignore_index
    if class_weight is None:
        count = valid.sum()
    else:
        count = class_weight.to(logits.dtype)[labels.clamp(0, class_weight.numel() - 1)][valid].sum()
    return total / count.clamp_min(torch.finfo(logits.dtype).tiny if class_weight is not None else 1)


def dice_loss(logits: Tensor, labels: Tensor, *, ignore_index: int, smooth: float = 1.0, exponent: int = 2,
              class_weight: Tensor | None = None) -> Tensor:
    """Soft Dice loss (Milletari et al. 2016, V-Net) of Tensor[N, K, H, W] logits against Tensor[N, H, W] labels.

    With ``p`` the softmax probabilities and ``t`` the one-hot labels over the pixels that are not
    ``ignore_index`` (all images together), class k scores
    ``D_k = (2 * sum(p_k * t_k) + smooth) / (sum(p_k ** exponent) + sum(t_k ** exponent) + smooth)``
    and the loss is ``1 - D_k`` averaged over the classes (weighted by ``class_weight`` when given).
    A class absent from the labels and not predicted scores ``D_k = 1`` thanks to ``smooth``.
    """
    probs = logits.float().softmax(dim=1)
    num_classes = probs.shape[1]
    labels = labels.long()
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    onehot = F.one_hot(torch.where(valid, labels, 0), num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    mask = valid.unsqueeze(1).to(probs.dtype)
    probs, onehot = probs * mask, onehot * mask
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)
    denominator = probs.pow(exponent).sum(dims) + onehot.pow(exponent).sum(dims)
    per_class = 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)
    if class_weight is None:
        return per_class.mean()
    weight = class_weight.to(per_class.dtype)
    return (per_class * weight).sum() / weight.sum()


class _Term(nn.Module):
    """One weighted term of a :class:`SegLoss`; ``name`` is its key in the head's losses."""

    name: str
    options: tuple[str, ...] = ("type", "weight", "class_weight", "name")

    def __init__(self, *, num_classes: int, ignore_index: int, weight: float = 1.0,
                 class_weight: Sequence[float] | None = None, name: str | None = None) -> None:
        super().__init__()
        if not weight >= 0:
            raise ValueError(f"weight must be >= 0, got {weight!r}")
        self.weight = float(weight)
        self.ignore_index = int(ignore_index)
        if name is not None:
            if not str(name).startswith("loss_"):
                raise ValueError(f"name must start with 'loss_' (the trainer sums those keys), got {name!r}")
            self.name = str(name)
        # median_frequency is replaced by numbers when training starts (segkit.data.class_weights); a model
        # built from the config for inference never computes the loss, so it needs no numbers.
        self.unresolved = isinstance(class_weight, str) and class_weight == MEDIAN_FREQUENCY
        if self.unresolved:
            class_weight = None
        elif isinstance(class_weight, str):
            raise ValueError(f"class_weight must be a list of {num_classes} numbers or '{MEDIAN_FREQUENCY}', got "
                             f"{class_weight!r}.{did_you_mean(class_weight, [MEDIAN_FREQUENCY])}")
        if class_weight is None:
            self.class_weight: Tensor | None = None
        else:
            values = list(class_weight)
            if len(values) != num_classes or not all(isinstance(v, (int, float)) and v >= 0 for v in values):
                raise ValueError(f"class_weight must be a list of {num_classes} numbers >= 0 (one per class), "
                                 f"got {class_weight!r}")
            if sum(values) <= 0:
                raise ValueError("class_weight must give some class a weight > 0")
            self.register_buffer("class_weight", torch.tensor(values, dtype=torch.float32), persistent=False)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def check_resolved(self) -> None:
        if self.unresolved:
            raise ValueError(
                f"class_weight: {MEDIAN_FREQUENCY} of the {self.name} term was not computed: `segkit train` computes "
                f"it from the training labels; in code, build the model from "
                f"segkit.data.class_weights.resolve_class_weights(cfg, train_dataset), or give the numbers "
                f"(`segkit data check CONFIG --class-weights` prints them)")


class CrossEntropyTerm(_Term):
    """``type: CrossEntropy``: :func:`weighted_cross_entropy`; key ``loss_seg``."""

    name = "loss_seg"

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return weighted_cross_entropy(logits, labels, ignore_index=self.ignore_index, class_weight=self.class_weight)


class DiceTerm(_Term):
    """``type: Dice``: :func:`dice_loss` with ``smooth`` (> 0) and ``exponent`` (1 or 2); key ``loss_dice``."""

    name = "loss_dice"
    options = _Term.options + ("smooth", "exponent")

    def __init__(self, *, smooth: float = 1.0, exponent: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not smooth > 0:
            raise ValueError(f"smooth must be > 0 (it keeps an absent class's score defined), got {smooth!r}")
        if exponent not in (1, 2):
            raise ValueError(f"exponent must be 1 or 2, got {exponent!r}")
        self.smooth = float(smooth)
        self.exponent = int(exponent)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return dice_loss(logits, labels, ignore_index=self.ignore_index, smooth=self.smooth,
                         exponent=self.exponent, class_weight=self.class_weight)


LOSS_TERMS: dict[str, type[_Term]] = {"CrossEntropy": CrossEntropyTerm, "Dice": DiceTerm}


class SegLoss(nn.Module):
    """The terms a decode head's ``loss:`` option names, each computed on logits at the label map's size.

    Args:
        spec: ``None`` (cross-entropy), one term's mapping, or a list of them; each has a ``type``
            (``CrossEntropy`` or ``Dice``), an optional ``weight`` (its factor), ``class_weight`` (one
            number per class, or ``median_frequency``) and ``name`` (its key, ``loss_seg`` / ``loss_dice`` by default).
        num_classes: K.
        ignore_index: the label of pixels that do not count.
        owner: the head's name, for error messages.

    Raises:
        ValueError: an unknown type or option (with a suggestion), a bad value, or two terms with one key.
    """

    def __init__(self, spec: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None, *, num_classes: int,
                 ignore_index: int, owner: str) -> None:
        super().__init__()
        items = [{"type": "CrossEntropy"}] if spec is None else [spec] if isinstance(spec, Mapping) else list(spec)
        if isinstance(spec, (str, bytes)) or not items:
            raise ValueError(f"{owner} loss must be a mapping with a type ({', '.join(LOSS_TERMS)}) or a non-empty "
                             f"list of them, got {spec!r}")
        terms = []
        for i, item in enumerate(items):
            where = f"{owner} loss" + (f"[{i}]" if not isinstance(spec, Mapping) and spec is not None else "")
            if not isinstance(item, Mapping) or "type" not in item:
                raise ValueError(f"{where} must be a mapping with a type ({', '.join(LOSS_TERMS)}), got {item!r}")
            kind = LOSS_TERMS.get(str(item["type"]))
            if kind is None:
                raise ValueError(f"{where} type {item['type']!r} is not a segmentation loss; the types are "
                                 f"{', '.join(LOSS_TERMS)}.{did_you_mean(item['type'], LOSS_TERMS)}")
            unknown = [key for key in item if key not in kind.options]
            if unknown:
                raise ValueError(f"{where} has no option {unknown[0]!r} ({item['type']} takes "
                                 f"{', '.join(kind.options[1:])}).{did_you_mean(unknown[0], kind.options)}")
            kwargs = {k: v for k, v in item.items() if k != "type"}
            try:
                terms.append(kind(num_classes=num_classes, ignore_index=ignore_index, **kwargs))
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from exc
        names = [term.name for term in terms]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"{owner} loss has several terms named {repeated[0]!r}; give each a distinct name")
        self.terms = nn.ModuleList(terms)

    def forward(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """``{name: weight * term}`` of Tensor[N, K, H, W] logits against Tensor[N, H, W] labels.

        Raises:
            ValueError: a ``class_weight: median_frequency`` that was never replaced by numbers.
        """
        for term in self.terms:
            term.check_resolved()
        return {term.name: term(logits, labels) * term.weight for term in self.terms}
