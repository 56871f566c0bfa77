"""The separable resized crop (+ flip) against kornia's warp, and its box law against kornia's sampler."""

from __future__ import annotations

import kornia.augmentation as K
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from probssl.data.crop import RandomResizedCropFlip, resample_matrices, resized_crop

pytestmark = pytest.mark.usefixtures("single_thread")


def _images(batch: int = 32, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("in_size", "out_size"), [(16, 16), (32, 32), (28, 14), (8, 8)])
def test_resized_crop_equals_kornias_warp_for_the_same_boxes(in_size, out_size):
    x = _images(size=in_size)
    torch.manual_seed(0)
    reference = K.RandomResizedCrop((out_size, out_size), scale=(0.08, 1.0), cropping_mode="resample")
    expected = reference(x)
    boxes = reference._params["src"]
    torch.testing.assert_close(resized_crop(x, boxes, out_size), expected, atol=1e-5, rtol=0)
    flip = torch.arange(x.shape[0]) % 2 == 0
    flipped = resized_crop(x, boxes, out_size, flip)
    torch.testing.assert_close(flipped[flip], expected[flip].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(flipped[~flip], expected[~flip], atol=1e-5, rtol=0)


def test_resample_matrices_are_bilinear_against_grid_sample():
    """An independent reference: grid_sample (align_corners=True) at the box's pixel coordinates."""
    x = _images(batch=4, size=10)
    start, extent = torch.tensor([0.0, 2.0, 3.0, 1.0]), torch.tensor([10.0, 5.0, 7.0, 2.0])
    rows = resample_matrices(start, extent, 10, 6)
    assert torch.allclose(rows.sum(-1), torch.ones(4, 6))  # weights of each output pixel sum to 1
    source = start[:, None] + torch.arange(6.0)[None] * ((extent - 1) / 5)[:, None]  # [B, 6] pixel coords
    grid_x = source / 9 * 2 - 1
    grid = torch.stack(
        [grid_x[:, None, :].expand(4, 10, 6), torch.linspace(-1, 1, 10)[None, :, None].expand(4, 10, 6)], -1
    )
    expected = F.grid_sample(x, grid, mode="bilinear", align_corners=True)  # columns resampled
    torch.testing.assert_close(x @ rows.transpose(1, 2).unsqueeze(1), expected, atol=1e-5, rtol=0)


def test_boxes_follow_kornias_law():
    """The boxes come from kornia's own sampler: areas and aspect ratios agree in distribution (KS)."""
    n, size = 4000, 32
    torch.manual_seed(0)
    ours, flips = RandomResizedCropFlip(size, (0.2, 1.0), (3 / 4, 4 / 3), flip_p=0.5).sample(
        torch.Size((n, 3, size, size))
    )
    torch.manual_seed(1)
    reference = K.RandomResizedCrop((size, size), scale=(0.2, 1.0), cropping_mode="resample")
    theirs = reference.forward_parameters(torch.Size((n, 3, size, size)))["src"]

    def area_and_ratio(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = boxes[:, 1, 0] - boxes[:, 0, 0] + 1
        h = boxes[:, 3, 1] - boxes[:, 0, 1] + 1
        return (w * h).numpy(), (w / h).numpy()

    for mine, ref in zip(area_and_ratio(ours), area_and_ratio(theirs), strict=True):
        assert stats.ks_2samp(mine, ref).pvalue > 1e-3
    assert abs(flips.float().mean().item() - 0.5) < 0.03
    assert (ours >= 0).all() and (ours <= size - 1).all()


def test_module_crops_and_flips_whole_batches():
    x = _images(batch=8, size=16)
    torch.manual_seed(0)
    out = RandomResizedCropFlip(12, (0.3, 1.0), (3 / 4, 4 / 3), flip_p=0.5)(x)
    assert out.shape == (8, 3, 12, 12) and out.is_contiguous()
    assert out.min() >= 0 and out.max() <= 1  # convex combinations of pixels
    torch.manual_seed(0)
    whole = RandomResizedCropFlip(16, (1.0, 1.0), (1.0, 1.0))(x)
    torch.testing.assert_close(whole, x, atol=1e-6, rtol=0)  # the full box is the identity
    with pytest.raises(ValueError, match="flip_p"):
        RandomResizedCropFlip(16, (0.3, 1.0), (3 / 4, 4 / 3), flip_p=1.5)
