"""The crop test: an aleatoric-uncertainty sanity check (Kirchhof et al., URL benchmark, 2023).

A small random crop of an image, resized back to full size, shows less of the object at a lower
effective resolution: an embedding that models aleatoric (input) uncertainty should be *less*
certain about it. ``crop_up_share`` is the share of images whose uncertainty rises when the image is
replaced by such a crop; 0.5 would be chance, close to 1 is what an aleatoric uncertainty should give.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

CROP_AREA = 0.25
"""Fraction of the image area each crop keeps (a square of side √0.25 = half the image side)."""


def crop_boxes(num_images: int, height: int, width: int, area: float, seed: int) -> Tensor:
    """[N, 4] (top, left, crop height, crop width): one square-ish box of ``area`` × H × W per image,
    at a uniformly random position (seeded, so every method sees the same crops)."""
    if not 0.0 < area <= 1.0:
        raise ValueError(f"crop area must lie in (0, 1], got {area}")
    crop_h = max(1, round(height * math.sqrt(area)))
    crop_w = max(1, round(width * math.sqrt(area)))
    generator = torch.Generator().manual_seed(seed)
    top = torch.randint(0, height - crop_h + 1, (num_images,), generator=generator)
    left = torch.randint(0, width - crop_w + 1, (num_images,), generator=generator)
    sizes = torch.tensor([crop_h, crop_w]).expand(num_images, 2)
    return torch.cat([top[:, None], left[:, None], sizes], dim=1)


def random_crops(images: Tensor, area: float = CROP_AREA, seed: int = 0) -> Tensor:
    """uint8 [N, C, H, W] → the same shape: each image's random crop (``crop_boxes``) resized back to
    H × W by bilinear interpolation, rounded to uint8."""
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    n, _, height, width = images.shape
    boxes = crop_boxes(n, height, width, area, seed)
    out = torch.empty_like(images)
    for i, (top, left, crop_h, crop_w) in enumerate(boxes.tolist()):
        crop = images[i : i + 1, :, top : top + crop_h, left : left + crop_w].float()
        resized = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
        out[i] = resized[0].round().clamp(0, 255).to(images.dtype)
    return out


def crop_up_share(uncertainty: Tensor, uncertainty_cropped: Tensor) -> float:
    """Share of images whose uncertainty strictly rises under cropping (equal counts as not rising)."""
    if uncertainty.shape != uncertainty_cropped.shape or uncertainty.dim() != 1:
        raise ValueError(
            "uncertainties must be two [N] tensors of equal length, got shapes "
            f"{tuple(uncertainty.shape)} and {tuple(uncertainty_cropped.shape)}"
        )
    if uncertainty.numel() == 0:
        raise ValueError("the crop test needs at least one image")
    return (uncertainty_cropped.double() > uncertainty.double()).double().mean().item()
