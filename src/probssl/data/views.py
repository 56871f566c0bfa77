"""Multi-view augmentation as batched tensor ops on the training device.

Self-supervised methods see every image through several random "views". Doing this per image on the CPU in
a DataLoader worker is the usual bottleneck for small images, so here the whole batch is augmented at once:
every op draws per-sample random parameters and runs as a few batched kernels, with no Python loop over
images. The crop + flip (``crop.py``) and the colour ops (``colour.py``) are our own fused versions of
kornia's, with kornia's distribution and less CPU time (the ``cifar`` recipe: ~35 → ~14 ms of CPU per view
of 256 images on one thread, the colour jitter alone ~30 → ~8); rotation, blur, solarize and noise are
kornia's. The pure kornia pipeline stays available (``backend="kornia"``) as the reference the fused ops are
tested against.

All randomness comes from torch's global RNG (kornia samples its parameters with it), so
``torch.manual_seed`` makes the views reproducible and a trainer that saves/restores the torch RNG state
resumes the exact same augmentation stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import kornia.augmentation as K
import torch
from torch import Tensor, nn

from probssl.data.catalog import CATALOG, find_entry
from probssl.data.colour import ColorJitter, RandomGrayscale
from probssl.data.crop import RandomResizedCropFlip

__all__ = [
    "BACKENDS",
    "PRESETS",
    "MultiViewAugment",
    "ViewConfig",
    "asymmetric_pair",
    "blur_kernel_size",
    "build_view_pipeline",
    "preset_for_dataset",
    "to_float",
]


def _check_range(name: str, bounds: tuple[float, float], low: float, high: float | None = None) -> None:
    lo, hi = bounds
    if not (low <= lo <= hi) or (high is not None and hi > high):
        upper = "" if high is None else f" and <= {high}"
        raise ValueError(f"{name} must be an increasing pair >= {low}{upper}, got {bounds}")


@dataclass(frozen=True)
class ViewConfig:
    """One augmentation recipe, applied in this order: crop, flip, rotate, colour, grayscale, blur, solarize,
    noise.

    Attributes:
        crop_scale: area fraction range of the random resized crop; the main source of invariance in SSL.
        crop_ratio: aspect-ratio range of the crop.
        flip_p: probability of a horizontal flip (0 for digits: a mirrored digit is a different glyph).
        jitter_p: probability of colour jitter.
        jitter_strength: ``s`` in brightness/contrast/saturation/hue = 0.4s/0.4s/0.2s/0.1s (the
            BYOL/solo-learn parametrisation of SimCLR's jitter). Grey images only get brightness and contrast.
        grayscale_p: probability of converting to grayscale (RGB only).
        blur_p: probability of a Gaussian blur; the kernel adapts to the view size (``blur_kernel_size``).
        blur_sigma: sigma range of the blur, in pixels.
        solarize_p: probability of solarizing at threshold 0.5 (BYOL's second view).
        noise_std: std of additive Gaussian noise in [0, 1] pixel units; tiny grey images have few other
            nuisance factors, so noise is a cheap extra invariance for them.
        rotate_degrees: maximum absolute rotation (uniform in [-d, d]); an extension beyond the SimCLR recipe,
            useful for handwritten digits where small rotations keep the class.
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter_strength: float = 1.0
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    noise_std: float = 0.0
    rotate_degrees: float = 0.0

    def __post_init__(self) -> None:
        # Configs loaded from YAML carry lists; store tuples so the recipe stays hashable and comparable.
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        _check_range("crop_scale", self.crop_scale, 0.0, 1.0)
        if self.crop_scale[1] <= 0:
            raise ValueError(f"crop_scale must allow a non-empty crop, got {self.crop_scale}")
        _check_range("crop_ratio", self.crop_ratio, 1e-6)
        _check_range("blur_sigma", self.blur_sigma, 1e-6)
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a probability and must lie in [0, 1], got {value}")
        for name in ("jitter_strength", "noise_std", "rotate_degrees"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def deterministic(self) -> bool:
        """Whether every view of an image is the same (the whole image, nothing random): then a frozen
        encoder's features can be computed once per image (``train.freeze_backbone``)."""
        whole = self.crop_scale == (1.0, 1.0) and self.crop_ratio == (1.0, 1.0)
        fixed = all(getattr(self, p) in (0.0, 1.0) for p in ("flip_p", "grayscale_p", "solarize_p"))
        return (
            whole and fixed and self.jitter_p == self.blur_p == self.noise_std == self.rotate_degrees == 0.0
        )


#: The whole image as it is, in every view: one preset under two names (``none``, ``identity``).
NO_AUGMENTATION = ViewConfig(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip_p=0.0,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=0.0,
    solarize_p=0.0,
)

PRESETS: dict[str, ViewConfig] = {
    # sklearn digits, 8x8 grey: the whole digit fills the frame, so crops stay large (a 0.08 crop would be a
    # 2x2 patch of stroke), no flips (mirrored 2/5/7 are not digits), and small rotations + noise + intensity
    # changes supply the invariances that colour ops give on RGB.
    "digits": ViewConfig(
        crop_scale=(0.5, 1.0),
        flip_p=0.0,
        jitter_p=0.8,
        jitter_strength=1.0,
        grayscale_p=0.0,
        blur_p=0.0,
        solarize_p=0.0,
        noise_std=0.05,
        rotate_degrees=10.0,
    ),
    # 28x28 grey (Fashion-MNIST, MNIST): moderate crops; flips are natural for clothes.
    "mnist": ViewConfig(
        crop_scale=(0.3, 1.0),
        flip_p=0.5,
        jitter_p=0.8,
        jitter_strength=1.0,
        grayscale_p=0.0,
        blur_p=0.0,
        solarize_p=0.0,
    ),
    # 32x32 RGB: solo-learn's CIFAR recipe (min crop 0.2 works better than 0.08 at this resolution, blur off
    # because a 32px image is already blurry).
    "cifar": ViewConfig(
        crop_scale=(0.2, 1.0),
        flip_p=0.5,
        jitter_p=0.8,
        jitter_strength=1.0,
        grayscale_p=0.2,
        blur_p=0.0,
        solarize_p=0.0,
    ),
    # The image itself, no augmentation (`data.views=identity`): supervised metric learning as LAM's
    # released code trains on Fashion-MNIST (un-augmented images, pairs from class labels).
    "identity": NO_AUGMENTATION,
    # 96x96 RGB: the ImageNet SimCLR recipe, including blur.
    "stl": ViewConfig(
        crop_scale=(0.08, 1.0),
        flip_p=0.5,
        jitter_p=0.8,
        jitter_strength=1.0,
        grayscale_p=0.2,
        blur_p=0.5,
        blur_sigma=(0.1, 2.0),
        solarize_p=0.0,
    ),
    # The same, under the name a frozen encoder's heads use: features computed once
    # (train.freeze_backbone=true data.views=none).
    "none": NO_AUGMENTATION,
}


def preset_for_dataset(dataset_name: str, channels: int | None = None, image_size: int | None = None) -> str:
    """Name of the augmentation preset for a dataset (a preset name is accepted as itself).

    A registered dataset's preset is in its catalogue entry (:mod:`probssl.data.catalog`). Other
    datasets (own folders) get the preset of the built-in set their images look like, when
    ``channels`` and ``image_size`` are given: grey up to 8 px digits, grey mnist, RGB up to 64 px
    cifar, larger RGB stl (the ImageNet recipe).
    """
    entry = find_entry(dataset_name)
    if entry is not None and entry.preset is not None:
        return entry.preset
    key = dataset_name.lower()
    if key in PRESETS:
        return key
    if channels is not None and image_size is not None:
        if channels == 1:
            return "digits" if image_size <= 8 else "mnist"
        return "cifar" if image_size <= 64 else "stl"
    with_preset = {name for name, e in CATALOG.items() if e.preset is not None}
    known = ", ".join(sorted(with_preset | set(PRESETS)))
    raise ValueError(f"no augmentation preset for dataset '{dataset_name}'; known names: {known}")


def asymmetric_pair(config: ViewConfig) -> tuple[ViewConfig, ViewConfig]:
    """BYOL's two asymmetric views of one recipe: view 1 always blurred and never solarized, view 2 rarely
    blurred (0.1) and sometimes solarized (0.2). If the recipe has blur off (small images) it stays off."""
    blurs = (1.0, 0.1) if config.blur_p > 0 else (0.0, 0.0)
    first = dataclasses.replace(config, blur_p=blurs[0], solarize_p=0.0)
    second = dataclasses.replace(config, blur_p=blurs[1], solarize_p=0.2)
    return first, second


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian kernel of ~10% of the side, at least 3 (SimCLR's 23 px at 224 px)."""
    k = max(3, int(0.1 * size))
    return k if k % 2 == 1 else k + 1


def _to_unit(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; floats are assumed to be in [0, 1] already."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.float()


def _stats(values: Sequence[float], channels: int, name: str) -> Tensor:
    if len(values) != channels:
        raise ValueError(f"{name} has {len(values)} entries but the images have {channels} channels")
    return torch.tensor([float(v) for v in values], dtype=torch.float32).view(1, channels, 1, 1)


def _check_images(images: Tensor, channels: int | None = None) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must be a [B, C, H, W] batch, got shape {tuple(images.shape)}")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"expected {channels} channels, got {images.shape[1]} (shape {tuple(images.shape)})")


def to_float(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The eval transform: uint8 [B, C, H, W] (or float in [0, 1]) -> normalised float32, no augmentation."""
    _check_images(images)
    channels = images.shape[1]
    mean_t = _stats(mean, channels, "mean").to(images.device)
    std_t = _stats(std, channels, "std").to(images.device)
    return (_to_unit(images) - mean_t) / std_t


BACKENDS = ("fused", "kornia")


def _colour_ops(config: ViewConfig, channels: int, backend: str) -> list[nn.Module]:
    """Jitter (+ grayscale for RGB). Grey images have no saturation/hue, so only brightness and contrast."""
    s = config.jitter_strength
    jitter, grayscale = (
        (ColorJitter, RandomGrayscale) if backend == "fused" else (K.ColorJitter, K.RandomGrayscale)
    )
    ops: list[nn.Module] = []
    if config.jitter_p > 0 and s > 0:
        if channels == 3:
            ops.append(jitter(0.4 * s, 0.4 * s, 0.2 * s, 0.1 * s, p=config.jitter_p))
        else:
            ops.append(jitter(0.4 * s, 0.4 * s, 0.0, 0.0, p=config.jitter_p))
    if channels == 3 and config.grayscale_p > 0:
        ops.append(grayscale(p=config.grayscale_p))
    return ops


def build_view_pipeline(
    config: ViewConfig, size: int, channels: int, backend: str = "fused"
) -> nn.Sequential:
    """The ops of one view, producing [B, C, size, size] in [0, 1] (before clamping/normalising).

    ``backend="kornia"`` builds the same recipe from kornia's ops alone (the reference); its crop uses
    kornia's ``resample`` mode: one batched affine warp, where the default ``slice`` mode crops image by
    image in a Python loop (and syncs with the GPU per image)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown augmentation backend '{backend}'; valid: {', '.join(BACKENDS)}")
    if backend == "fused":
        ops: list[nn.Module] = [
            RandomResizedCropFlip(size, config.crop_scale, config.crop_ratio, flip_p=config.flip_p)
        ]
    else:
        ops = [
            K.RandomResizedCrop(
                (size, size), scale=config.crop_scale, ratio=config.crop_ratio, cropping_mode="resample"
            )
        ]
        if config.flip_p > 0:
            ops.append(K.RandomHorizontalFlip(p=config.flip_p))
    if config.rotate_degrees > 0:
        ops.append(K.RandomRotation(config.rotate_degrees, p=1.0))
    ops.extend(_colour_ops(config, channels, backend))
    if config.blur_p > 0:
        k = blur_kernel_size(size)
        ops.append(K.RandomGaussianBlur((k, k), config.blur_sigma, p=config.blur_p))
    if config.solarize_p > 0:
        ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=config.solarize_p))
    if config.noise_std > 0:
        ops.append(K.RandomGaussianNoise(mean=0.0, std=config.noise_std, p=1.0))
    return nn.Sequential(*ops)


class MultiViewAugment(nn.Module):
    """Turns a uint8 batch into ``num_global`` + ``num_local`` augmented, normalised views.

    Args:
        config: the recipe for every global view (unless ``global_configs`` is given) and the local views.
        image_size: side of the global views.
        channels: 1 (grey) or 3 (RGB); colour ops are RGB-only.
        mean, std: per-channel normalisation statistics in [0, 1] units.
        num_global: number of global views.
        num_local: number of small multi-crop views (SwAV/DINO style).
        local_size: side of the local views (default ``image_size // 2``, at least 4).
        local_scale: crop-area range of the local views.
        global_configs: one recipe per global view, for asymmetric methods (BYOL, see ``asymmetric_pair``).
        channels_last: return views in channels_last memory format (faster convs on GPU and CPU).
        backend: "fused" (our fused crop and colour ops) or "kornia" (the reference ops).
    """

    def __init__(
        self,
        config: ViewConfig,
        image_size: int,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_global: int = 2,
        num_local: int = 0,
        local_size: int | None = None,
        local_scale: tuple[float, float] = (0.05, 0.4),
        global_configs: Sequence[ViewConfig] | None = None,
        channels_last: bool = False,
        backend: str = "fused",
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        if num_global < 1 or num_local < 0:
            raise ValueError(f"need num_global >= 1 and num_local >= 0, got {num_global}, {num_local}")
        if global_configs is not None and len(global_configs) != num_global:
            raise ValueError(
                f"global_configs has {len(global_configs)} recipes for {num_global} global views"
            )
        self.image_size = image_size
        self.channels = channels
        self.num_global = num_global
        self.num_local = num_local
        self.local_size = local_size if local_size is not None else max(4, image_size // 2)
        self.channels_last = channels_last
        configs = list(global_configs) if global_configs is not None else [config] * num_global
        local_config = dataclasses.replace(config, crop_scale=tuple(local_scale))
        self.global_views = nn.ModuleList(
            build_view_pipeline(c, image_size, channels, backend) for c in configs
        )
        self.local_views = nn.ModuleList(
            build_view_pipeline(local_config, self.local_size, channels, backend) for _ in range(num_local)
        )
        # Non-persistent: they are derived from the constructor arguments, not state worth checkpointing.
        self.register_buffer("mean", _stats(mean, channels, "mean"), persistent=False)
        self.register_buffer("std", _stats(std, channels, "std"), persistent=False)

    @torch.no_grad()
    def forward(self, images: Tensor, normalize: bool = True) -> list[Tensor]:
        """images: uint8 [B, C, H, W] on the training device -> ``num_global`` views [B, C, image_size,
        image_size] then ``num_local`` views [B, C, local_size, local_size], float32.

        ``normalize=False`` returns the views in [0, 1] before mean/std normalisation (for inspection/tests).
        """
        _check_images(images, self.channels)
        unit = _to_unit(images)
        views = [pipeline(unit) for pipeline in self.global_views]
        views += [pipeline(unit) for pipeline in self.local_views]
        return [self._finish(view, normalize) for view in views]

    def _finish(self, view: Tensor, normalize: bool) -> Tensor:
        """Clamp (noise and jitter can leave [0, 1]), normalise, and set the memory format."""
        view = view.clamp_(0.0, 1.0)
        if normalize:  # in place: the view is this call's own tensor (every recipe starts with a crop)
            view = view.sub_(self.mean.to(device=view.device)).div_(self.std.to(device=view.device))
        if self.channels_last:
            view = view.contiguous(memory_format=torch.channels_last)
        return view

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, channels={self.channels}, num_global={self.num_global}, "
            f"num_local={self.num_local}, local_size={self.local_size}"
        )
