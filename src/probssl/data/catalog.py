"""The dataset catalogue: every registered dataset and every fact about it, one entry per dataset.

An entry holds what the rest of the library needs to know about a dataset without reading it: its
shape, splits and normalisation (:class:`DatasetInfo`), how messages name it, its class names, the
augmentation preset it trains with, the OOD and transfer sets it is evaluated against by default, and
which of those OOD sets are near or far. The types every reader shares (:class:`DatasetError`,
:class:`ImageDataset`, :class:`DatasetInfo`) live here too, so readers depend on the catalogue and
never the reverse: this module imports nothing else of probssl.

Adding a dataset is one :class:`CatalogEntry` below plus its reader: the module named by ``reader``
(:mod:`probssl.data.official_files` for official file formats, :mod:`probssl.data.registered_folders`
for tars of images) gets the code that parses its files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "CATALOG",
    "DATASETS",
    "READERS",
    "CatalogEntry",
    "DatasetError",
    "DatasetInfo",
    "ImageDataset",
    "canonical_name",
    "catalog_entry",
    "dataset_names",
    "default_data_dir",
    "find_entry",
    "get_dataset_info",
]


class DatasetError(RuntimeError):
    """A data problem the user can fix (missing, corrupt or unexpected files); the message says how."""


@dataclass(repr=False)
class ImageDataset:
    """A whole split in memory: uint8 images [N, C, H, W] and int64 labels [N] (-1 = unlabeled)."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {self.images.dtype} {list(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(f"labels must be int64 [N], got {self.labels.dtype} {list(self.labels.shape)}")
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")
        self.images = self.images.contiguous()
        self.labels = self.labels.contiguous()
        self.classes = list(self.classes)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageDataset:
        """The examples at ``indices`` (integer indices or a boolean mask), same name/split/classes."""
        idx = torch.as_tensor(indices)
        if idx.dtype != torch.bool:
            idx = idx.to(torch.int64)
        return ImageDataset(self.name, self.split, self.images[idx], self.labels[idx], list(self.classes))

    def __repr__(self) -> str:  # the default dataclass repr would print the tensors
        n, c, h, w = self.images.shape
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={n}, shape=[{c}, {h}, {w}], "
            f"classes={self.num_classes})"
        )


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset; mean/std are per channel of the training images scaled to [0, 1]."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    splits: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


#: The modules that read a registered dataset's files, by the value of :attr:`CatalogEntry.reader`.
READERS = ("official_files", "registered_folders")


@dataclass(frozen=True)
class CatalogEntry:
    """Everything probssl knows about one registered dataset before reading it.

    Attributes:
        info: channels, image size, number of classes, splits and per-channel mean/std.
        title: the dataset's name in messages ("Fashion-MNIST").
        reader: the module that parses its files (one of :data:`READERS`).
        classes: class names in label order; ``None`` where only the files know them (Tiny-ImageNet's
            WordNet ids). A reader may prefer the names the files themselves carry.
        preset: its augmentation recipe, a key of :data:`probssl.data.views.PRESETS`; ``None`` for an
            evaluation-only set (no training split), which then gets the preset of the images it looks like.
        ood_sets: the OOD sets evaluation uses by default (``eval.ood_sets`` replaces them).
        transfer_sets: the transfer targets evaluation uses by default (``eval.transfer_sets``).
        near_ood, far_ood: the OOD sets that are near / far from it (:mod:`probssl.eval.ood_groups`:
            OpenOOD's grouping); a set in neither is left out of the group means rather than guessed.
        copy_of: the dataset it re-encodes, whose semantics (and so near / far grouping) it shares.
        aliases: other spellings accepted for its name (case and '-' / '_' never matter).
    """

    info: DatasetInfo
    title: str
    reader: str
    classes: tuple[str, ...] | None
    preset: str | None
    ood_sets: tuple[str, ...] = ("noise",)
    transfer_sets: tuple[str, ...] = ()
    near_ood: frozenset[str] = frozenset()
    far_ood: frozenset[str] = frozenset()
    copy_of: str | None = None
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.reader not in READERS:
            raise ValueError(f"{self.info.name}: reader must be one of {READERS}, got {self.reader!r}")
        if self.classes is not None and len(self.classes) != self.info.num_classes:
            raise ValueError(
                f"{self.info.name}: {len(self.classes)} class names for {self.info.num_classes} classes"
            )

    @property
    def name(self) -> str:
        return self.info.name


DIGIT_CLASSES = tuple(str(d) for d in range(10))
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple(
    """
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower
leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid
otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray
road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar
sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle
wardrobe whale willow_tree wolf woman worm
""".split()  # noqa: SIM905 - the 100 fine label names, in label order
)
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
EUROSAT_CLASSES = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
    "Residential", "River", "SeaLake",
)  # fmt: skip

# mean/std: digits and Fashion-MNIST computed from the files; the other official sets carry the widely
# published values. The registered folder sets' were computed from their files with
# probssl.data.resolve.channel_stats (train split; all of tiny_imagenet_val), checked by
# tests/test_registered_folders.py (slow) when the files are present.
#
# OOD and transfer pairings follow design.md §4: Fashion-MNIST → MNIST, CIFAR-10 → SVHN; digits gets
# the other grey set (8×8 Fashion-MNIST); cifar10_jpeg gets Tiny-ImageNet validation (near), MNIST (far,
# grey → RGB at 32 px) and EuroSAT as transfer target. Synthetic ``noise`` needs no files and is far
# from everything. Near / far follow OpenOOD (Yang et al. 2022; Zhang et al. 2023, v1.5): for MNIST,
# Fashion-MNIST is near (OpenOOD v1's MNIST benchmark), and by the same criterion (same grey format,
# other classes) MNIST is near for Fashion-MNIST and Fashion-MNIST for digits; CIFAR-10 / CIFAR-100:
# each other and Tiny-ImageNet near, SVHN and MNIST far; SVHN → CIFAR-10 and STL-10 → SVHN far (digits
# vs natural objects).
_ENTRIES = (
    CatalogEntry(
        DatasetInfo("digits", 1, 8, 10, ("train", "test"), (0.3056,), (0.3760,)),
        title="digits",
        reader="official_files",
        classes=DIGIT_CLASSES,
        preset="digits",
        ood_sets=("fashion_mnist", "noise"),
        transfer_sets=("mnist",),
        near_ood=frozenset({"fashion_mnist"}),
    ),
    CatalogEntry(
        DatasetInfo("fashion_mnist", 1, 28, 10, ("train", "test"), (0.2860,), (0.3530,)),
        title="Fashion-MNIST",
        reader="official_files",
        classes=FASHION_CLASSES,
        preset="mnist",
        ood_sets=("mnist", "noise"),
        transfer_sets=("mnist",),
        near_ood=frozenset({"mnist"}),
        aliases=("fashionmnist",),
    ),
    CatalogEntry(
        DatasetInfo("mnist", 1, 28, 10, ("train", "test"), (0.1307,), (0.3081,)),
        title="MNIST",
        reader="official_files",
        classes=DIGIT_CLASSES,
        preset="mnist",
        ood_sets=("fashion_mnist", "noise"),
        transfer_sets=("fashion_mnist",),
        near_ood=frozenset({"fashion_mnist"}),
    ),
    CatalogEntry(
        DatasetInfo(
            "cifar10", 3, 32, 10, ("train", "test"), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        ),
        title="CIFAR-10",
        reader="official_files",
        classes=CIFAR10_CLASSES,
        preset="cifar",
        ood_sets=("svhn", "noise"),
        transfer_sets=("stl10",),
        near_ood=frozenset({"cifar100", "tiny_imagenet_val"}),
        far_ood=frozenset({"svhn", "mnist"}),
        aliases=("cifar_10",),
    ),
    CatalogEntry(
        DatasetInfo(
            "cifar100", 3, 32, 100, ("train", "test"), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
        ),
        title="CIFAR-100",
        reader="official_files",
        classes=CIFAR100_CLASSES,
        preset="cifar",
        ood_sets=("svhn", "noise"),
        transfer_sets=("cifar10",),
        near_ood=frozenset({"cifar10", "tiny_imagenet_val"}),
        far_ood=frozenset({"svhn", "mnist"}),
        aliases=("cifar_100",),
    ),
    CatalogEntry(
        DatasetInfo(
            "svhn", 3, 32, 10, ("train", "test", "extra"), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
        ),
        title="SVHN",
        reader="official_files",
        classes=DIGIT_CLASSES,
        preset="cifar",
        ood_sets=("cifar10", "noise"),
        transfer_sets=("mnist",),
        far_ood=frozenset({"cifar10"}),
    ),
    CatalogEntry(
        DatasetInfo(
            "stl10",
            3,
            96,
            10,
            ("train", "test", "unlabeled"),
            (0.4467, 0.4398, 0.4066),
            (0.2603, 0.2566, 0.2713),
        ),
        title="STL-10",
        reader="official_files",
        classes=STL10_CLASSES,
        preset="stl",
        ood_sets=("svhn", "noise"),
        transfer_sets=("cifar10",),
        far_ood=frozenset({"svhn"}),
        aliases=("stl_10",),
    ),
    CatalogEntry(
        DatasetInfo(
            "cifar10_jpeg",
            3,
            32,
            10,
            ("train", "test", "all"),
            (0.4913, 0.4821, 0.4465),
            (0.2452, 0.2428, 0.2606),
        ),
        title="CIFAR-10 (JPEG q75 copy)",
        reader="registered_folders",
        classes=CIFAR10_CLASSES,
        preset="cifar",
        ood_sets=("tiny_imagenet_val", "mnist", "noise"),
        transfer_sets=("eurosat_test",),
        copy_of="cifar10",
    ),
    CatalogEntry(
        DatasetInfo(
            "tiny_imagenet_val",
            3,
            64,
            200,
            ("test", "all"),
            (0.4824, 0.4495, 0.3981),
            (0.2765, 0.2691, 0.2825),
        ),
        title="Tiny-ImageNet-200 validation",
        reader="registered_folders",
        classes=None,
        preset=None,
        aliases=("tiny_imagenet",),
    ),
    CatalogEntry(
        DatasetInfo(
            "eurosat_test",
            3,
            64,
            10,
            ("train", "test", "all"),
            (0.3449, 0.3805, 0.4074),
            (0.2040, 0.1356, 0.1134),
        ),
        title="EuroSAT RGB test copy",
        reader="registered_folders",
        classes=EUROSAT_CLASSES,
        preset="cifar",
        aliases=("eurosat",),
    ),
)

CATALOG: dict[str, CatalogEntry] = {entry.name: entry for entry in _ENTRIES}


class _InfoColumn(Mapping[str, DatasetInfo]):
    """The catalogue's ``info`` column, read through: it cannot disagree with the entries."""

    def __getitem__(self, name: str) -> DatasetInfo:
        return CATALOG[name].info

    def __iter__(self) -> Iterator[str]:
        return iter(CATALOG)

    def __len__(self) -> int:
        return len(CATALOG)


#: Every registered dataset's :class:`DatasetInfo`, by name.
DATASETS: Mapping[str, DatasetInfo] = _InfoColumn()


def default_data_dir() -> Path:
    """``$PROBSSL_DATA`` if set, else ``./data`` (made absolute so error messages show full paths)."""
    env = os.environ.get("PROBSSL_DATA")
    return Path(env).expanduser().absolute() if env else Path("data").absolute()


def dataset_names() -> list[str]:
    return sorted(CATALOG)


def canonical_name(name: str) -> str:
    """``name`` as the catalogue spells it: case and '-'/'_' insensitive, aliases resolved. A name that
    is not registered comes back normalised the same way (callers check membership)."""
    key = str(name).strip().lower().replace("-", "_")
    return next((entry.name for entry in CATALOG.values() if key in entry.aliases), key)


def find_entry(name: str) -> CatalogEntry | None:
    """The catalogue entry of ``name`` (any spelling), or ``None`` for a path or an unknown name."""
    return CATALOG.get(canonical_name(name))


def catalog_entry(name: str) -> CatalogEntry:
    """The catalogue entry of ``name``; an unknown name raises :class:`DatasetError` listing them."""
    entry = find_entry(name)
    if entry is None:
        raise DatasetError(
            f"unknown dataset '{name}'; valid datasets: {', '.join(dataset_names())} (or a path to a folder "
            f"of images, a .tar of one, or an image file)"
        )
    return entry


def get_dataset_info(name: str) -> DatasetInfo:
    """Info for ``name`` (case and '-'/'_' insensitive); an unknown name lists the valid ones."""
    return catalog_entry(name).info
