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


#: An image without ground truth, as a detection target.
NO_TARGETS = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


def convert_and_load(reference: torch.nn.Module, folder, overrides: dict | None = None) -> tuple[torch.nn.Module, object]:
    """segkit's model from ``segkit convert --from torchvision`` of ``reference``'s state dict, saved in
    ``folder`` and loaded with ``overrides`` (``{"min_size": 256}`` -> ``model.min_size=256``).

    Returns:
        ``(model in eval mode, path of the converted checkpoint)``.
    """
    import segkit
    from segkit.cli import main

    torch.save(reference.state_dict(), folder / "torchvision.pth")
    assert main(["convert", "--from", "torchvision", str(folder / "torchvision.pth"), str(folder / "segkit.pth")]) == 0
    ours = segkit.load_model(folder / "segkit.pth", overrides=[f"model.{k}={v}" for k, v in (overrides or {}).items()])
    return ours, folder / "segkit.pth"


def assert_same_detections(expected: list[dict], got: list[dict], *, score_atol: float) -> None:
    """Per image: the same number of detections (at least one), boxes within 1e-4 px, scores within
    ``score_atol``, equal labels."""
    assert len(expected) == len(got)
    for exp, out in zip(expected, got):
        assert 0 < len(out["boxes"]) == len(exp["boxes"])
        torch.testing.assert_close(out["boxes"], exp["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(out["scores"], exp["scores"], atol=score_atol, rtol=0)
        assert torch.equal(out["labels"], exp["labels"])


def one_stage_features(reference: torch.nn.Module, ours: torch.nn.Module, images: list[torch.Tensor]):
    """A torchvision one-stage detector's and segkit's preprocessed batches and feature maps of ``images``.

    Returns:
        ``(tv_images ImageList, tv_features list, batch Tensor, features dict)``.
    """
    with torch.no_grad():
        tv_images, _ = reference.transform(images)
        tv_features = list(reference.backbone(tv_images.tensors).values())
        batch, _, _ = ours.preprocess(images)
        features = ours.extract_features(batch)
    return tv_images, tv_features, batch, features


def overfit(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict], *, steps: int,
            lr: float) -> list[dict[str, float]]:
    """``steps`` AdamW steps of a model in training mode on one fixed batch.

    Returns:
        Per step, the model's losses as floats (each loss checked to be a scalar).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        losses = model(images, targets)
        assert all(v.dim() == 0 for v in losses.values()), {k: tuple(v.shape) for k, v in losses.items()}
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    return history
