"""Images read straight out of a tar file, with no extraction.

Why no extraction: an uncompressed tar stores every member's bytes contiguously, so an index of
(name, offset, size) is all a reader needs; ``os.pread`` at that offset is one system call per image,
safe to share across DataLoader worker processes, and writes nothing to disk. A compressed tar
(gzip, bzip2, xz) has no random access, so it is decompressed once into the cache directory (a plain
``.tar`` again, written atomically) and read the same way: nothing is ever unpacked member by
member, so no member name can place a file anywhere, let alone outside the cache.

Members are still policed, because a tar that tries it is not an image collection to trust: an
absolute path, a ``..`` component, a symbolic or hard link, or a device/FIFO/sparse member refuses
the whole tar with :class:`UnsafeTarError`.

The index of a large tar takes seconds to build (CIFAR-10's 60,000 members: ~4-6 s), so it is
cached in the cache directory keyed by the tar's path, size and mtime.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from probssl.data import decode_cache

__all__ = ["TarIndex", "UnsafeTarError", "check_member", "index_tar", "plain_tar"]

_INDEX_VERSION = 1
_COMPRESSED = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}


class UnsafeTarError(ValueError):
    """A tar member would escape the folder it belongs to, or is not a plain file or folder."""


@dataclass(frozen=True)
class TarIndex:
    """The regular-file members of a plain tar: names (POSIX, relative), data offsets and sizes."""

    path: Path  # the plain tar read from: the user's file, or its decompressed copy in the cache
    names: list[str]
    dirs: list[str]
    offsets: np.ndarray  # int64
    sizes: np.ndarray  # int64


def check_member(member: tarfile.TarInfo) -> None:
    """Refuse a member with an absolute path, a '..' component, or that is anything but a file/folder."""
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts:
        raise UnsafeTarError(f"member '{name}' has an absolute path or '..'")
    if member.issym() or member.islnk():
        raise UnsafeTarError(f"member '{name}' is a link (to '{member.linkname}')")
    if not (member.isfile() or member.isdir()) or member.issparse():
        raise UnsafeTarError(f"member '{name}' is a device, FIFO or sparse file, not an image")


def _compression(path: Path) -> object | None:
    with open(path, "rb") as f:
        head = f.read(6)
    return next((opener for magic, opener in _COMPRESSED.items() if head.startswith(magic)), None)


def plain_tar(path: Path, cache_dir: Path | None = None) -> Path:
    """``path`` itself if it is an uncompressed tar, else its decompressed copy in the cache."""
    opener = _compression(path)
    if opener is None:
        return path
    target = decode_cache.cache_path("tars", decode_cache.file_key(path), ".tar", cache_dir)
    if target.is_file():
        return target

    def write(tmp: Path) -> None:
        with opener(path, "rb") as src, open(tmp, "wb") as dst:  # type: ignore[operator]
            while True:
                try:
                    chunk = src.read(1 << 20)
                except (EOFError, OSError, lzma.LZMAError, zlib.error) as e:  # reading: a damaged stream
                    # the caller says "damaged or truncated"; this says where
                    raise tarfile.ReadError(f"compressed stream: {e}") from e
                if not chunk:
                    return
                dst.write(chunk)  # writing: an OSError here is the cache's problem, reported as such

    decode_cache.atomic_write(target, write)
    return target


def _scan(plain: Path) -> tuple[list[str], list[str], list[int], list[int]]:
    names, dirs, offsets, sizes = [], [], [], []
    with tarfile.open(plain, "r:") as tar:
        for member in tar:
            check_member(member)
            name = PurePosixPath(member.name).as_posix()  # drops a leading "./" and a trailing "/"
            if member.isdir():
                dirs.append(name)
                continue
            names.append(name)
            offsets.append(member.offset_data)
            sizes.append(member.size)
    return names, dirs, offsets, sizes


def index_tar(path: Path, cache_dir: Path | None = None) -> TarIndex:
    """Index of the tar at ``path`` (any of plain/gzip/bzip2/xz), built once and cached.

    Raises :class:`UnsafeTarError` for a malicious member and ``tarfile.TarError`` for a damaged tar.
    """
    key = decode_cache.file_key(path)
    cache = decode_cache.cache_path("tar-index", key, ".npz", cache_dir)
    plain = plain_tar(path, cache_dir)
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if int(z["version"]) == _INDEX_VERSION:
                    return TarIndex(
                        plain, z["names"].tolist(), z["dirs"].tolist(), z["offsets"].copy(), z["sizes"].copy()
                    )
        except (OSError, ValueError, KeyError):
            pass  # an unreadable index is rebuilt below
    names, dirs, offsets, sizes = _scan(plain)
    index = TarIndex(plain, names, dirs, np.asarray(offsets, np.int64), np.asarray(sizes, np.int64))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                version=np.int64(_INDEX_VERSION),
                names=np.asarray(names, dtype=str),
                dirs=np.asarray(dirs, dtype=str),
                offsets=index.offsets,
                sizes=index.sizes,
            )

    decode_cache.atomic_write(cache, write, required=False)
    return index


def read_member(fd: int, offset: int, size: int) -> bytes:
    """The bytes of one member, by absolute offset (independent of any shared file position)."""
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(f"short read: {len(data)} of {size} bytes (the tar was truncated after indexing)")
    return data
