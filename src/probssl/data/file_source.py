"""A lazy :class:`~probssl.data.sources.ImageSource` over image files: in folders or inside tars.

An item is either a file path or (tar, offset, size); ``read(i)`` fetches its bytes and decodes them
with :func:`probssl.data._formats.decode_image` to the source's channels and size. Nothing is open
until the first read, and pickling drops the open tar handles, so each DataLoader worker opens its
own (reads use ``os.pread``, which has no shared file position either way).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from probssl.data import _formats, tar_reader
from probssl.data.catalog import DatasetError

__all__ = ["CorruptImageError", "FileSource", "Items", "corrupt_image_error"]


SKIP_HINT = (
    "fix or remove this file, or set data.skip_corrupt=true to skip unreadable images "
    "(they are then counted and listed in the run directory)"
)


class CorruptImageError(DatasetError):
    """One image could not be read or decoded; ``item`` names it.

    The constructor also takes the bare message, as DataLoader workers re-raise exceptions that way.
    """

    def __init__(self, message: str, item: str | None = None) -> None:
        super().__init__(message)
        self.item = item


def corrupt_image_error(item: str, reason: str) -> CorruptImageError:
    return CorruptImageError(f"cannot read image {item}: {reason}; {SKIP_HINT}", item)


@dataclass
class Items:
    """Where each item's bytes live: ``tars[archive[i]]`` at ``offsets[i]`` (size ``sizes[i]``), or, for
    ``archive[i] == -1``, the file ``names[i]``. ``names`` are display names (paths or tar:member)."""

    names: list[str]
    archive: np.ndarray  # int32, -1 = a plain file
    offsets: np.ndarray  # int64
    sizes: np.ndarray  # int64
    tars: list[str] = field(default_factory=list)

    def take(self, idx: np.ndarray) -> Items:
        return Items(
            [self.names[i] for i in idx],
            self.archive[idx],
            self.offsets[idx],
            self.sizes[idx],
            list(self.tars),
        )

    @staticmethod
    def concat(parts: list[Items]) -> Items:
        tars: list[str] = []
        archives = []
        for part in parts:
            archives.append(np.where(part.archive >= 0, part.archive + len(tars), -1).astype(np.int32))
            tars += part.tars
        return Items(
            [n for p in parts for n in p.names],
            np.concatenate(archives) if archives else np.zeros(0, np.int32),
            np.concatenate([p.offsets for p in parts]) if parts else np.zeros(0, np.int64),
            np.concatenate([p.sizes for p in parts]) if parts else np.zeros(0, np.int64),
            tars,
        )


class FileSource:
    """One split of a folder, tar or image file, decoded lazily to uint8 [channels, size, size].

    ``identity`` is a key of the bytes the source reads (set by whoever lists the items); together with
    the item list, channels and size it keys the decoded-image cache. ``skipped`` lists the items left
    out as unreadable (``data.skip_corrupt``).
    """

    def __init__(
        self,
        name: str,
        split: str,
        items: Items,
        labels: np.ndarray,
        classes: list[str],
        channels: int,
        image_size: int,
        identity: str,
        location: str,
        skipped: list[str] | None = None,
    ) -> None:
        self.name, self.split = name, split
        self.items = items
        self._labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.channels, self.image_size = int(channels), int(image_size)
        self.identity, self.location = identity, location
        self.skipped = list(skipped or [])
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.items.names)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def item_id(self, index: int) -> str:
        return self.items.names[index]

    def raw(self, index: int) -> bytes | Path:
        """The encoded bytes of item ``index`` (a path for a plain file: Pillow reads it directly)."""
        archive = int(self.items.archive[index])
        if archive < 0:
            return Path(self.items.names[index])
        if self._pid != os.getpid():  # forked: do not share descriptors with the parent
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(archive)
        if fd is None:
            fd = self._fds[archive] = os.open(self.items.tars[archive], os.O_RDONLY)
        return tar_reader.read_member(fd, int(self.items.offsets[index]), int(self.items.sizes[index]))

    def read(self, index: int) -> np.ndarray:
        try:
            image = _formats.decode_image(self.raw(index), self.channels, self.image_size)
        except (_formats.FormatError, OSError) as e:
            raise corrupt_image_error(self.item_id(index), str(e)) from e
        if image.shape[1:] != (self.image_size, self.image_size):
            h, w = image.shape[1:]
            raise DatasetError(
                f"{self.item_id(index)} is {w}x{h}, not {self.image_size}x{self.image_size} like the other "
                f"images; pass --image-size N (data.image_size=N) to resize every image to N x N"
            )
        return image

    @property
    def content_key(self) -> str:
        """What the decoded array depends on: the bytes, the items, their channels and size."""
        from probssl.data.decode_cache import digest

        return digest(self.identity, self.items.names, self.channels, self.image_size, "decode-v1")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = {}
