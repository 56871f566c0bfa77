"""The on-disk cache of decoded images (and of the small facts learned while reading them).

Why a cache: decoding 60,000 JPEGs takes tens of seconds, and every run on the same images would pay
it again. A source is decoded once into one uint8 ``.npy`` of shape [N, C, S, S]; later runs open it
memory-mapped, which starts in well under a second whatever the size, and only touches the pages a
batch needs.

Keys: every entry is named by a hash of what determines its content — for a decoded array, the
source's identity (the path, size and mtime of every file, or of the tar), the items of the split,
the image size, the channel count and the decoder's version (``_formats.DECODER_VERSION``).
Changing, adding or removing a file changes the key, so the stale entry is never read again (and is
deleted when its replacement is written).

Writes are atomic (a temp file in the same folder, fsync, rename), so a decode killed half-way leaves
at worst a temp file, never a cache entry that looks complete. A decode holds a lock file beside its
entry, so processes that need the same new entry at once (DDP ranks) decode it once.

Location: ``data.cache_dir``, else ``$PROBSSL_CACHE``, else ``~/.cache/probssl``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from probssl.data._formats import DECODER_VERSION
from probssl.data.catalog import DatasetError
from probssl.io import atomic_write as _atomic_write
from probssl.io import read_json  # a cache miss (None), never an error

logger = logging.getLogger(__name__)

__all__ = [
    "cache_path",
    "cache_root",
    "decoded_array",
    "file_key",
    "read_json",
    "write_json",
]


class _Decodable(Protocol):
    channels: int
    image_size: int

    def __len__(self) -> int: ...

    def read(self, index: int) -> np.ndarray: ...


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir`` if given, else ``$PROBSSL_CACHE``, else ``~/.cache/probssl`` (absolute)."""
    if cache_dir is None:
        cache_dir = os.environ.get("PROBSSL_CACHE") or Path.home() / ".cache" / "probssl"
    return Path(cache_dir).expanduser().absolute()


def digest(*parts: Any) -> str:
    """A short, stable hex key of JSON-able parts (20 hex digits: collisions are not a concern here)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_key(path: Path) -> str:
    """Key of one file's identity: its resolved path, size and mtime (ns)."""
    st = path.stat()
    return digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


def cache_path(kind: str, key: str, suffix: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return cache_root(cache_dir) / kind / f"{key}{suffix}"


def atomic_write(path: Path, write: Callable[[Path], None], required: bool = True) -> bool:
    """``write(tmp)`` then fsync and rename over ``path`` (see :func:`probssl.io.atomic_write`).

    A cache that cannot be written (full disk, read-only folder) is a user-fixable problem: a
    ``required`` entry raises :class:`DatasetError` saying so; an optional one (a memo that only saves
    time) is skipped with a warning and False is returned.
    """
    try:
        _atomic_write(path, write)
        return True
    except OSError as e:
        if not required:
            logger.warning("could not write the cache entry %s (%s); continuing without it", path, e)
            return False
        raise DatasetError(
            f"cannot write {path} ({e.strerror or e}); free space there, or point data.cache_dir "
            f"(or $PROBSSL_CACHE) at a writable folder with room"
        ) from e


def write_json(path: Path, data: Any) -> None:
    """A small memo (a checksum, mean/std): best effort, never fatal."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data)), required=False)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60] or "source"


def decoded_array(
    source: _Decodable,
    name: str,
    location_key: str,
    content_key: str,
    cache_dir: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """All of ``source`` decoded into uint8 [N, C, S, S], from the cache or decoded now and cached.

    ``location_key`` names where the source lives (so an entry replaced by a newer decode of the same
    place is found and removed); ``content_key`` names what it holds. The result is a copy-on-write
    memory map: writable for the caller, never written back to the cache.
    """
    content_key = f"{content_key}d{DECODER_VERSION}"  # a decoder that changed pixels misses old entries
    folder = cache_root(cache_dir) / "decoded"
    shape = (len(source), source.channels, source.image_size, source.image_size)
    # Entries of one place at one size/channel count replace each other; other sizes stay cached.
    prefix = f"{_slug(name)}-{location_key}-{shape[2]}px{shape[1]}c-"
    path = folder / f"{prefix}{content_key}.npy"
    cached = _load_decoded(path, shape)
    if cached is not None:
        return cached

    def write(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        for i in range(shape[0]):
            out[i] = source.read(i)
        out.flush()
        del out

    # DDP ranks (or two runs) meeting a new folder at once: one decodes, the others wait for it and
    # then read its entry, instead of each decoding the whole set.
    with _exclusive(folder / f"{prefix}{content_key}.lock"):
        cached = _load_decoded(path, shape)
        if cached is not None:
            return cached
        logger.info("decoding %d images of %s once into %s", shape[0], name, path)
        atomic_write(path, write)
        for stale in folder.glob(f"{prefix}*.npy"):
            if stale != path:
                with contextlib.suppress(OSError):
                    stale.unlink()
    return np.load(path, mmap_mode="c", allow_pickle=False)


def _load_decoded(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached decode at ``path`` (copy-on-write memory map); None if missing, unreadable or reshaped."""
    if not path.is_file():
        return None
    try:
        cached = np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError):
        return None  # unreadable: decode again
    return cached if cached.shape == shape and cached.dtype == np.uint8 else None


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock`` (created if needed); a no-op where there is no fcntl
    (Windows) or the folder cannot hold the lock file — then concurrent decodes only cost time."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a")  # noqa: SIM115 - held for the duration of the block
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
