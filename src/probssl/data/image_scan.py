"""One pass over a collection's images before any training: sizes, grey/colour, and unreadable files.

Why a pass at all: a source must know its channel count (any colour image makes the whole collection
RGB, in every split alike) and its image size before the first ``read``, and with
``data.skip_corrupt`` it must know which items are unreadable before its length is fixed — otherwise
the data order could not be a pure function of (seed, epoch).

Cost: by default only headers are parsed (no pixel decoding), and the first unreadable file stops
the pass with an error naming it. With ``skip_corrupt`` every image is fully decoded once, since a
truncated JPEG has a perfect header; the unreadable ones are recorded. Either result is cached under
the collection's identity, so later runs pay nothing until a file changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from probssl.data import _formats, decode_cache
from probssl.data.file_source import FileSource, Items, corrupt_image_error

__all__ = ["Scan", "scan_items"]

_VERSION = 1


@dataclass
class Scan:
    """Per item: width, height, grey; and ``bad`` = {item position: why it cannot be read}."""

    width: np.ndarray
    height: np.ndarray
    grey: np.ndarray
    bad: dict[int, str]


def _load(path: os.PathLike[str], n: int) -> Scan | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != _VERSION or len(z["width"]) != n:
                return None
            bad = {int(i): str(r) for i, r in zip(z["bad_index"], z["bad_reason"], strict=True)}
            return Scan(z["width"].copy(), z["height"].copy(), z["grey"].copy(), bad)
    except (OSError, ValueError, KeyError):
        return None


def scan_items(
    items: Items, identity: str, full: bool, cache_dir: str | os.PathLike[str] | None = None
) -> Scan:
    """Scan every item (headers only, or ``full`` decodes); cached per (identity, full).

    Without ``full`` an unreadable item raises :class:`~probssl.data.file_source.CorruptImageError`.
    """
    n = len(items.names)
    path = decode_cache.cache_path(
        "scan", decode_cache.digest(identity, items.names, full), ".npz", cache_dir
    )
    cached = _load(path, n) if path.is_file() else None
    if cached is not None:
        return cached
    reader = FileSource("scan", "all", items, np.full(n, -1), [], 3, 1, identity, "")
    width, height = np.zeros(n, np.int32), np.zeros(n, np.int32)
    grey = np.zeros(n, bool)
    bad: dict[int, str] = {}
    for i in range(n):
        try:
            width[i], height[i], grey[i] = _formats.image_header(reader.raw(i), decode=full)
        except (_formats.FormatError, OSError) as e:
            if not full:
                raise corrupt_image_error(items.names[i], str(e)) from e
            bad[i] = str(e)
    scan = Scan(width, height, grey, bad)
    order = sorted(bad)

    def write(tmp: os.PathLike[str]) -> None:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                version=np.int64(_VERSION),
                width=width,
                height=height,
                grey=grey,
                bad_index=np.asarray(order, np.int64),
                bad_reason=np.asarray([bad[i] for i in order], dtype=str),
            )

    decode_cache.atomic_write(path, write, required=False)  # type: ignore[arg-type]
    return scan
