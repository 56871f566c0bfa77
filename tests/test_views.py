"""Batched multi-view augmentation: shapes, normalisation, randomness per sample, reproducibility."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from probssl.data.views import (
    PRESETS,
    MultiViewAugment,
    ViewConfig,
    asymmetric_pair,
    blur_kernel_size,
    build_view_pipeline,
    preset_for_dataset,
    to_float,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


# preset -> (image size, channels) of the datasets it serves.
PRESET_SHAPES = {"digits": (8, 1), "mnist": (28, 1), "cifar": (32, 3), "stl": (96, 3)}

# A recipe that only crops, to isolate the crop from the other random ops.
CROP_ONLY = ViewConfig(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, noise_std=0.0)
IDENTITY_CROP = dataclasses.replace(CROP_ONLY, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))


def _stats(channels: int) -> tuple[list[float], list[float]]:
    return [0.4] * channels, [0.2] * channels


def _images(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, generator=gen)


def _augment(preset: str, **kwargs) -> MultiViewAugment:
    size, channels = PRESET_SHAPES[preset]
    return MultiViewAugment(PRESETS[preset], size, channels, *_stats(channels), **kwargs)


@pytest.mark.parametrize("preset", sorted(PRESET_SHAPES))
def test_views_have_expected_count_shape_dtype(preset: str) -> None:
    size, channels = PRESET_SHAPES[preset]
    batch = 4 if size > 32 else 8
    aug = _augment(preset, num_global=2, num_local=2)
    views = aug(_images(batch, channels, size))
    assert len(views) == 4
    local = max(4, size // 2)
    for i, view in enumerate(views):
        side = size if i < 2 else local
        assert view.shape == (batch, channels, side, side)
        assert view.dtype == torch.float32
        assert torch.isfinite(view).all()


def test_known_presets_and_dataset_mapping() -> None:
    assert {"digits", "mnist", "cifar", "stl"} <= set(PRESETS)
    expected = {
        "digits": "digits",
        "mnist": "mnist",
        "fashion_mnist": "mnist",
        "cifar10": "cifar",
        "cifar100": "cifar",
        "svhn": "cifar",
        "stl10": "stl",
    }
    for dataset, preset in expected.items():
        assert preset_for_dataset(dataset) == preset
    assert PRESETS["digits"].flip_p == 0.0
    with pytest.raises(ValueError, match="fashion_mnist"):
        preset_for_dataset("imagenet")


def test_to_float_matches_manual_normalisation() -> None:
    images = _images(3, 3, 5)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 0.2]
    out = to_float(images, mean, std)
    manual = (images.double() / 255 - torch.tensor(mean).double().view(1, 3, 1, 1)) / torch.tensor(
        std
    ).double().view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), manual, atol=1e-6, rtol=0)
    torch.testing.assert_close(to_float(images.float() / 255, mean, std), out)
    with pytest.raises(ValueError, match="channels"):
        to_float(images, [0.5], [0.5])


def test_identity_view_is_to_float() -> None:
    """With every random op off, the augmentation path reduces to the eval transform."""
    images = _images(4, 1, 12)
    aug = MultiViewAugment(IDENTITY_CROP, 12, 1, [0.3], [0.2], num_global=1)
    (view,) = aug(images)
    torch.testing.assert_close(view, to_float(images, [0.3], [0.2]), atol=1e-4, rtol=0)


def test_normalize_flag_applies_mean_std() -> None:
    aug = _augment("cifar")
    images = _images(6, 3, 32)
    torch.manual_seed(5)
    raw = aug(images, normalize=False)
    torch.manual_seed(5)
    normed = aug(images)
    for r, n in zip(raw, normed, strict=True):
        torch.testing.assert_close((r - 0.4) / 0.2, n, atol=1e-5, rtol=0)


def test_two_views_differ_and_are_reproducible() -> None:
    aug = _augment("mnist")
    images = _images(8, 1, 28)
    torch.manual_seed(0)
    first = aug(images)
    torch.manual_seed(0)
    again = aug(images)
    assert not torch.allclose(first[0], first[1])
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    later = aug(images)  # the RNG has moved on: new views
    assert not torch.allclose(first[0], later[0])


def test_crops_are_random_per_sample() -> None:
    """The same image repeated in a batch gets a different crop in every row (one call, per-sample params)."""
    image = _images(1, 1, 16)
    batch = image.expand(8, -1, -1, -1).contiguous()
    reference = build_view_pipeline(CROP_ONLY, 16, 1, backend="kornia")
    assert reference[0].flags["cropping_mode"] == "resample"  # batched warp, not a per-image slicing loop
    torch.manual_seed(1)
    (view,) = MultiViewAugment(CROP_ONLY, 16, 1, [0.0], [1.0], num_global=1)(batch)
    flat = view.flatten(1)
    distinct = {tuple(row.round(decimals=4).tolist()) for row in flat}
    assert len(distinct) == 8


@pytest.mark.parametrize("preset", ["cifar", "stl", "digits", "mnist"])
def test_unnormalised_views_lie_in_unit_range(preset: str) -> None:
    size, channels = PRESET_SHAPES[preset]
    strong = dataclasses.replace(PRESETS[preset], jitter_p=1.0, solarize_p=0.5, noise_std=0.1)
    aug = MultiViewAugment(strong, size, channels, *_stats(channels), num_local=1)
    for view in aug(_images(4, channels, size), normalize=False):
        assert view.min() >= 0.0 and view.max() <= 1.0


def test_rgb_jitter_changes_colours_within_range() -> None:
    jitter = dataclasses.replace(IDENTITY_CROP, jitter_p=1.0, jitter_strength=1.0)
    images = _images(8, 3, 8)
    torch.manual_seed(2)
    (view,) = MultiViewAugment(jitter, 8, 3, *_stats(3), num_global=1)(images, normalize=False)
    assert view.min() >= 0.0 and view.max() <= 1.0
    assert (view - images.float() / 255).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every sample jittered


def test_grayscale_makes_channels_equal() -> None:
    grey = dataclasses.replace(IDENTITY_CROP, grayscale_p=1.0)
    (view,) = MultiViewAugment(grey, 8, 3, *_stats(3), num_global=1)(_images(4, 3, 8), normalize=False)
    assert view.shape[1] == 3
    torch.testing.assert_close(view[:, 0], view[:, 1])
    torch.testing.assert_close(view[:, 1], view[:, 2])


@pytest.mark.parametrize("backend", ["fused", "kornia"])
def test_grey_pipeline_has_no_colour_only_ops(backend: str) -> None:
    ops = [type(op).__name__ for op in build_view_pipeline(PRESETS["mnist"], 28, 1, backend)]
    assert "RandomGrayscale" not in ops
    jitter = next(
        op
        for op in build_view_pipeline(PRESETS["mnist"], 28, 1, backend)
        if type(op).__name__ == "ColorJitter"
    )
    if backend == "kornia":
        assert float(torch.as_tensor(jitter.saturation).abs().max()) == 0.0
        assert float(torch.as_tensor(jitter.hue).abs().max()) == 0.0
    else:  # saturation and hue draw nothing: the steps are skipped
        assert jitter.ranges[2] == (1.0, 1.0) and jitter.ranges[3] == (0.0, 0.0)
    with pytest.raises(ValueError, match="backend"):
        build_view_pipeline(PRESETS["mnist"], 28, 1, "torchvision")


def test_asymmetric_global_configs() -> None:
    first, second = asymmetric_pair(PRESETS["stl"])
    assert (first.blur_p, first.solarize_p, second.blur_p, second.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert asymmetric_pair(PRESETS["cifar"])[0].blur_p == 0.0  # blur stays off on small images
    aug = MultiViewAugment(
        PRESETS["cifar"], 32, 3, *_stats(3), global_configs=asymmetric_pair(PRESETS["cifar"])
    )
    assert len(aug(_images(2, 3, 32))) == 2
    with pytest.raises(ValueError, match="global_configs"):
        MultiViewAugment(PRESETS["cifar"], 32, 3, *_stats(3), num_global=3, global_configs=[PRESETS["cifar"]])


def test_uint8_and_float_inputs_agree_and_channels_last() -> None:
    aug = _augment("cifar", channels_last=True)
    images = _images(4, 3, 32)
    torch.manual_seed(3)
    from_uint8 = aug(images)
    torch.manual_seed(3)
    unit = images.float() / 255
    from_float = aug(unit)
    torch.testing.assert_close(unit, images.float() / 255, atol=0, rtol=0)  # the caller's batch is untouched
    for a, b in zip(from_uint8, from_float, strict=True):
        torch.testing.assert_close(a, b)
        assert a.is_contiguous(memory_format=torch.channels_last)


def test_input_validation() -> None:
    aug = _augment("mnist")
    with pytest.raises(ValueError, match="channels"):
        aug(_images(2, 3, 28))
    with pytest.raises(ValueError, match="B, C, H, W"):
        aug(_images(2, 1, 28)[0])
    with pytest.raises(ValueError, match="flip_p"):
        ViewConfig(flip_p=1.5)
    with pytest.raises(ValueError, match="crop_scale"):
        ViewConfig(crop_scale=(0.9, 0.1))
    assert ViewConfig(crop_scale=[0.3, 1.0]).crop_scale == (0.3, 1.0)  # YAML lists become tuples


def test_blur_kernel_adapts_to_size() -> None:
    assert blur_kernel_size(8) == 3
    assert blur_kernel_size(32) == 3
    assert blur_kernel_size(96) == 9
    assert blur_kernel_size(224) == 23
    assert all(blur_kernel_size(s) % 2 == 1 for s in range(1, 300))


@pytest.mark.parametrize("preset", ["cifar", "digits"])
def test_fused_views_have_the_kornia_views_distribution(preset: str) -> None:
    """End to end, independent draws: per-channel moments, pixel quantiles and the distance between the
    two views of an image (the strength of the recipe) agree with the kornia reference pipeline."""
    size, channels = PRESET_SHAPES[preset]
    size = min(size, 12)  # the statistics do not need full-size images
    images = _images(2048, channels, size, seed=5)
    stats = {}
    for backend in ("fused", "kornia"):
        torch.manual_seed(0)
        aug = MultiViewAugment(PRESETS[preset], size, channels, *_stats(channels), backend=backend)
        pairs = [aug(chunk, normalize=False) for chunk in images.split(128)]
        first, second = (torch.cat([pair[i] for pair in pairs]) for i in range(2))
        stats[backend] = {
            "mean": first.mean(dim=(0, 2, 3)),
            "std": first.std(dim=(0, 2, 3)),
            "quantiles": torch.quantile(first[:, :, ::3, ::3].flatten(), torch.tensor([0.1, 0.5, 0.9])),
            "view_distance": (first - second).abs().mean(),
        }
    for key, value in stats["fused"].items():
        torch.testing.assert_close(value, stats["kornia"][key], atol=0.01, rtol=0, msg=key)
