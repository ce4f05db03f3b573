"""segkit.ops.roi_align: torchvision's values and gradients, computed as one gather on the CPU."""

import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from segkit.ops.roi_align import roi_align, roi_align_levels


def _rois(n_images: int, count: int, size: float, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(count, 2, generator=gen) * size * 1.2 - size * 0.1  # some start off the map
    wh = torch.rand(count, 2, generator=gen) * size * 0.6
    wh[:3] = torch.tensor([[0.0, 0.0], [0.3, 5.0], [size * 2, size * 2]])  # degenerate, thin, huge
    image = torch.randint(0, n_images, (count, 1), generator=gen).to(xy)
    return torch.cat([image, xy, xy + wh], 1)


def _values_and_gradient(fn, features, *args):
    x = features.clone().requires_grad_(True)
    out = fn(x, *args)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weight).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize(("output_size", "sampling_ratio", "scale"), [(7, 2, 0.25), (14, 1, 0.125), ((5, 3), 3, 1.0)])
def test_values_and_gradient_equal_torchvision(aligned, output_size, sampling_ratio, scale):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(3, 6, 13, 17, generator=gen)
    rois = _rois(3, 40, 17 / scale, gen)
    args = (rois, output_size, scale, sampling_ratio, aligned)
    out, grad = _values_and_gradient(roi_align, features, *args)
    ref_out, ref_grad = _values_and_gradient(tv_roi_align, features, *args)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)
    assert ref_grad.abs().sum() > 0 and ref_out.abs().sum() > 0


def test_all_levels_at_once_equal_each_level_pooled_by_torchvision():
    gen = torch.Generator().manual_seed(0)
    strides = (4, 8, 16, 32)
    maps = [torch.randn(2, 5, 64 // s, 96 // s, generator=gen).requires_grad_(True) for s in strides]
    rois = _rois(2, 30, 90.0, gen)
    scales = [1.0 / s for s in strides]
    out = roi_align_levels(maps, rois, 7, scales, 2, True)
    weight = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * weight).sum(), maps)
    ref = torch.stack([tv_roi_align(m, rois, 7, s, 2, True) for m, s in zip(maps, scales)])
    ref_grads = torch.autograd.grad((ref * weight).sum(), maps)
    assert out.shape == (4, 30, 5, 7, 7)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_double_precision_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 1.0, 5.0, 4.5], [0, -2.0, -1.0, 3.0, 8.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, 3, 1.0, 2, True), (x,))


def test_no_rois_and_torchvision_fallbacks():
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    out = roi_align(x, torch.zeros(0, 5), 4, 1.0, 2)
    out.sum().backward()
    assert out.shape == (0, 3, 4, 4) and torch.equal(x.grad, torch.zeros_like(x))
    rois = torch.tensor([[1, 0.0, 0.0, 7.0, 5.0]])
    # adaptive sampling grid, and inference: torchvision's own kernels, bit for bit
    assert torch.equal(roi_align(x, rois, 4, 1.0, 0), tv_roi_align(x, rois, 4, 1.0, 0))
    with torch.no_grad():
        assert torch.equal(roi_align(x, rois, 4, 1.0, 2), tv_roi_align(x, rois, 4, 1.0, 2))
    with pytest.raises(ValueError, match="2 feature maps but 1 spatial scales"):
        roi_align_levels([x, x], rois, 4, [1.0], 2)


def test_gradient_is_the_same_bit_for_bit_on_every_run():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 16, 16, generator=gen)
    rois = _rois(2, 200, 16.0, gen)  # many RoIs overlap, so pixels collect many contributions
    grads = [_values_and_gradient(roi_align, features, rois, 7, 1.0, 2, False)[1] for _ in range(3)]
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
