"""segkit.ops.roi_align: torchvision's values, and its CPU gradient computed by one scatter."""

import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from segkit.ops.roi_align import roi_align, roi_align_backward


def _rois(n_images: int, count: int, size: float, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(count, 2, generator=gen) * size * 1.2 - size * 0.1  # some start off the map
    wh = torch.rand(count, 2, generator=gen) * size * 0.6
    wh[:3] = torch.tensor([[0.0, 0.0], [0.3, 5.0], [size * 2, size * 2]])  # degenerate, thin, huge
    image = torch.randint(0, n_images, (count, 1), generator=gen).to(xy)
    return torch.cat([image, xy, xy + wh], 1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize(("output_size", "sampling_ratio", "scale"), [(7, 2, 0.25), (14, 1, 0.125), ((5, 3), 3, 1.0)])
def test_gradient_equals_torchvision(aligned, output_size, sampling_ratio, scale):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(3, 6, 13, 17, generator=gen)
    rois = _rois(3, 40, 17 / scale, gen)
    grads = []
    for fn in (roi_align, tv_roi_align):
        x = features.clone().requires_grad_(True)
        out = fn(x, rois, output_size, scale, sampling_ratio, aligned)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * weight).sum().backward()
        grads.append((out.detach(), x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-5)
    assert grads[1][1].abs().sum() > 0


def test_double_precision_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 1.0, 5.0, 4.5], [0, -2.0, -1.0, 3.0, 8.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, 3, 1.0, 2, True), (x,))


def test_no_rois_and_fallbacks():
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    out = roi_align(x, torch.zeros(0, 5), 4, 1.0, 2)
    out.sum().backward()
    assert out.shape == (0, 3, 4, 4) and torch.equal(x.grad, torch.zeros_like(x))
    # adaptive sampling grid: torchvision's own kernels
    rois = torch.tensor([[1, 0.0, 0.0, 7.0, 5.0]])
    torch.testing.assert_close(roi_align(x, rois, 4, 1.0, 0), tv_roi_align(x, rois, 4, 1.0, 0))
    with pytest.raises(ValueError, match="sampling_ratio > 0"):
        roi_align_backward(torch.zeros(1, 3, 4, 4), rois, x.shape, 1.0, 0, False)
