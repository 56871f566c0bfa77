"""Other datasets seen through an in-distribution dataset's eyes: OOD and transfer sets.

An OOD or transfer set must enter the encoder exactly as in-distribution images do, so each is
conformed to the in-distribution image shape (channels, side) before use. A registered dataset's
default partners are in its catalogue entry (:mod:`probssl.data.catalog`, design.md §4); synthetic
smooth ``noise`` needs no files, and is the only default OOD set of a path. ``eval.ood_sets`` /
``eval.transfer_sets`` replace the defaults with registered names or paths (folders, tars of images,
image files).

Image-file sets (registered folder sets and paths) are decoded straight at the run's size (shorter
side + centre crop) and use every image (split ``all``: the transfer probe halves it itself); the
array sets use their test split and are resized here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from probssl.data.catalog import DatasetError, DatasetInfo, ImageDataset, find_entry, get_dataset_info
from probssl.data.resolve import is_file_dataset, load_dataset, load_source, open_source


def _names(configured: Sequence[str] | str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if configured is None:
        return default
    if isinstance(configured, str):  # "a,b" from a command-line override
        configured = [c for c in configured.split(",")]
    return tuple(c.strip() for c in configured if c.strip())


def ood_set_names(dataset: str, configured: Sequence[str] | str | None = None) -> tuple[str, ...]:
    """``eval.ood_sets`` if set, else the dataset's defaults (``noise`` alone for a path or unknown name)."""
    entry = find_entry(dataset)
    return _names(configured, entry.ood_sets if entry is not None else ("noise",))


def transfer_set_names(dataset: str, configured: Sequence[str] | str | None = None) -> tuple[str, ...]:
    """``eval.transfer_sets`` if set, else the dataset's defaults (none for a path)."""
    entry = find_entry(dataset)
    return _names(configured, entry.transfer_sets if entry is not None else ())


_LUMA = torch.tensor([0.299, 0.587, 0.114])


def conform(images: Tensor, channels: int, size: int) -> Tensor:
    """uint8 [N, C, H, W] → uint8 [N, channels, size, size] (area resize; grey → RGB by repeating,
    RGB → grey by luminance)."""
    x = images.float()
    if x.shape[1] != channels:
        if channels == 1:  # luminance, ITU-R 601 (Pillow's "L")
            x = (x * _LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            x = x.expand(-1, channels, -1, -1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(
            x,
            size=(size, size),
            mode="area" if x.shape[-1] > size else "bilinear",
            align_corners=None if x.shape[-1] > size else False,
        )
    return x.round().clamp(0, 255).to(torch.uint8).contiguous()


def smooth_noise(count: int, channels: int, size: int, seed: int = 0) -> Tensor:
    """Blurred uniform noise: a far-OOD set that exists on every machine."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, channels, max(size // 4, 2), max(size // 4, 2), generator=g)
    return (F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) * 255).to(
        torch.uint8
    )


def _file_shift_set(
    name: str,
    info: DatasetInfo,
    data_dir: str | None,
    max_items: int | None,
    seed: int,
    verify: bool,
    cache_dir: str | os.PathLike[str] | None,
) -> tuple[Tensor, Tensor, list[str]]:
    """Every image of a file-based set at the run's size (a seeded subset if ``max_items`` is smaller).

    Up to ``max_items`` the whole set is decoded once into the cache; above it only the chosen images
    are decoded, so a large folder given as an OOD set costs ``max_items`` decodes, not all of them.
    """
    source = open_source(
        name, "all", data_dir=data_dir, image_size=info.image_size, verify=verify, cache_dir=cache_dir
    )
    if max_items is None or len(source) <= max_items:
        ds = load_source(source, cache_dir)
        return ds.images, ds.labels, ds.classes
    keep = (
        torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:max_items].sort().values
    )
    images = torch.from_numpy(np.stack([source.read(int(i)) for i in keep]))
    return images, torch.from_numpy(source.labels[keep.numpy()].copy()), list(source.classes)


def load_shift_set(
    name: str,
    like: str | DatasetInfo,
    data_dir: str | None,
    download: bool = True,
    max_items: int | None = None,
    seed: int = 0,
    *,
    need_labels: bool = False,
    verify: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ImageDataset:
    """Dataset ``name`` (a registered name or a path) conformed to ``like`` (a dataset name or the run's
    :class:`DatasetInfo`); ``noise`` is synthetic. ``need_labels``: refuse an unlabelled set (transfer)."""
    info = like if isinstance(like, DatasetInfo) else get_dataset_info(like)
    if name == "noise":
        count = max_items or 2000
        images = smooth_noise(count, info.channels, info.image_size, seed)
        return ImageDataset("noise", "test", images, torch.full((count,), -1, dtype=torch.long), [])
    if is_file_dataset(name):
        images, labels, classes = _file_shift_set(name, info, data_dir, max_items, seed, verify, cache_dir)
    else:
        source = load_dataset(name, "test", data_dir, download)
        images, labels, classes = source.images, source.labels, source.classes
        if max_items is not None and len(labels) > max_items:
            keep = (
                torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:max_items]
                .sort()
                .values
            )
            images, labels = images[keep], labels[keep]
    if need_labels and (len(labels) == 0 or int(labels.min()) < 0):
        raise DatasetError(
            f"{name} has no class labels (no class folders), but a transfer set needs them; give a folder "
            f"laid out as <class>/<image>"
        )
    return ImageDataset(name, "test", conform(images, info.channels, info.image_size), labels, classes)


__all__ = [
    "DatasetError",
    "conform",
    "load_shift_set",
    "ood_set_names",
    "smooth_noise",
    "transfer_set_names",
]
