"""Which images a folder (or a tar of one) holds, their classes, and its train/test splits.

Layout rules (the README's "Your own images" states them for users):

- ``ROOT/<class>/<image>``: labelled; classes are the sorted folder names, and every image anywhere
  under a class folder belongs to it. An empty class folder is an error (a typo'd or half-copied
  class would otherwise silently vanish).
- ``ROOT/<image>``: flat, unlabelled (labels -1): for self-supervised training and ``embed``.
- ``ROOT/train/`` with ``ROOT/test/`` (or ``ROOT/val/``; ``test`` wins if both exist): those are the
  splits, each laid out by the two rules above; the test classes must be among the train classes.
- Otherwise the test split is carved from the folder: a fixed, stratified 10% of every class (at
  least one image of any class with two or more), chosen by a seeded permutation of the sorted file
  names, so it is the same on every machine and in every run. A flat folder gives a random 10%.
- Split ``all`` is every image. Images are ``.png``, ``.jpg``/``.jpeg``, ``.webp``, ``.bmp``,
  ``.gif`` and ``.tif``/``.tiff`` (any case); other files and hidden files/folders (``.*``,
  ``__MACOSX``) are ignored.
- A tar whose members all lie under one top-level folder is read as that folder (a tar "of" a folder).

Everything here works on relative POSIX names, so a directory walk and a tar index are laid out by
the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from probssl.data._formats import IMAGE_SUFFIXES

__all__ = ["Layout", "LayoutError", "SPLIT_SEED", "TEST_FRACTION", "is_image_name", "plan_layout", "walk"]

TEST_FRACTION = 0.1
SPLIT_SEED = 0
_SPLIT_DIRS = ("train", "test", "val")


class LayoutError(ValueError):
    """The folder does not follow the layout rules; the message says which rule and what to change."""


@dataclass
class Layout:
    """``splits[name] = (indices into the file list, labels)``; labels are -1 for a flat folder."""

    classes: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def _hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def _visible(dirs: list[str]) -> list[str]:
    return [d for d in dirs if d and not any(_hidden(p) for p in d.split("/"))]


def is_image_name(name: str) -> bool:
    """An image by suffix, not hidden (plain string operations: this runs once per tar member)."""
    parts = name.split("/")
    dot = parts[-1].rfind(".")
    return dot > 0 and parts[-1][dot:].lower() in IMAGE_SUFFIXES and not any(_hidden(p) for p in parts)


def walk(root: Path) -> tuple[list[str], list[str], dict[str, tuple[int, int]]]:
    """(image files, folders, {file: (size, mtime_ns)}) under ``root``, as sorted relative POSIX names.

    Hidden entries are skipped; symbolic links are followed, each real folder listed once (so a link
    loop ends). Plain strings and ``os.scandir`` throughout: a folder of 200,000 images is listed in
    about a second, and this runs at the start of every run (it is what detects a changed file).
    """
    files: dict[str, tuple[int, int]] = {}
    dirs: list[str] = []
    seen: set[str] = set()
    stack = [(os.fspath(root), "")]
    while stack:
        here, prefix = stack.pop()
        real = os.path.realpath(here)
        if real in seen:
            continue
        seen.add(real)
        with os.scandir(here) as entries:
            for entry in entries:
                if _hidden(entry.name):
                    continue
                rel = prefix + entry.name
                if entry.is_dir():  # follows links
                    dirs.append(rel)
                    stack.append((entry.path, rel + "/"))
                elif is_image_name(rel) and entry.is_file():
                    st = entry.stat()
                    files[rel] = (st.st_size, st.st_mtime_ns)
    names = sorted(files)
    return names, sorted(dirs), files


def strip_single_top(files: list[str], dirs: list[str]) -> tuple[str, list[str], list[str]]:
    """If every file sits under one top-level folder, drop that folder from the names (tar-of-a-folder)."""
    dirs = _visible(dirs)
    tops = {f.split("/", 1)[0] for f in files}
    loose = any("/" not in f for f in files)
    if len(tops) != 1 or loose:
        return "", files, dirs
    (top,) = tops
    cut = len(top) + 1
    return top, [f[cut:] for f in files], [d[cut:] for d in dirs if d.startswith(top + "/")]


def _carve(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions: ``TEST_FRACTION`` of each label group, by one seeded permutation each."""
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        n_test = round(len(members) * TEST_FRACTION)
        if len(members) >= 2:
            n_test = max(n_test, 1)
        test.append(members[rng.permutation(len(members))[:n_test]])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx.astype(np.int64), test_idx.astype(np.int64)


def _plain(files: list[str], dirs: list[str], where: str) -> tuple[list[str], np.ndarray, list[int]]:
    """(classes, labels, file positions) of a labelled or flat folder; ``where`` names it in errors."""
    parts = [f.split("/") for f in files]
    loose = [i for i, p in enumerate(parts) if len(p) == 1]
    nested = [i for i, p in enumerate(parts) if len(p) > 1]
    class_dirs = sorted({d.split("/")[0] for d in dirs if d} | {parts[i][0] for i in nested})
    if not files:
        raise LayoutError(
            f"no images in {where}; expected {where}/<class>/<image> or {where}/<image> "
            f"({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    if loose and nested:
        examples = f"'{files[loose[0]]}' and '{files[nested[0]]}'"
        raise LayoutError(
            f"{where} mixes loose images and class folders (e.g. {examples}); put every image in a class "
            f"folder (labelled) or none of them (unlabelled)"
        )
    if loose:
        return [], np.full(len(files), -1, np.int64), list(range(len(files)))
    counts = {c: 0 for c in class_dirs}
    for i in nested:
        counts[parts[i][0]] += 1
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise LayoutError(
            f"class folder {where}/{empty[0]} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            f"add some or remove the folder"
        )
    index = {c: k for k, c in enumerate(class_dirs)}
    return class_dirs, np.asarray([index[parts[i][0]] for i in nested], np.int64), nested


def plan_layout(files: list[str], dirs: list[str], where: str, seed: int = SPLIT_SEED) -> Layout:
    """Apply the layout rules to ``files`` (relative POSIX image names, sorted) and ``dirs``."""
    dirs = _visible(dirs)
    tops = {f.split("/", 1)[0] for f in files if "/" in f}
    tops |= {d.split("/")[0] for d in dirs}
    test_dir = "test" if "test" in tops else "val" if "val" in tops else None
    if "train" in tops and test_dir is not None:
        return _split_folders(files, dirs, where, test_dir)
    classes, labels, positions = _plain(files, dirs, where)
    layout = Layout(classes)
    all_idx = np.asarray(positions, np.int64)
    train_pos, test_pos = _carve(labels, seed)
    layout.splits["train"] = (all_idx[train_pos], labels[train_pos])
    layout.splits["test"] = (all_idx[test_pos], labels[test_pos])
    layout.splits["all"] = (all_idx, labels)
    return layout


def _under(names: list[str], top: str) -> tuple[list[str], list[int]]:
    cut = len(top) + 1
    keep = [i for i, n in enumerate(names) if n.startswith(top + "/")]
    return [names[i][cut:] for i in keep], keep


def _split_folders(files: list[str], dirs: list[str], where: str, test_dir: str) -> Layout:
    per_split: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = {}
    for split, folder in (("train", "train"), ("test", test_dir)):
        sub_files, keep = _under(files, folder)
        sub_dirs = [d[len(folder) + 1 :] for d in dirs if d.startswith(folder + "/")]
        classes, labels, positions = _plain(sub_files, sub_dirs, f"{where}/{folder}")
        per_split[split] = (classes, labels, np.asarray([keep[p] for p in positions], np.int64))
    train_classes, test_classes = per_split["train"][0], per_split["test"][0]
    if bool(train_classes) != bool(test_classes):
        raise LayoutError(
            f"{where}/train and {where}/{test_dir} are laid out differently (one has class folders, the "
            f"other loose images); use the same layout in both"
        )
    unknown = sorted(set(test_classes) - set(train_classes))
    if unknown:
        raise LayoutError(
            f"{where}/{test_dir} has class folder(s) {', '.join(unknown[:5])} that {where}/train lacks; "
            f"every test class needs training images: add {where}/train/{unknown[0]}/ with images of it, or "
            f"move {where}/{test_dir}/{unknown[0]}/ out of the data"
        )
    index = {c: k for k, c in enumerate(train_classes)}
    layout = Layout(list(train_classes))
    for split, (classes, labels, idx) in per_split.items():
        mapped = np.asarray([index[classes[k]] for k in labels], np.int64) if classes else labels
        layout.splits[split] = (idx, mapped)
    layout.splits["all"] = tuple(  # type: ignore[assignment]
        np.concatenate([layout.splits[s][k] for s in ("train", "test")]) for k in (0, 1)
    )
    return layout
