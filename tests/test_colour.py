"""The fused colour ops against kornia's (the reference): same op for the same factors, same factor law."""

from __future__ import annotations

import math

import kornia.augmentation as K
import kornia.color
import kornia.enhance as KE
import numpy as np
import pytest
import torch
from scipy import stats

from probssl.data.colour import (
    ColorJitter,
    RandomGrayscale,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    luma,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _images(batch: int = 64, channels: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, channels, size, size, generator=gen)
    # Exact ties between channels (greys, two equal maxima) and the bounds 0 and 1, where HSV is piecewise.
    x[:8] = (x[:8] * 4).round() / 4
    x[8:12, 1] = x[8:12, 0]
    return x


def _factors(batch: int, low: float, high: float, seed: int = 1) -> torch.Tensor:
    return torch.empty(batch).uniform_(low, high, generator=torch.Generator().manual_seed(seed))


def test_each_step_equals_kornias_for_the_same_factors():
    x = _images()
    f = _factors(x.shape[0], 0.0, 2.0)
    torch.testing.assert_close(adjust_brightness(x, f), KE.adjust_brightness_accumulative(x, f))
    torch.testing.assert_close(adjust_contrast(x, f), KE.adjust_contrast_with_mean_subtraction(x, f))
    torch.testing.assert_close(adjust_saturation(x, f), KE.adjust_saturation_with_gray_subtraction(x, f))
    grey = x[:, :1]
    torch.testing.assert_close(adjust_contrast(grey, f), KE.adjust_contrast_with_mean_subtraction(grey, f))
    torch.testing.assert_close(luma(x), kornia.color.rgb_to_grayscale(x))


@pytest.mark.parametrize("half_width", [0.1, 0.5])
def test_hue_rotation_equals_kornias_hsv_round_trip(half_width):
    x = _images(batch=128)
    turns = _factors(x.shape[0], -half_width, half_width)
    reference = KE.adjust_hue(x, turns * 2 * math.pi)  # kornia takes radians
    torch.testing.assert_close(adjust_hue(x, turns), reference, atol=1e-5, rtol=0)


def test_hue_rotation_by_a_third_of_a_turn_permutes_the_channels():
    """An independent check: +1/3 turn maps R→G→B→R, i.e. (r, g, b) becomes (b, r, g)."""
    x = _images()
    rotated = adjust_hue(x, torch.full((x.shape[0],), 1 / 3))
    torch.testing.assert_close(rotated, x[:, [2, 0, 1]], atol=1e-5, rtol=0)
    torch.testing.assert_close(adjust_hue(x, torch.zeros(x.shape[0])), x, atol=1e-6, rtol=0)


def test_jitter_apply_equals_kornia_with_the_same_parameters():
    """Feed our drawn factors and order to kornia's ColorJitter: the views agree image by image."""
    x = _images(batch=64)
    ours = ColorJitter(0.4, 0.4, 0.2, 0.1, p=1.0)
    for seed in range(4):  # several orders of the four steps
        torch.manual_seed(seed)
        params = ours.sample(x.shape[0])
        reference = K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=1.0)
        kornia_params = {
            "brightness_factor": params.brightness,
            "contrast_factor": params.contrast,
            "saturation_factor": params.saturation,
            "hue_factor": params.hue,
            "order": torch.tensor(params.order),
            "batch_prob": torch.ones(x.shape[0], dtype=torch.bool),
        }
        expected = reference(x, params=reference.forward_parameters(x.shape) | kornia_params)
        torch.testing.assert_close(ours.apply(x, params), expected, atol=2e-5, rtol=0)


def test_jitter_factor_distribution_matches_kornias():
    """Same law of the drawn factors: the gate's rate, the uniform ranges (KS test), a uniform order."""
    n, p = 20_000, 0.8
    torch.manual_seed(0)
    ours = ColorJitter(0.4, 0.4, 0.2, 0.1, p=p).sample(n)
    reference = K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=p)
    theirs = reference.forward_parameters(torch.Size((n, 3, 4, 4)))
    gated = ours.brightness != 1.0
    their_gate = theirs["batch_prob"] > 0.5
    assert abs(gated.float().mean().item() - their_gate.float().mean().item()) < 0.02
    names = ("brightness", "contrast", "saturation", "hue")
    for name in names:
        mine = getattr(ours, name)[gated].numpy()
        ref = theirs[f"{name}_factor"]
        ref = (ref[their_gate] if len(ref) == n else ref).numpy()  # kornia draws for the gated ones only
        assert stats.ks_2samp(mine, ref).pvalue > 1e-3, name
        assert mine.min() >= ref.min() - 0.01 and mine.max() <= ref.max() + 0.01, name
    # The order is one uniform permutation per call: the first step is each of the four ~1/4 of the time.
    jitter = ColorJitter(0.4, 0.4, 0.2, 0.1)
    firsts = [jitter.sample(1).order[0] for _ in range(400)]
    counts = np.bincount(firsts, minlength=4)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_ungated_samples_pass_unchanged_and_grey_images_skip_colour_steps():
    x = _images()
    torch.manual_seed(0)
    jitter = ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.5)
    params = jitter.sample(x.shape[0])
    out = jitter.apply(x, params)
    kept = params.brightness == 1.0
    assert 0 < kept.sum() < x.shape[0]
    torch.testing.assert_close(out[kept], x[kept], atol=2e-6, rtol=0)
    assert (out[~kept] - x[~kept]).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    grey = ColorJitter(0.4, 0.4, 0.0, 0.0, p=1.0)
    assert grey(x[:, :1]).shape == x[:, :1].shape  # saturation/hue (RGB-only) never run
    with pytest.raises(ValueError, match="hue <= 0.5"):
        ColorJitter(0.4, 0.4, 0.2, 0.6)


def test_jitter_views_have_kornias_pixel_statistics():
    """End to end with independent draws: per-channel mean/std and pixel quantiles of many jittered views
    agree with kornia's within sampling noise."""
    x = _images(batch=4096, size=4, seed=3)
    torch.manual_seed(0)
    ours = ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8)
    mine = torch.cat([ours(chunk) for chunk in x.split(64)])  # 64 calls: 64 draws of the order
    torch.manual_seed(1)
    ref_op = K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8)
    theirs = torch.cat([ref_op(chunk) for chunk in x.split(64)])
    torch.testing.assert_close(mine.mean(dim=(0, 2, 3)), theirs.mean(dim=(0, 2, 3)), atol=0.01, rtol=0)
    torch.testing.assert_close(mine.std(dim=(0, 2, 3)), theirs.std(dim=(0, 2, 3)), atol=0.01, rtol=0)
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    torch.testing.assert_close(
        torch.quantile(mine.flatten(), q), torch.quantile(theirs.flatten(), q), atol=0.015, rtol=0
    )


def test_grayscale_matches_kornia_and_its_rate():
    x = _images(batch=4000, size=2)
    torch.manual_seed(0)
    out = RandomGrayscale(p=0.2)(x)
    grey = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    changed = (out != x).flatten(1).any(dim=1)
    assert abs(changed.float().mean().item() - 0.2) < 0.03
    torch.testing.assert_close(out[changed], K.RandomGrayscale(p=1.0)(x[changed]))
    assert grey[changed].all()
    torch.testing.assert_close(out[~changed], x[~changed], atol=0, rtol=0)
