"""Registered image-folder sets: tar files of public re-distributions, read in place.

These are **not** the official releases, and results on them are not digit-for-digit comparable
with results on the official files (say so wherever their numbers appear):

- ``cifar10_jpeg``: CIFAR-10 as re-published one JPEG (quality 75, 4:2:0) per image — lossy, about
  30 dB PSNR against the originals. ``cifar10_jpeg/train.tar`` (``train/<class>/NNNN.jpg``, 50,000)
  and ``cifar10_jpeg/test.tar`` (10,000). Classes in the official label order, which is alphabetical.
- ``tiny_imagenet_val``: the official 10,000 Tiny-ImageNet-200 validation images (64x64 JPEG,
  200 classes, labels from ``val_annotations.txt``). An evaluation / near-OOD set: split ``test``
  (= ``all``) only.
- ``eurosat_test``: a published EuroSAT RGB test split, 2,700 64x64 PNGs in folders ``test/0``..``9``.
  A transfer target: split into fixed, stratified, seeded halves ``train`` / ``test`` (``all``: both).
  The class names follow the usual EuroSAT order, which the copy does not store (assumed).

The catalogue (:mod:`probssl.data.catalog`) holds everything else about them (shape, splits, class
names, evaluation partners); this module reads their tars. They are never downloaded: the files
must be under ``data_dir/<name>/``. Each tar is checked against the sha256 published with the copy
once per (size, mtime), the result kept in the cache; ``verify=False`` (``data.verify=false``) skips
the check for one's own copies.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from probssl.data import decode_cache, image_folder, tar_reader
from probssl.data.catalog import CATALOG, DatasetError
from probssl.data.file_source import FileSource, Items

__all__ = ["SHA256", "is_folder_set", "open_folder_set", "verify_sha256"]

# sha256 of each file, relative to data_dir (from the copy's README). Tests patch this table.
SHA256: dict[str, str] = {
    "cifar10_jpeg/train.tar": "b23fb09a1bd75d4f30af8e06a109462e56545495901e91215e70aa3fe079903a",
    "cifar10_jpeg/test.tar": "53b4006e60829e00f2ffe3106b1159a49806f38be5cba008bcb1098cc469e7c7",
    "tiny_imagenet_val/tiny-imagenet-200-val.tar": (
        "8ae24f351dc3cef843046d30aea3dc916e19b8ad32f3cd83053b218c133c74f3"
    ),
    "eurosat_test/eurosat-rgb-test.tar": "82a35053ee7c83d9d9a4ea8fcd77deaf0bd577272c8396d1a224d1fdd37b5a95",
}

_EUROSAT_SPLIT_SEED = 0


@dataclass(frozen=True)
class _Part:
    """What one tar of a set contributes: its items, their labels, the classes."""

    items: Items
    labels: np.ndarray
    classes: list[str]


def is_folder_set(name: str) -> bool:
    """Whether the catalogue has ``name`` (its catalogue spelling) read by this module."""
    entry = CATALOG.get(name)
    return entry is not None and entry.reader == "registered_folders"


# ------------------------------------------------------------------------------------------ checks

_SHA_MEMO: dict[str, str] = {}


def verify_sha256(path: Path, expected: str, cache_dir: str | os.PathLike[str] | None = None) -> None:
    """Compare ``path``'s sha256 with ``expected``; the hash is streamed once per (path, size, mtime)."""
    key = decode_cache.file_key(path)
    actual = _SHA_MEMO.get(key)
    if actual is None:
        record = decode_cache.cache_path("sha256", key, ".json", cache_dir)
        cached = decode_cache.read_json(record)
        if isinstance(cached, dict) and isinstance(cached.get("sha256"), str):
            actual = cached["sha256"]
        else:
            from probssl.io import sha256_file

            actual = sha256_file(path)
            decode_cache.write_json(record, {"path": str(path), "sha256": actual})
        _SHA_MEMO[key] = actual
    if actual != expected:
        raise DatasetError(
            f"{path} has sha256 {actual}, but the registered copy has sha256 {expected}: it is damaged, "
            f"truncated or a different file. Replace it with the published copy, or, if it is your own "
            f"copy on purpose, skip the check with data.verify=false"
        )


def _tar_file(name: str, relative: str, root: Path, verify: bool, cache_dir: str | None) -> Path:
    path = root / relative
    if not path.is_file():
        raise DatasetError(
            f"{name} file not found: expected {path} (sha256 {SHA256.get(relative, 'unknown')}). This set is "
            f"never downloaded: copy it there, or point data_dir (--data-dir on the command line, or the "
            f"PROBSSL_DATA environment variable) at the directory holding {relative}"
        )
    if verify and relative in SHA256:
        verify_sha256(path, SHA256[relative], cache_dir)
    return path


def _index(path: Path, cache_dir: str | None) -> tar_reader.TarIndex:
    try:
        return tar_reader.index_tar(path, cache_dir)
    except tar_reader.UnsafeTarError as e:
        raise DatasetError(f"refusing {path}: {e}; it is not the published copy, replace it") from e
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DatasetError(f"cannot read {path} as a tar ({e}); replace it with the published copy") from e


def _items(path: Path, index: tar_reader.TarIndex, positions: list[int]) -> Items:
    idx = np.asarray(positions, np.int64)
    return Items(
        [f"{path}:{index.names[i]}" for i in positions],
        np.zeros(len(positions), np.int32),
        index.offsets[idx] if len(idx) else np.zeros(0, np.int64),
        index.sizes[idx] if len(idx) else np.zeros(0, np.int64),
        [str(index.path)],
    )


def _folder_part(path: Path, cache_dir: str | None, expect_classes: list[str] | None) -> _Part:
    """A tar holding ``<top>/<class>/<image>``: items and labels by the ordinary layout rules."""
    index = _index(path, cache_dir)
    images = [i for i, n in enumerate(index.names) if image_folder.is_image_name(n)]
    files = [index.names[i] for i in images]
    _, rel, dirs = image_folder.strip_single_top(files, index.dirs)
    try:
        layout = image_folder.plan_layout(rel, dirs, str(path))
    except image_folder.LayoutError as e:
        raise DatasetError(f"{e}; {path} is not the published copy, replace it") from e
    if expect_classes is not None and layout.classes != expect_classes:
        raise DatasetError(
            f"{path} has class folders {layout.classes[:12]}, expected {expect_classes}; "
            f"it is not the published copy, replace it"
        )
    positions, labels = layout.splits["all"]
    return _Part(_items(path, index, [images[p] for p in positions]), labels, layout.classes)


def _tiny_part(path: Path, cache_dir: str | None) -> _Part:
    """Tiny-ImageNet val: ``*/val/images/val_N.JPEG``, labels from ``*/val/val_annotations.txt``."""
    index = _index(path, cache_dir)
    ann = [i for i, n in enumerate(index.names) if n.endswith("val/val_annotations.txt")]
    if len(ann) != 1:
        raise DatasetError(f"{path} holds no val/val_annotations.txt; it is not the published copy")
    fd = os.open(index.path, os.O_RDONLY)
    try:
        text = tar_reader.read_member(fd, int(index.offsets[ann[0]]), int(index.sizes[ann[0]])).decode()
    finally:
        os.close(fd)
    wnid_of = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            wnid_of[fields[0]] = fields[1]
    classes = sorted(set(wnid_of.values()))
    class_index = {c: k for k, c in enumerate(classes)}
    images = [i for i, n in enumerate(index.names) if "/val/images/" in n and image_folder.is_image_name(n)]
    images.sort(key=lambda i: _val_number(index.names[i]))
    missing = [index.names[i] for i in images if PurePosixPath(index.names[i]).name not in wnid_of]
    if missing or not images:
        raise DatasetError(
            f"{path}: {missing[0] if missing else 'val/images/'} has no line in val_annotations.txt; "
            "it is not the published copy"
        )
    labels = np.asarray([class_index[wnid_of[PurePosixPath(index.names[i]).name]] for i in images], np.int64)
    return _Part(_items(path, index, images), labels, classes)


def _val_number(name: str) -> tuple[int, str]:
    stem = PurePosixPath(name).stem
    digits = stem.rsplit("_", 1)[-1]
    return (int(digits), stem) if digits.isdigit() else (1 << 62, stem)


def _eurosat_part(path: Path, cache_dir: str | None, classes: list[str]) -> _Part:
    """Folders ``0``..``9`` of the copy, labelled by number and named by the catalogue's class names."""
    part = _folder_part(path, cache_dir, None)
    if not all(c.isdigit() and int(c) < len(classes) for c in part.classes):
        raise DatasetError(
            f"{path} has class folders {part.classes}, expected 0..9; it is not the published copy"
        )
    labels = np.asarray([int(part.classes[k]) for k in part.labels], np.int64)
    return _Part(part.items, labels, list(classes))


def _halves(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Fixed, stratified, seeded halves: each class's items permuted, the first half is 'train'."""
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        train.append(members[rng.permutation(len(members))[: len(members) // 2]])
    train_idx = np.sort(np.concatenate(train))
    return {"train": train_idx, "test": np.setdiff1d(np.arange(len(labels)), train_idx)}


# ------------------------------------------------------------------------------------------- open


def open_folder_set(
    name: str,
    split: str,
    root: Path,
    image_size: int | None,
    verify: bool,
    skip_corrupt: bool,
    cache_dir: str | None,
) -> FileSource:
    """One split of a registered folder set as a lazy source (the tar is read in place)."""
    info = CATALOG[name].info
    known = list(CATALOG[name].classes or ())  # the catalogue's class names (none for Tiny-ImageNet)
    if split not in info.splits:
        raise DatasetError(f"unknown split '{split}' for {name}; valid splits: {', '.join(info.splits)}")
    if name == "cifar10_jpeg":
        tars = [f"cifar10_jpeg/{s}.tar" for s in (("train", "test") if split == "all" else (split,))]
        parts = [_folder_part(_tar_file(name, t, root, verify, cache_dir), cache_dir, known) for t in tars]
        items = Items.concat([p.items for p in parts])
        labels = np.concatenate([p.labels for p in parts])
        classes = known
    elif name == "tiny_imagenet_val":
        tars = ["tiny_imagenet_val/tiny-imagenet-200-val.tar"]
        part = _tiny_part(_tar_file(name, tars[0], root, verify, cache_dir), cache_dir)
        items, labels, classes = part.items, part.labels, part.classes
    else:
        tars = ["eurosat_test/eurosat-rgb-test.tar"]
        part = _eurosat_part(_tar_file(name, tars[0], root, verify, cache_dir), cache_dir, known)
        items, labels, classes = part.items, part.labels, part.classes
        if split != "all":
            keep = _halves(labels, _EUROSAT_SPLIT_SEED)[split]
            items, labels = items.take(keep), labels[keep]
    identity = decode_cache.digest(name, [decode_cache.file_key(root / t) for t in tars])
    skipped: list[str] = []
    if skip_corrupt:
        from probssl.data.image_scan import scan_items

        scan = scan_items(items, identity, True, cache_dir)
        if scan.bad:
            keep = np.asarray([i for i in range(len(labels)) if i not in scan.bad], np.int64)
            skipped = [items.names[i] for i in sorted(scan.bad)]
            items, labels = items.take(keep), labels[keep]
    size = image_size or info.image_size
    location = decode_cache.digest(name, split, str(root.resolve()))
    return FileSource(name, split, items, labels, classes, info.channels, size, identity, location, skipped)
