"""Reference computations shared by tests."""

from __future__ import annotations

import torch


def torchvision_stages(net: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of layer1..layer4 of a torchvision ResNet/ResNeXt (the c2..c5 maps)."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    outs = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(net, name)(x)
        outs.append(x)
    return outs


def torchvision_head_losses(reference: torch.nn.Module, ours: torch.nn.Module, images: list[torch.Tensor],
                            targets: list[dict[str, torch.Tensor]], seed: int = 1) -> tuple[dict, dict]:
    """Training losses of a torchvision R-CNN and of segkit's detector on the same batch.

    The backbones run in eval mode (so BatchNorm layers agree) and the heads in train mode, each
    side starting from the same random seed, so proposal and RoI sampling draw the same numbers.

    Returns:
        ``(torchvision_losses, segkit_losses)`` under each library's own names.
    """
    with torch.no_grad():
        tv_images, tv_targets = reference.transform(images, targets)
        tv_features = reference.backbone(tv_images.tensors)
        batch, sizes, our_targets = ours.preprocess(images, targets)
        features = ours.extract_features(batch)
    heads = (reference.rpn, reference.roi_heads, ours.rpn, ours.roi_heads)
    try:
        for head in heads:
            head.train()
        with torch.no_grad():
            torch.manual_seed(seed)
            tv_proposals, tv_rpn = reference.rpn(tv_images, tv_features, tv_targets)
            _, tv_roi = reference.roi_heads(tv_features, tv_proposals, tv_images.image_sizes, tv_targets)
            torch.manual_seed(seed)
            proposals, rpn = ours.rpn(features, sizes, tuple(batch.shape[-2:]), our_targets)
            _, roi = ours.roi_heads(features, proposals, sizes, our_targets)
    finally:
        for head in heads:
            head.eval()
    return {**tv_rpn, **tv_roi}, {**rpn, **roi}
