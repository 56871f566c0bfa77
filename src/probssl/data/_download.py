"""File plumbing for the dataset readers: checksums, downloads and archive extraction.

Nothing here knows about datasets or user-facing advice; failures raise :class:`DownloadError` or
:class:`UnsafeArchiveError` and :mod:`probssl.data.official_files` turns them into messages that say what
to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from urllib.request import urlopen  # module attribute on purpose: tests monkeypatch it

from probssl.io import default_file_mode

logger = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 10.0
_CHUNK = 1 << 20

# (resolved path, size, mtime_ns) -> md5 hex. Keyed on size and mtime so a replaced file is re-hashed,
# while repeated loads of the same large file (CIFAR, SVHN archives) do not pay for hashing again.
_MD5_CACHE: dict[tuple[str, int, int], str] = {}


class DownloadError(RuntimeError):
    """A download did not produce a verified file (network failure, unwritable folder, bad md5)."""


class UnsafeArchiveError(RuntimeError):
    """An archive member would land outside the extraction folder or is not a plain file/folder."""


def _cache_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def file_md5(path: Path) -> str:
    """MD5 of a file, cached per (path, size, mtime) so repeated loads of a large file hash it once."""
    key = _cache_key(path)
    cached = _MD5_CACHE.get(key)
    if cached is None:
        h = hashlib.md5()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        cached = _MD5_CACHE[key] = h.hexdigest()
    return cached


def download_file(url: str, dest: Path, md5: str | None, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch ``url`` to ``dest`` via a temp file in the same folder, so a partial download never looks done.

    The connection is opened before anything is written, so an offline attempt leaves no trace on disk.
    The md5 is checked before the rename; a mismatching download is deleted.
    """
    tmp_name: str | None = None
    try:
        logger.info("downloading %s to %s", url, dest)
        with urlopen(url, timeout=timeout) as response:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", delete=False) as tmp:
                tmp_name = tmp.name
                h = hashlib.md5()
                while chunk := response.read(_CHUNK):
                    h.update(chunk)
                    tmp.write(chunk)
        actual = h.hexdigest()
        if md5 is not None and actual != md5:
            raise DownloadError(f"the downloaded file has md5 {actual}, expected {md5}; it was deleted")
        os.chmod(tmp_name, default_file_mode())  # NamedTemporaryFile is 0600; datasets are shared
        os.replace(tmp_name, dest)
        tmp_name = None
        return dest
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError and timeouts are OSErrors
        raise DownloadError(f"{type(e).__name__}: {e}") from e
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts or "\\" in name:
        raise UnsafeArchiveError(f"member '{name}' has an absolute path or '..'; refusing to extract")
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"member '{name}' is a link or special file; refusing to extract")


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive into ``dest``, refusing path traversal, links and device files.

    Members are unpacked into a temporary folder next to ``dest`` and moved into place one top-level
    entry at a time, so an interrupted extraction does not leave a half-filled dataset folder.
    """
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member)
            tar.extractall(staging, members=members, filter="data")
        for entry in staging.iterdir():
            target = dest / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(entry, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
