"""Images handed over in memory — a uint8 tensor or array, a list of Pillow images or of image files — as
an :class:`~probssl.data.sources.ArraySource` at a run's image size (``probssl.embed_images``).

Why: a Python user who already holds the pixels (a camera frame, a batch from another pipeline) should
not have to write them to a folder to embed them. They get the same conversion as a folder's files: a
Pillow image goes through :func:`~probssl.data._formats.image_to_array` (16-bit grey scaled, EXIF
rotation, shorter side resized and centre-cropped), an array through
:func:`~probssl.data._formats.resize_images`, the same resize and crop. Channel matching (grey <-> RGB)
is left to the caller, per batch, as for every other source.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probssl.data import _formats
from probssl.data.catalog import DatasetError
from probssl.data.file_source import corrupt_image_error
from probssl.data.sources import ArraySource

__all__ = ["GIVEN", "images_in_memory", "is_in_memory"]

#: What :func:`images_in_memory` takes, for error messages.
GIVEN = (
    "an image folder, a .tar of one or an image file (a path), uint8 pixels [N, C, H, W] (a torch tensor "
    "or numpy array, C = 1 or 3), or a list of Pillow images or image paths"
)


def is_in_memory(images: object) -> bool:
    """True for what :func:`images_in_memory` reads: an array or tensor, or a list / tuple."""
    return isinstance(images, torch.Tensor | np.ndarray | list | tuple)


def images_in_memory(images: Any, image_size: int) -> ArraySource:
    """``images`` as uint8 [N, C, image_size, image_size], labels -1, each item named by its path (files,
    and Pillow images opened from one) or ``images[i]``. An array keeps its ``C``; a list is grey when
    every image is, else RGB, as a folder's images are."""
    if isinstance(images, torch.Tensor | np.ndarray):
        pixels = _pixel_array(images)
        names = [f"images[{i}]" for i in range(len(pixels))]
        if pixels.shape[2:] != (image_size, image_size):
            pixels = _formats.resize_images(pixels, image_size)
    elif isinstance(images, list | tuple):
        if not images:
            raise DatasetError(f"no images given (an empty {type(images).__name__}); pass {GIVEN}")
        pixels, names = _listed(list(images), image_size)
    else:
        raise TypeError(f"cannot read images from a {type(images).__name__}; pass {GIVEN}")
    labels = torch.full((len(pixels),), -1, dtype=torch.int64)
    return ArraySource(torch.from_numpy(pixels), labels, [], "images", "given", ids=names)


def _pixel_array(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """A uint8 [N, C, H, W] numpy array with C 1 or 3, or an error saying how to get one."""
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    shape = list(array.shape)
    if array.dtype != np.uint8:
        raise DatasetError(
            f"images must be uint8 pixels (0-255), got {array.dtype} {shape}: the run's resizing and "
            "normalisation are applied here (normalised float images go to load_run(run).method.embed)"
        )
    if array.ndim == 3:
        raise DatasetError(
            f"images must be [N, C, H, W], got {shape}; one image: add its batch axis, images[None]"
        )
    if array.ndim != 4 or array.shape[1] not in (1, 3) or 0 in array.shape[2:]:
        last = " (channels last: images.permute(0, 3, 1, 2) / np.transpose(images, (0, 3, 1, 2)))"
        hint = last if array.ndim == 4 and array.shape[-1] in (1, 3) else ""
        raise DatasetError(f"images must be [N, C, H, W] with C = 1 (grey) or 3 (RGB), got {shape}{hint}")
    return np.ascontiguousarray(array)


def _listed(items: list[Any], image_size: int) -> tuple[np.ndarray, list[str]]:
    """Pillow images and image paths, each converted like a folder's file."""
    from PIL import Image

    for i, item in enumerate(items):
        if not isinstance(item, Image.Image | str | os.PathLike):
            kind = type(item).__name__
            raise TypeError(f"images[{i}] is a {kind}; a list must hold Pillow images or image paths")
    items = [item if isinstance(item, Image.Image) else _file(item, i) for i, item in enumerate(items)]
    channels = 1 if all(_is_grey(item) for item in items) else 3
    pixels, names = [], []
    for i, item in enumerate(items):
        if isinstance(item, Image.Image):
            pixels.append(_formats.image_to_array(item, channels, image_size))
            names.append(getattr(item, "filename", "") or f"images[{i}]")
            continue
        path = item
        try:
            pixels.append(_formats.decode_image(path, channels, image_size))
        except _formats.FormatError as e:
            raise corrupt_image_error(str(path), str(e)) from e
        names.append(str(path))
    return np.stack(pixels), names


def _file(item: str | os.PathLike[str], index: int) -> Path:
    path = Path(item).expanduser().absolute()
    if not path.is_file():
        raise DatasetError(f"images[{index}]: {path} is not a file")
    return path


def _is_grey(item: Any) -> bool:
    """Whether a Pillow image or an image file (a checked path) has no colour (its header; the file is
    not decoded)."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item.mode in _formats._GRAY_MODES  # what a folder's header scan decides by
    path = item
    try:
        return _formats.image_header(path)[2]
    except _formats.FormatError as e:
        raise corrupt_image_error(str(path), str(e)) from e
