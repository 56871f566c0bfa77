"""What a ``--dataset`` string names, opened as an :class:`~probssl.data.sources.ImageSource`.

A registered name (``probssl list``) wins; anything else is a path: a folder of images, a tar of one
(plain, gzip, bzip2 or xz), or one image file. The functions here are the one entry point both input
paths use:

- :func:`open_source`: a lazy source for one split (streaming reads it per batch);
- :func:`load_source` / :func:`load_dataset`: the in-memory path, the source decoded once into a
  memory-mapped uint8 array in the cache directory (an official-format set: its reader's arrays);
- :func:`resolve_dataset_info`: channels, size, classes, splits and per-channel mean/std (computed
  once from the training split for a path, cached next to the decoded images);
- :func:`decoded_nbytes`, :func:`skipped_items`: what the pipeline needs to choose a path and to
  record the images it left out.
"""

from __future__ import annotations

import dataclasses
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from probssl.data import _formats, decode_cache, image_folder, official_files, registered_folders, tar_reader
from probssl.data.catalog import (
    CATALOG,
    DatasetError,
    DatasetInfo,
    ImageDataset,
    canonical_name,
    dataset_names,
    default_data_dir,
    get_dataset_info,
)
from probssl.data.file_source import FileSource, Items
from probssl.data.image_scan import Scan, scan_items
from probssl.data.sources import ArraySource, ImageSource

__all__ = [
    "STATS_MAX_ITEMS",
    "decoded_nbytes",
    "is_path_dataset",
    "load_dataset",
    "load_source",
    "open_source",
    "resolve_dataset_info",
    "skipped_items",
]

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
STATS_MAX_ITEMS = 50_000  # mean/std from at most this many training images (a fixed seeded sample above)
_STATS_DECODE_BYTES = 1 << 30  # at most this decoded size, mean/std come from (and build) the decode cache

PathLike = str | os.PathLike[str]


def is_path_dataset(dataset: str) -> bool:
    """True unless ``dataset`` is a registered name (a registered name wins over a same-named folder)."""
    return canonical_name(str(dataset)) not in CATALOG


def is_file_dataset(dataset: str) -> bool:
    """A path or a registered image-folder set: the sources decoded from files (cached when in memory)."""
    return is_path_dataset(dataset) or registered_folders.is_folder_set(canonical_name(dataset))


def _data_root(data_dir: PathLike | None) -> Path:
    return Path(data_dir).expanduser().absolute() if data_dir is not None else default_data_dir()


def _existing_path(dataset: str) -> Path:
    if not str(dataset).strip():
        raise DatasetError("the dataset name is empty; give a registered name (probssl list) or a path")
    path = Path(dataset).expanduser().absolute()
    if not path.exists():
        raise DatasetError(
            f"unknown dataset '{dataset}': no registered name ({', '.join(dataset_names())}) and no file or "
            f"folder {path}. --dataset takes a registered name, a folder of images, a .tar of one, or an "
            "image file"
        )
    return path


def _display_name(path: Path) -> str:
    name = path.name
    for suffix in _TAR_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


# ------------------------------------------------------------------------------------------- listing


@dataclass
class _Listing:
    """Every image of a path source, as relative names (for the layout) and readable items."""

    name: str
    files: list[str]
    dirs: list[str]
    items: Items
    identity: str
    single: bool = False


def _is_tar(path: Path) -> bool:
    if path.name.lower().endswith(_TAR_SUFFIXES):
        return True
    if path.suffix.lower() in _formats.IMAGE_SUFFIXES:
        return False
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _list_dir(path: Path) -> _Listing:
    files, dirs, stats = image_folder.walk(path)
    n, root = len(files), os.fspath(path) + os.sep
    items = Items(
        [root + f for f in files], np.full(n, -1, np.int32), np.zeros(n, np.int64), np.zeros(n, np.int64)
    )
    identity = decode_cache.digest("dir", str(path), [(f, *stats[f]) for f in files])
    return _Listing(path.name, files, dirs, items, identity)


def _list_tar(path: Path, cache_dir: PathLike | None) -> _Listing:
    try:
        index = tar_reader.index_tar(path, Path(cache_dir) if cache_dir is not None else None)
    except tar_reader.UnsafeTarError as e:
        raise DatasetError(
            f"refusing {path}: {e}. A tar of images may hold only plain files and folders with relative "
            f"names; re-create it from the folder, e.g. tar -cf images.tar -C PARENT FOLDER"
        ) from e
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DatasetError(f"cannot read {path} as a tar: it is damaged or truncated ({e})") from e
    images = [i for i, n in enumerate(index.names) if image_folder.is_image_name(n)]
    files = [index.names[i] for i in images]
    _, rel, dirs = image_folder.strip_single_top(files, index.dirs)
    idx = np.asarray(images, np.int64)
    items = Items(
        [f"{path}:{f}" for f in files],
        np.zeros(len(files), np.int32),
        index.offsets[idx] if len(idx) else np.zeros(0, np.int64),
        index.sizes[idx] if len(idx) else np.zeros(0, np.int64),
        [str(index.path)],
    )
    return _Listing(
        _display_name(path), rel, dirs, items, decode_cache.digest("tar", decode_cache.file_key(path))
    )


def _list_path(path: Path, cache_dir: PathLike | None) -> _Listing:
    if path.is_dir():
        return _list_dir(path)
    if _is_tar(path):
        return _list_tar(path, cache_dir)
    if path.suffix.lower() in _formats.IMAGE_SUFFIXES:
        items = Items([str(path)], np.full(1, -1, np.int32), np.zeros(1, np.int64), np.zeros(1, np.int64))
        return _Listing(
            path.stem, [path.name], [], items, decode_cache.digest("file", decode_cache.file_key(path)), True
        )
    raise DatasetError(
        f"{path} is neither a folder, a tar nor an image file "
        f"({', '.join(sorted(_formats.IMAGE_SUFFIXES))}); "
        "--dataset takes a registered name, a folder of images, a .tar of one, or an image file"
    )


def _layout(listing: _Listing, where: Path) -> image_folder.Layout:
    if listing.single:
        return image_folder.Layout([], {"all": (np.zeros(1, np.int64), np.full(1, -1, np.int64))})
    try:
        return image_folder.plan_layout(listing.files, listing.dirs, str(where))
    except image_folder.LayoutError as e:
        raise DatasetError(str(e)) from e


def _channels_and_size(listing: _Listing, scan: Scan, image_size: int | None, where: Path) -> tuple[int, int]:
    """Any colour image makes the collection RGB; without ``image_size`` one square size is required."""
    good = np.asarray([i for i in range(len(listing.items.names)) if i not in scan.bad], np.int64)
    if len(good) == 0:
        raise DatasetError(f"no readable image under {where}; every file failed to decode")
    channels = 1 if bool(np.all(scan.grey[good])) else 3
    if image_size is not None:
        return channels, int(image_size)
    sizes = {(int(scan.width[i]), int(scan.height[i])): int(i) for i in good[::-1]}
    if len(sizes) > 1:
        examples = ", ".join(f"{w}x{h} ({listing.items.names[i]})" for (w, h), i in sorted(sizes.items())[:3])
        raise DatasetError(
            f"the images under {where} have different sizes: {examples}; pass --image-size N "
            f"(data.image_size=N) to resize every image (shorter side to N, then the centre N x N)"
        )
    ((w, h),) = sizes
    if w != h:
        raise DatasetError(
            f"the images under {where} are {w}x{h}, not square; pass --image-size N (data.image_size=N) "
            f"to resize them (shorter side to N, then the centre N x N)"
        )
    return channels, w


def _open_path(
    dataset: str, split: str, image_size: int | None, skip_corrupt: bool, cache_dir: PathLike | None
) -> FileSource:
    path = _existing_path(dataset)
    listing = _list_path(path, cache_dir)
    layout = _layout(listing, path)
    if split not in layout.splits:
        raise DatasetError(f"unknown split '{split}' for {path}; valid splits: {', '.join(layout.splits)}")
    scan = scan_items(listing.items, listing.identity, skip_corrupt, cache_dir)
    channels, size = _channels_and_size(listing, scan, image_size, path)
    positions, labels = layout.splits[split]
    skipped = [listing.items.names[i] for i in positions if int(i) in scan.bad]
    if skipped:
        keep = np.asarray([k for k, i in enumerate(positions) if int(i) not in scan.bad], np.int64)
        positions, labels = positions[keep], labels[keep]
    location = decode_cache.digest(str(path), split)
    return FileSource(
        listing.name,
        split,
        listing.items.take(positions),
        labels,
        layout.classes,
        channels,
        size,
        listing.identity,
        location,
        skipped,
    )


# ------------------------------------------------------------------------------------------ public


def _array_source(
    name: str, split: str, data_dir: PathLike | None, download: bool, image_size: int | None
) -> ArraySource:
    ds = official_files.load_official(name, split, data_dir, download, image_size)
    return ArraySource(ds.images, ds.labels, ds.classes, ds.name, ds.split)


def open_source(
    dataset: str,
    split: str,
    *,
    data_dir: PathLike | None = None,
    image_size: int | None = None,
    download: bool = True,
    verify: bool = True,
    skip_corrupt: bool = False,
    cache_dir: PathLike | None = None,
) -> ImageSource:
    """One split of ``dataset`` (a registered name or a path) as an :class:`ImageSource`.

    Registered image-folder sets and paths give a lazy, picklable source whose ``read(i)`` decodes one
    image; the built-in array sets (digits, MNIST, CIFAR pickles, ...) give an :class:`ArraySource` over
    :func:`load_dataset`. ``image_size`` N resizes (shorter side to N, centre crop). With
    ``skip_corrupt`` every image is decoded once up front (cached) and the unreadable ones are left
    out; :func:`skipped_items` lists them. ``cache_dir``: see :mod:`probssl.data.decode_cache`.
    """
    if image_size is not None and int(image_size) <= 0:
        raise DatasetError(f"image_size must be positive, got {image_size}")
    if is_path_dataset(dataset):
        return _open_path(dataset, split, image_size, skip_corrupt, cache_dir)
    name = canonical_name(dataset)
    if registered_folders.is_folder_set(name):
        return registered_folders.open_folder_set(
            name, split, _data_root(data_dir), image_size, verify, skip_corrupt, _str(cache_dir)
        )
    return _array_source(name, split, data_dir, download, image_size)


def _str(path: PathLike | None) -> str | None:
    return None if path is None else os.fspath(path)


def decoded_nbytes(source: ImageSource) -> int:
    """Bytes of the whole source decoded: N * C * H * W (what the in-memory path would hold)."""
    return len(source) * source.channels * source.image_size * source.image_size


def skipped_items(source: ImageSource) -> list[str]:
    """The items left out as unreadable (``skip_corrupt``), by name; empty for every other source."""
    return list(getattr(source, "skipped", []))


def decoded_images(source: ImageSource, cache_dir: PathLike | None = None) -> np.ndarray:
    """uint8 [N, C, S, S] of ``source``: an array source's own memory, a file source's cached decode."""
    if isinstance(source, ArraySource):
        return source._images.numpy()  # noqa: SLF001 - same package
    if isinstance(source, FileSource):
        return decode_cache.decoded_array(source, source.name, source.location, source.content_key, cache_dir)
    images = np.empty((len(source), source.channels, source.image_size, source.image_size), np.uint8)
    for i in range(len(source)):
        images[i] = source.read(i)
    return images


def load_source(source: ImageSource, cache_dir: PathLike | None = None) -> ImageDataset:
    """The in-memory path: ``source`` decoded once (cached on disk, memory-mapped) as an ImageDataset."""
    images = decoded_images(source, cache_dir)
    labels = torch.from_numpy(np.array(source.labels, dtype=np.int64))
    return ImageDataset(source.name, source.split, torch.from_numpy(images), labels, list(source.classes))


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: PathLike | None = None,
    download: bool = True,
    *,
    image_size: int | None = None,
    verify: bool = True,
    skip_corrupt: bool = False,
    cache_dir: PathLike | None = None,
) -> ImageDataset:
    """Load one split of a dataset into memory: a registered name, or a path to images.

    ``data_dir`` defaults to :func:`~probssl.data.catalog.default_data_dir`; files live in
    ``data_dir/<name>/``. With ``download=False`` the network is never touched and a missing file
    raises :class:`DatasetError` naming the file, where to put it and where to get it.

    A path (folder, tar, image file) or a registered image-folder set is decoded once into a uint8
    array cached on disk and memory-mapped; ``image_size``, ``verify``, ``skip_corrupt`` and
    ``cache_dir`` apply to those. ``image_size`` also resizes an array set (shorter side + centre crop,
    like any image).
    """
    if is_file_dataset(name):
        source = open_source(
            name,
            split,
            data_dir=data_dir,
            image_size=image_size,
            verify=verify,
            skip_corrupt=skip_corrupt,
            cache_dir=cache_dir,
        )
        return load_source(source, cache_dir)
    return official_files.load_official(get_dataset_info(name).name, split, data_dir, download, image_size)


# ------------------------------------------------------------------------------------- mean / std


def channel_stats(
    source: ImageSource, cache_dir: PathLike | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``source``'s pixels scaled to [0, 1].

    Computed in float64 over every image up to :data:`STATS_MAX_ITEMS` (a fixed seeded sample above:
    normalisation constants do not need more), from the decode cache when the whole source is at most
    1 GiB decoded (building it, which the in-memory path then reuses), else by reading images one by one.
    A file source's result is cached under its content key.
    """
    record = None
    if isinstance(source, FileSource):
        record = decode_cache.cache_path("stats", source.content_key, ".json", cache_dir)
        cached = decode_cache.read_json(record)
        if isinstance(cached, dict) and "mean" in cached:
            return tuple(cached["mean"]), tuple(cached["std"])
    n = len(source)
    if n == 0:
        raise DatasetError(f"{source.name} split '{source.split}' has no images to compute mean/std from")
    picks = np.arange(n)
    if n > STATS_MAX_ITEMS:
        picks = np.sort(np.random.default_rng(0).choice(n, STATS_MAX_ITEMS, replace=False))
    images = decoded_images(source, cache_dir) if decoded_nbytes(source) <= _STATS_DECODE_BYTES else None
    total = np.zeros(source.channels)
    total_sq = np.zeros(source.channels)
    for start in range(0, len(picks), 1024):
        chunk = picks[start : start + 1024]
        block = images[chunk] if images is not None else np.stack([source.read(int(i)) for i in chunk])
        x = block.astype(np.float64) / 255.0
        total += x.sum(axis=(0, 2, 3))
        total_sq += (x * x).sum(axis=(0, 2, 3))
    count = len(picks) * source.image_size * source.image_size
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    result = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if record is not None:
        decode_cache.write_json(record, {"mean": result[0], "std": result[1], "items": len(picks)})
    return result


def resolve_dataset_info(
    dataset: str,
    *,
    data_dir: PathLike | None = None,
    image_size: int | None = None,
    verify: bool = True,
    skip_corrupt: bool = False,
    cache_dir: PathLike | None = None,
) -> DatasetInfo:
    """Static facts about ``dataset`` as the run will see it.

    A registered name at its own size gives its table entry (``probssl list``); at another
    ``image_size`` a folder set's mean/std are recomputed from its training split, while an array
    set keeps its published values (resizing barely moves them). A path gets channels, size, classes
    and splits from its files and mean/std from its training split (split ``all`` for a single image).
    """
    if not is_path_dataset(dataset):
        info = get_dataset_info(dataset)
        if image_size is None or int(image_size) == info.image_size:
            return info
        if not registered_folders.is_folder_set(info.name):
            return dataclasses.replace(info, image_size=int(image_size))
    stats_split = "train"
    if is_path_dataset(dataset):
        path = _existing_path(dataset)
        if not path.is_dir() and not _is_tar(path):
            stats_split = "all"
    elif "train" not in get_dataset_info(dataset).splits:
        stats_split = "all"
    source = open_source(
        dataset,
        stats_split,
        data_dir=data_dir,
        image_size=image_size,
        verify=verify,
        skip_corrupt=skip_corrupt,
        cache_dir=cache_dir,
    )
    mean, std = channel_stats(source, cache_dir)
    if is_path_dataset(dataset):
        splits = ("all",) if stats_split == "all" else ("train", "test", "all")
        name = source.name
    else:
        splits, name = get_dataset_info(dataset).splits, get_dataset_info(dataset).name
    return DatasetInfo(name, source.channels, source.image_size, len(source.classes), splits, mean, std)
