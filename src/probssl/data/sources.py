"""What every image source offers the input pipelines: a length, labels, and one decoded image per index.

Two input paths sit behind this one interface (issue "own images at any scale"): the *in-memory* path
decodes every item once into a uint8 array (cached on disk) and indexes it; the *streaming* path has
DataLoader workers call :meth:`ImageSource.read` per batch. Because both read the same items through the
same ``read``, they produce identical batches for the same index order — which is what keeps the data
order a pure function of (seed, epoch) and ``--resume`` bit-exact in either mode.

A source must be picklable (DataLoader workers receive a copy): open files lazily, per process.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["ArraySource", "ImageSource"]


@runtime_checkable
class ImageSource(Protocol):
    """One split of an image collection, decoded lazily.

    ``read(i)`` returns uint8 ``[C, H, W]`` with ``C == channels`` and ``H == W == image_size``: the
    source owns decoding, colour conversion (grey/RGB mixed -> RGB) and resizing, so every consumer
    sees the same pixels. ``labels`` is int64 ``[N]`` with -1 for unlabelled items; ``item_id(i)`` is a
    stable, human-readable identity (a path or a tar member name) for error messages and ``embed``.
    """

    name: str
    split: str
    classes: list[str]
    channels: int
    image_size: int

    def __len__(self) -> int: ...

    @property
    def labels(self) -> np.ndarray: ...

    def item_id(self, index: int) -> str: ...

    def read(self, index: int) -> np.ndarray: ...


class ArraySource:
    """An :class:`ImageSource` over images already in memory (the built-in datasets, tests)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: list[str],
        name: str,
        split: str,
        ids: list[str] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[2] != images.shape[3]:
            shape = list(images.shape)
            raise ValueError(f"images must be square uint8 [N, C, H, W], got {images.dtype} {shape}")
        self._images = images.contiguous()
        self._labels = labels.to(torch.int64).numpy()
        self.classes, self.name, self.split = list(classes), name, split
        self.channels, self.image_size = int(images.shape[1]), int(images.shape[2])
        self._ids = None if ids is None else list(ids)  # each item's name (a path); default NAME/SPLIT[i]

    def __len__(self) -> int:
        return int(self._images.shape[0])

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def item_id(self, index: int) -> str:
        return self._ids[index] if self._ids is not None else f"{self.name}/{self.split}[{index}]"

    def read(self, index: int) -> np.ndarray:
        return self._images[index].numpy()
