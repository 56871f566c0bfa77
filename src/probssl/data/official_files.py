"""Readers for the image benchmarks, from their official published files, into uint8 tensors.

The datasets of the catalogue (:mod:`probssl.data.catalog`) whose ``reader`` is ``official_files``:
this module knows their files (names, mirrors, md5s, formats), the catalogue everything else about
them. Every dataset comes back as one :class:`ImageDataset` holding the whole split in memory (the
largest standard split, STL-10 'unlabeled', is 2.7 GB). Files are looked up under
``data_dir/<name>/``, checked against the official md5 where one is known, parsed strictly, and
downloaded from the official mirror when missing. Every problem a user can fix raises
:class:`DatasetError` with a message saying how. ``digits`` is embedded in scikit-learn and needs no
files, so there is always a dataset that works.
"""

from __future__ import annotations

import functools
import os
import tarfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from probssl.data import _download, _formats
from probssl.data._formats import FormatError, UnsafePickleError
from probssl.data.catalog import CATALOG, DatasetError, DatasetInfo, ImageDataset, default_data_dir

__all__ = ["load_official"]

T = TypeVar("T")

_URLS = {
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
    "cifar100": "https://www.cs.toronto.edu/~kriz/",
    "svhn": "http://ufldl.stanford.edu/housenumbers/",
    "stl10": "http://ai.stanford.edu/~acoates/stl10/",
}

# Official md5 per dataset and file name. Files without an entry (e.g. the extracted STL-10 binaries,
# whose per-file checksums are not published) are checked structurally only. Un-gzipped IDX entries are
# the md5s of the decompressed official files. Tests patch this table for their tiny files.
_CHECKSUMS: dict[str, dict[str, str]] = {
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "cifar10": {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
    "cifar100": {
        "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
    "svhn": {
        "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
        "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
        "extra_32x32.mat": "a93ce644f1a588dc4d68dda5feec44a7",
    },
    "stl10": {"stl10_binary.tar.gz": "91f7769df0f17e558f3565bffb0c7dfb"},
}

_WHERE_HINT = (
    "or point data_dir (--data-dir on the command line, or the PROBSSL_DATA environment variable) "
    "at a directory that has it"
)


# ---------------------------------------------------------------------------------------- public API


def load_official(
    name: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    image_size: int | None = None,
) -> ImageDataset:
    """One split of the registered dataset ``name`` (its catalogue spelling) read from its official files.

    ``data_dir`` defaults to :func:`~probssl.data.catalog.default_data_dir`; files live in
    ``data_dir/<name>/``. With ``download=False`` the network is never touched and a missing file
    raises :class:`DatasetError` naming the file, where to put it and where to get it. ``image_size``
    resizes (shorter side + centre crop, like any image).
    """
    info = CATALOG[name].info
    if split not in info.splits:
        raise DatasetError(f"unknown split '{split}' for {info.name}; valid splits: {', '.join(info.splits)}")
    root = Path(data_dir).expanduser().absolute() if data_dir is not None else default_data_dir()
    ds = _LOADERS[info.name](info, split, root, download)
    if image_size is not None and int(image_size) != info.image_size:
        images = _formats.resize_images(ds.images.numpy(), int(image_size))
        ds = ImageDataset(ds.name, ds.split, torch.from_numpy(images), ds.labels, ds.classes)
    return ds


def _classes(info: DatasetInfo) -> list[str]:
    """The catalogue's class names of ``info``'s dataset, in label order."""
    return list(CATALOG[info.name].classes or ())


def _title(name: str) -> str:
    return CATALOG[name].title


# ------------------------------------------------------------------------------------ shared helpers


def _expected_md5(dataset: str, filename: str) -> str | None:
    return _CHECKSUMS.get(dataset, {}).get(filename)


def _verify_md5(dataset: str, path: Path, url: str) -> None:
    """Compare ``path`` with its official md5 (cached per path/size/mtime); skip files with no entry."""
    expected = _expected_md5(dataset, path.name)
    if expected is None:
        return
    actual = _download.file_md5(path)
    if actual != expected:
        raise DatasetError(
            f"{path} has md5 {actual}, but the official file has md5 {expected}: it is corrupt, truncated or "
            f"a different version. Delete it and load again with download enabled, or fetch it from {url}."
        )


def _parse(path: Path, url: str, parser: Callable[[Path], T]) -> T:
    """Run ``parser`` on ``path``, turning format errors into advice naming the file and the source."""
    try:
        return parser(path)
    except UnsafePickleError as e:
        raise DatasetError(f"{e}. Delete {path} and get the official file from {url}.") from e
    except FormatError as e:
        raise DatasetError(
            f"{path} is corrupt or not in the official format: {e}. Delete it and load again with download "
            f"enabled to fetch a fresh copy, or download it from {url}."
        ) from e
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e}") from e


def _fetch_or_fail(
    dataset: str, what: str, dest: Path, url: str, download: bool, expected: str | None = None
) -> Path:
    """Download ``url`` to ``dest``; if that is off or fails, raise the 'not found' message for ``what``.

    ``expected`` replaces the default "expected <dest> (official md5 ...)" description of what is missing.
    """
    md5 = _expected_md5(dataset, dest.name)
    if download:
        try:
            return _download.download_file(url, dest, md5)
        except _download.DownloadError as e:
            reason = f"Automatic download from {url} failed ({e})."
    else:
        reason = "Automatic download is off (download=False)."
    if expected is None:
        expected = f"{dest} (official md5 {md5})" if md5 else str(dest)
    raise DatasetError(
        f"{what} not found: expected {expected}. Download it from {url} and place it there, "
        f"{_WHERE_HINT}. {reason}"
    )


def _first_existing(paths: Sequence[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _to_dataset(
    info: DatasetInfo, split: str, images: np.ndarray, labels: np.ndarray, classes: list[str]
) -> ImageDataset:
    """Wrap numpy arrays without copying them (they are already uint8/int64 and contiguous)."""
    return ImageDataset(
        info.name,
        split,
        torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
        torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
        classes,
    )


def _check_images(info: DatasetInfo, path: Path, images: np.ndarray) -> None:
    expected = (info.channels, info.image_size, info.image_size)
    if tuple(images.shape[1:]) != expected:
        raise DatasetError(
            f"{path} holds images of shape {list(images.shape[1:])}, but {info.name} images are "
            f"{list(expected)}: it is not the official file. Delete it and fetch the official one."
        )


def _check_counts(path: Path, n_images: int, labels_path: Path, n_labels: int) -> None:
    if n_images != n_labels:
        raise DatasetError(
            f"{path} has {n_images} images but {labels_path} has {n_labels} labels: the two files do not "
            "belong together. Delete them and fetch matching official files."
        )


# -------------------------------------------------------------------------------------------- digits


@functools.cache
def _digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = np.round(bunch.data * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    return {"train": (x_tr, y_tr), "test": (x_te, y_te)}


def _load_digits(info: DatasetInfo, split: str, root: Path, download: bool) -> ImageDataset:
    """scikit-learn's 8x8 digits with a fixed stratified 70/30 split (it has no official one)."""
    x, y = _digits_split()[split]
    return _to_dataset(info, split, x.copy(), y.copy(), _classes(info))


# ----------------------------------------------------------------------------------------------- IDX

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_file(info: DatasetInfo, split: str, root: Path, stem: str, kind: str, download: bool) -> Path:
    """Locate (or download) one IDX file, preferring the official .gz over an un-gzipped copy."""
    folder = root / info.name
    found = _first_existing([folder / f"{stem}.gz", folder / stem])
    if found is not None:
        return found
    what = f"{_title(info.name)} {'training' if split == 'train' else 'test'} {kind}"
    return _fetch_or_fail(info.name, what, folder / f"{stem}.gz", _URLS[info.name] + stem + ".gz", download)


def _read_idx(info: DatasetInfo, path: Path, parser: Callable[[Path], np.ndarray]) -> np.ndarray:
    url = _URLS[info.name] + (path.name if path.suffix == ".gz" else path.name + ".gz")
    _verify_md5(info.name, path, url)
    return _parse(path, url, parser)


def _load_idx(info: DatasetInfo, split: str, root: Path, download: bool) -> ImageDataset:
    image_stem, label_stem = _IDX_FILES[split]
    image_path = _idx_file(info, split, root, image_stem, "images", download)
    label_path = _idx_file(info, split, root, label_stem, "labels", download)
    images = _read_idx(info, image_path, _formats.read_idx_images)
    labels = _read_idx(info, label_path, _formats.read_idx_labels)
    _check_images(info, image_path, images)
    _check_counts(image_path, len(images), label_path, len(labels))
    if labels.size and labels.max() >= info.num_classes:
        raise DatasetError(f"{label_path} has label {labels.max()}, outside 0..{info.num_classes - 1}")
    return _to_dataset(info, split, images, labels, _classes(info))


# ------------------------------------------------------------------------------ archive-based layouts


@dataclass(frozen=True)
class _ArchiveLayout:
    """An official tarball that unpacks into ``folder``; accepted under data_dir/<name>/ or data_dir/."""

    dataset: str
    folder: str
    archive: str

    @property
    def url(self) -> str:
        return _URLS[self.dataset] + self.archive

    def parents(self, root: Path) -> list[Path]:
        return [root / self.dataset, root]


def _extract(layout: _ArchiveLayout, archive: Path, needed: Sequence[str]) -> Path:
    try:
        _download.safe_extract(archive, archive.parent)
    except _download.UnsafeArchiveError as e:
        raise DatasetError(
            f"{archive}: {e}. It is not the official archive; delete it and fetch {layout.url}."
        ) from e
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DatasetError(
            f"{archive} could not be unpacked ({type(e).__name__}: {e}). "
            f"Delete it and fetch {layout.url} again."
        ) from e
    except OSError as e:
        raise DatasetError(f"could not unpack {archive} into {archive.parent}: {e}") from e
    folder = archive.parent / layout.folder
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise DatasetError(
            f"{archive} did not contain {layout.folder}/{', '.join(missing)}; it is not the official "
            f"archive. Delete it and fetch {layout.url}."
        )
    return folder


def _locate_extracted(
    layout: _ArchiveLayout, split: str, root: Path, needed: Sequence[str], download: bool
) -> Path:
    """Folder holding the ``needed`` files: already extracted, else from a local archive, else downloaded."""
    parents = layout.parents(root)
    for parent in parents:
        folder = parent / layout.folder
        if all((folder / f).is_file() for f in needed):
            return folder
    for parent in parents:
        archive = parent / layout.archive
        if archive.is_file():
            _verify_md5(layout.dataset, archive, layout.url)
            return _extract(layout, archive, needed)
    folder, archive = parents[0] / layout.folder, parents[0] / layout.archive
    md5 = _expected_md5(layout.dataset, layout.archive)
    expected = f"{', '.join(needed)} in {folder}, or the official archive {archive}"
    expected += f" (md5 {md5}) to unpack them from" if md5 else " to unpack them from"
    partial = [parent / layout.folder for parent in parents if (parent / layout.folder).is_dir()]
    if partial:
        missing = [f for f in needed if not (partial[0] / f).is_file()]
        expected += f" ({partial[0]} exists but lacks {', '.join(missing)})"
    what = f"{_title(layout.dataset)} {split} files"
    archive = _fetch_or_fail(layout.dataset, what, archive, layout.url, download, expected)
    return _extract(layout, archive, needed)


# --------------------------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class _CifarSpec:
    layout: _ArchiveLayout
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    names_key: str
    label_key: str


_CIFAR = {
    "cifar10": _CifarSpec(
        _ArchiveLayout("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "label_names",
        "labels",
    ),
    "cifar100": _CifarSpec(
        _ArchiveLayout("cifar100", "cifar-100-python", "cifar-100-python.tar.gz"),
        ("train",),
        ("test",),
        "meta",
        "fine_label_names",
        "fine_labels",
    ),
}


def _load_cifar(info: DatasetInfo, split: str, root: Path, download: bool) -> ImageDataset:
    """The python version of CIFAR: pickled batches read with an allow-list unpickler."""
    spec = _CIFAR[info.name]
    files = spec.train if split == "train" else spec.test
    folder = _locate_extracted(spec.layout, split, root, files, download)
    url = spec.layout.url
    xs, ys = [], []
    for name in files:
        path = folder / name
        _verify_md5(info.name, path, url)
        x, y = _parse(
            path,
            url,
            lambda p: _formats.parse_cifar_batch(
                _formats.load_restricted_pickle(p), spec.label_key, info.num_classes
            ),
        )
        xs.append(x)
        ys.append(y)
    classes = _classes(info)  # the meta file's names win when it is there
    meta_path = folder / spec.meta
    if meta_path.is_file():
        _verify_md5(info.name, meta_path, url)
        classes = _parse(
            meta_path,
            url,
            lambda p: _formats.parse_cifar_meta(
                _formats.load_restricted_pickle(p), spec.names_key, info.num_classes
            ),
        )
    images = xs[0] if len(xs) == 1 else np.concatenate(xs)
    labels = ys[0] if len(ys) == 1 else np.concatenate(ys)
    return _to_dataset(info, split, images, labels, classes)


# ---------------------------------------------------------------------------------------------- SVHN


def _load_svhn(info: DatasetInfo, split: str, root: Path, download: bool) -> ImageDataset:
    """SVHN cropped digits (MATLAB v5 files); the official label 10 means digit 0."""
    filename = f"{split}_32x32.mat"
    url = _URLS["svhn"] + filename
    path = _first_existing([root / "svhn" / filename, root / filename])
    if path is None:
        path = _fetch_or_fail("svhn", f"SVHN {split} file", root / "svhn" / filename, url, download)
    _verify_md5("svhn", path, url)
    images, labels = _parse(path, url, _formats.read_svhn_mat)
    return _to_dataset(info, split, images, labels, _classes(info))


# -------------------------------------------------------------------------------------------- STL-10

_STL_LAYOUT = _ArchiveLayout("stl10", "stl10_binary", "stl10_binary.tar.gz")


def _stl_classes(info: DatasetInfo, folder: Path) -> list[str]:
    path = folder / "class_names.txt"
    if not path.is_file():
        return _classes(info)
    names = [
        line.strip()
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
        if line.strip()
    ]
    if len(names) != info.num_classes:
        raise DatasetError(f"{path} lists {len(names)} class names, expected {info.num_classes}; delete it")
    return names


def _load_stl10(info: DatasetInfo, split: str, root: Path, download: bool) -> ImageDataset:
    """STL-10 binary version: raw uint8 images stored column-major, labels 1..10 (none for 'unlabeled')."""
    x_name, y_name = f"{split}_X.bin", f"{split}_y.bin"
    needed = [x_name] if split == "unlabeled" else [x_name, y_name]
    folder = _locate_extracted(_STL_LAYOUT, split, root, needed, download)
    url = _STL_LAYOUT.url
    images = _parse(folder / x_name, url, _formats.read_stl_images)
    if split == "unlabeled":
        labels = np.full(len(images), -1, dtype=np.int64)
    else:
        labels = _parse(folder / y_name, url, _formats.read_stl_labels)
        _check_counts(folder / x_name, len(images), folder / y_name, len(labels))
    return _to_dataset(info, split, images, labels, _stl_classes(info, folder))


_LOADERS: dict[str, Callable[[DatasetInfo, str, Path, bool], ImageDataset]] = {
    "digits": _load_digits,
    "fashion_mnist": _load_idx,
    "mnist": _load_idx,
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "svhn": _load_svhn,
    "stl10": _load_stl10,
}
