"""Common corruptions: shapes, determinism, severity monotonicity and what each corruption must do."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from probssl.data.corruptions import (
    COLOR_CORRUPTIONS,
    CORRUPTIONS,
    SEVERITY_PARAMS,
    corrupt,
    corruption_names,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


def structured(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random but image-like uint8 batch: smooth sinusoidal gradients plus a flat disk and a rectangle at
    random places (pure noise would hide what blurs and pixelation do; edges at random offsets keep
    block-alignment effects from favouring one severity)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        a, b, phase = torch.rand(3, generator=g).tolist()
        image = torch.stack(
            [0.5 + 0.35 * torch.sin(2 * math.pi * (a * xx + b * yy) + phase + k) for k in range(channels)]
        )
        cx, cy, r = torch.rand(3, generator=g).tolist()
        disk = (xx - cx) ** 2 + (yy - cy) ** 2 < (0.1 + 0.2 * r) ** 2
        image = torch.where(disk, torch.rand(channels, 1, 1, generator=g), image)
        top, left = torch.randint(0, size // 2, (2,), generator=g).tolist()
        image[:, top : top + size // 3, left : left + size // 3] = torch.rand(channels, 1, 1, generator=g)
        images.append(image)
    return (torch.stack(images) * 255).round().to(torch.uint8)


def mean_change(images: torch.Tensor, corrupted: torch.Tensor) -> float:
    return (corrupted.float() - images.float()).abs().mean().item()


GREY8 = structured(8, 1, 8, seed=1)
GREY28 = structured(8, 1, 28, seed=2)
RGB32 = structured(8, 3, 32, seed=3)
BATCHES = {"grey8": GREY8, "grey28": GREY28, "rgb32": RGB32}


def cases() -> list[tuple[str, str]]:
    return [(batch, name) for batch, x in BATCHES.items() for name in corruption_names(x.shape[1])]


def test_names_and_table() -> None:
    assert set(SEVERITY_PARAMS) == set(CORRUPTIONS)
    assert all(len(params) == 5 for params in SEVERITY_PARAMS.values())
    assert set(COLOR_CORRUPTIONS) <= set(CORRUPTIONS)
    assert corruption_names(3) == list(CORRUPTIONS)
    grey = corruption_names(1)
    assert not set(grey) & set(COLOR_CORRUPTIONS)
    assert {"gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "gaussian_blur"} <= set(grey)
    assert {"contrast", "brightness", "jpeg", "pixelate"} <= set(grey)
    with pytest.raises(ValueError, match="channels"):
        corruption_names(2)


@pytest.mark.parametrize(("batch", "name"), cases())
def test_shape_dtype_and_monotone_severity(batch: str, name: str) -> None:
    images = BATCHES[batch]
    changes = []
    for severity in range(1, 6):
        out = corrupt(images, name, severity, seed=0)
        assert out.shape == images.shape and out.dtype == torch.uint8
        changes.append(mean_change(images, out))
    assert changes[0] > 0, f"{name} severity 1 left {batch} unchanged"
    assert all(b > a for a, b in zip(changes, changes[1:], strict=False)), (name, batch, changes)


def test_input_is_not_modified() -> None:
    images = RGB32.clone()
    for name in CORRUPTIONS:
        corrupt(images, name, 5)
    assert torch.equal(images, RGB32)


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise"])
def test_noise_is_deterministic_per_seed(name: str) -> None:
    global_state = torch.get_rng_state()
    first = corrupt(RGB32, name, 3, seed=7)
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(first, corrupt(RGB32, name, 3, seed=7))
    assert not torch.equal(first, corrupt(RGB32, name, 3, seed=8))
    torch.set_rng_state(global_state)


def test_global_rng_is_untouched() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    corrupt(GREY28, "gaussian_noise", 2, seed=1)
    corrupt(GREY28, "shot_noise", 2, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_deterministic_corruptions_ignore_seed() -> None:
    for name in ("gaussian_blur", "defocus_blur", "contrast", "brightness", "jpeg", "pixelate"):
        assert torch.equal(corrupt(GREY28, name, 2, seed=0), corrupt(GREY28, name, 2, seed=99))


def test_grey_stays_grey() -> None:
    for images in (GREY8, GREY28):
        for name in corruption_names(1):
            assert corrupt(images, name, 5).shape[1] == 1
    with pytest.raises(ValueError, match="needs RGB"):
        corrupt(GREY8, "saturate", 1)


def test_invalid_arguments_list_valid_choices() -> None:
    with pytest.raises(ValueError, match="gaussian_noise"):
        corrupt(RGB32, "fog", 1)
    for bad in (0, 6, 2.5, True):
        with pytest.raises(ValueError, match="1, 2, 3, 4, 5"):
            corrupt(RGB32, "contrast", bad)
    assert torch.equal(corrupt(RGB32, "contrast", np.int64(2)), corrupt(RGB32, "contrast", 2))
    with pytest.raises(TypeError):
        corrupt(RGB32.float(), "contrast", 1)
    with pytest.raises(ValueError):
        corrupt(RGB32[0], "contrast", 1)


def test_empty_batch() -> None:
    assert corrupt(RGB32[:0], "gaussian_noise", 1).shape == (0, 3, 32, 32)


def test_jpeg_round_trips_through_pillow() -> None:
    for images, mode in ((GREY28, "L"), (RGB32, "RGB")):
        out = corrupt(images, "jpeg", 3)
        quality = SEVERITY_PARAMS["jpeg"][2]
        for i in (0, 3):
            array = images[i].permute(1, 2, 0).numpy()
            buffer = io.BytesIO()
            Image.fromarray(array[..., 0] if mode == "L" else array, mode=mode).save(
                buffer, format="JPEG", quality=quality
            )
            expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue()))).reshape(array.shape)
            assert np.array_equal(out[i].permute(1, 2, 0).numpy(), expected)


def distinct_per_block(images: torch.Tensor) -> float:
    """Mean number of distinct values in each aligned 2x2 block of each channel: pixelation copies one value
    over neighbouring pixels, so blocks hold fewer distinct values."""
    blocks = images.unfold(2, 2, 2).unfold(3, 2, 2).reshape(-1, 4)
    return sorted_distinct(blocks).float().mean().item()


def sorted_distinct(blocks: torch.Tensor) -> torch.Tensor:
    ordered = blocks.sort(dim=1).values
    return 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)


def test_pixelate_merges_pixels_into_blocks() -> None:
    clean = distinct_per_block(RGB32)
    per_severity = [distinct_per_block(corrupt(RGB32, "pixelate", s)) for s in range(1, 6)]
    assert all(b < a for a, b in zip([clean, *per_severity], per_severity, strict=False)), per_severity
    out = corrupt(RGB32, "pixelate", 5)
    equal_neighbours = (out[..., :, 1:] == out[..., :, :-1]).float().mean()
    assert equal_neighbours > (RGB32[..., :, 1:] == RGB32[..., :, :-1]).float().mean()


def test_pixelate_is_nested_across_severities() -> None:
    """Pixels merged at one severity stay merged at the next (on a ramp, equal neighbours only come from
    merging), and 8x8 images get five distinct levels."""
    ramp = (torch.arange(28) * 9).to(torch.uint8).expand(2, 1, 28, 28).contiguous()
    previous = torch.zeros(2, 1, 28, 27, dtype=torch.bool)
    for severity in range(1, 6):
        out = corrupt(ramp, "pixelate", severity)
        merged = out[..., 1:] == out[..., :-1]
        assert (merged | ~previous).all() and merged.sum() > previous.sum()
        previous = merged
    digits = [corrupt(GREY8, "pixelate", s) for s in range(1, 6)]
    assert all(not torch.equal(a, b) for a, b in zip(digits, digits[1:], strict=False))


def test_contrast_reduces_std_and_keeps_mean() -> None:
    for severity in range(1, 6):
        out = corrupt(RGB32, "contrast", severity).float()
        assert (out.std(dim=(1, 2, 3)) < RGB32.float().std(dim=(1, 2, 3))).all()
        assert torch.allclose(out.mean(dim=(1, 2, 3)), RGB32.float().mean(dim=(1, 2, 3)), atol=1.0)


def test_brightness_increases_mean() -> None:
    for images in (GREY28, RGB32):
        out = corrupt(images, "brightness", 3).float()
        assert (out.mean(dim=(1, 2, 3)) > images.float().mean(dim=(1, 2, 3))).all()


def test_blur_reduces_high_frequencies() -> None:
    def roughness(x: torch.Tensor) -> float:
        return (x.float()[..., 1:] - x.float()[..., :-1]).abs().mean().item()

    for name in ("gaussian_blur", "defocus_blur"):
        assert roughness(corrupt(GREY28, name, 3)) < roughness(GREY28)


def test_colour_corruptions() -> None:
    def saturation(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return (x.amax(1) - x.amin(1)) / x.amax(1).clamp_min(1)

    assert saturation(corrupt(RGB32, "saturate", 3)).mean() > saturation(RGB32).mean()
    shifted = corrupt(RGB32, "hue_shift", 3).float()
    # A hue rotation keeps the value (max channel) and saturation, and only moves colours around the wheel.
    assert torch.allclose(shifted.amax(1), RGB32.float().amax(1), atol=1.5)


def test_impulse_noise_sets_extreme_values() -> None:
    flat = torch.full((2, 1, 16, 16), 128, dtype=torch.uint8)
    out = corrupt(flat, "impulse_noise", 5, seed=0)
    changed = out != flat
    assert changed.any()
    assert set(out[changed].unique().tolist()) <= {0, 255}


def test_large_images_scale_blur() -> None:
    """A 96 px image gets a 3x wider blur than a 32 px one: the same image upsampled 3x should lose
    about as much of its structure, so its blurred-and-downsampled version matches the 32 px result."""
    small = RGB32[:2]
    big = torch.nn.functional.interpolate(small.float(), scale_factor=3, mode="nearest").round().byte()
    blurred_big = corrupt(big, "gaussian_blur", 5).float()
    back = torch.nn.functional.avg_pool2d(blurred_big, 3)
    blurred_small = corrupt(small, "gaussian_blur", 5).float()
    unscaled_error = (back - small.float()).abs().mean()
    assert (back - blurred_small).abs().mean() < unscaled_error
