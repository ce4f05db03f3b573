"""Class activation maps of a backbone stage for detectors and segmentors (`segkit cam`).

A map shows which positions of one backbone output a prediction's score rests on. Two methods:

- ``"hirescam"`` (default; Draelos & Carin, 2020): the element-wise product of the activations
  ``A`` and the gradient of the score with respect to them, summed over the channels and clipped
  at zero, ``relu(sum_c dS/dA_c * A_c)``. It stays on the object a detection was made from;
- ``"gradcam"`` (Selvaraju et al., ICCV 2017): every channel weighted by its mean gradient,
  ``relu(sum_c mean_hw(dS/dA_c) * A_c)``, which spreads over the image for detectors (the weights
  are global, the activations are everywhere).

The score is, for a detector, the class logit (before the softmax, so that a confident detection
still has a gradient) of one detection, the best one by default, found through the box
classifier's output; for a segmentor, the mean probability of one class over the pixels predicted
as that class (by default the class other than 0 that covers the most pixels). The map is cut to
the image's part of the padded batch, resized to the image and scaled to ``[0, 1]``. The model
runs its own inference with gradients on; a segmentor infers on the whole image at one scale for
this (its ``test_cfg`` is set aside), so that one backbone pass makes the prediction.

Example:
    >>> model = segkit.load_model("work_dirs/quickstart/checkpoints/best.ckpt")
    >>> cam = class_activation_map(model, image)  # image: float Tensor[3, H, W] in [0, 1]
    >>> cam.heatmap.shape, cam.layer, cam.label  # (H, W) in [0, 1], 'c3', the detection's label
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkit.models.base import describe as describe_model

__all__ = ["METHODS", "CamResult", "UnknownLayerError", "class_activation_map", "default_layer", "overlay_heatmap"]

METHODS = ("hirescam", "gradcam")


class UnknownLayerError(ValueError):
    """The layer asked for is not one of the feature maps the model declares."""


@dataclass
class CamResult:
    """A class activation map and what it explains.

    Attributes:
        heatmap: float32 Tensor[H, W] in [0, 1], at the input image's size.
        target: the detection index, best first (detectors) or the class index (segmentors).
        score: the detection's score or the class's mean probability over its pixels.
        label: the detection's label (1..K) for detectors; the class index for segmentors.
        box: the detection's box (xyxy input pixels) for detectors, else ``None``.
        layer: the backbone output the activations come from.
    """

    heatmap: Tensor
    target: int
    score: float
    label: int
    box: list[float] | None
    layer: str


def default_layer(model: nn.Module) -> str:
    """The feature map explained by default, as the model declares it (a detector's backbone output
    at stride 8, where small objects are pooled from; else the last one)."""
    describe_model(model)  # a model without the contract is refused here
    return model.default_cam_layer()


def class_activation_map(model: nn.Module, image: Tensor, *, layer: str | None = None, target: int | None = None,
                         method: str = "hirescam") -> CamResult:
    """The class activation map of ``image`` (float Tensor[3, H, W] in [0, 1]) at the feature map ``layer``.

    Args:
        model: a segkit model (a :class:`~segkit.models.SegkitModel`) in eval mode; weights are not changed.
        image: the input image.
        layer: a feature map the model declares (``"c3"``...); default :func:`default_layer`.
        target: detectors: the index of the detection, best first (default 0); segmentors: the class
            index (default the most frequent predicted class other than 0).
        method: ``"hirescam"`` or ``"gradcam"`` (see the module docstring).

    Returns:
        A :class:`CamResult`.

    Raises:
        UnknownLayerError: a layer the model does not declare.
        ValueError: an unknown method, a detector that detects nothing in the image, or a target out of range.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    info = describe_model(model)
    name = layer or model.default_cam_layer()
    if name not in info.feature_strides:
        raise UnknownLayerError(f"the model has no feature map '{name}'; its feature maps are "
                                f"{', '.join(info.feature_strides)}")
    captured: dict[str, Any] = {}

    def keep_activations(module: nn.Module, inputs: Any, output: Any) -> None:
        if "act" in captured:
            raise ValueError("the model's features were computed more than once for one image; a class activation "
                             "map needs one pass")
        captured["act"] = output[name]
        output[name].retain_grad()

    image = image.detach().float().to(next(model.parameters()).device)
    hook = model.feature_maps().register_forward_hook(keep_activations)
    try:
        with torch.enable_grad(), model.single_pass(), model.recording() as recorded:
            output = model([image])[0]
            objective, result = model.explain_objective(output, target, recorded)
            model.zero_grad(set_to_none=True)
            objective.backward()
    finally:
        hook.remove()
    act = captured["act"]
    grad = act.grad if method == "hirescam" else act.grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((grad * act).sum(1, keepdim=True)).detach()
    model.zero_grad(set_to_none=True)
    return CamResult(heatmap=_to_image(model, cam, image), layer=name, **result)


def _to_image(model: nn.Module, cam: Tensor, image: Tensor) -> Tensor:
    """The map of the padded batch Tensor[1, 1, h, w] cut to the image's part and resized to it."""
    with torch.no_grad():
        batch, sizes = model.batch_images([image])
    size = sizes[0]
    full = F.interpolate(cam, size=tuple(batch.shape[-2:]), mode="bilinear", align_corners=False)
    part = full[..., : size[0], : size[1]]
    heatmap = F.interpolate(part, size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
    peak = heatmap.max()
    return (heatmap / peak if peak > 0 else heatmap).cpu()


def overlay_heatmap(image: np.ndarray, heatmap: Tensor | np.ndarray, *, alpha: float = 0.5) -> np.ndarray:
    """``image`` (uint8 RGB [H, W, 3]) with ``heatmap`` ([H, W] in [0, 1]) blended over it in the
    blue-to-red "jet" colour map; uint8 RGB [H, W, 3]."""
    from matplotlib import colormaps

    values = np.asarray(heatmap.numpy() if isinstance(heatmap, Tensor) else heatmap, dtype=np.float32)
    colours = colormaps["jet"](np.clip(values, 0.0, 1.0))[..., :3] * 255.0
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)
