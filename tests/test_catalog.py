"""The dataset catalogue: one entry holds every fact about a dataset, and everything that needs one of
those facts reads it from there — so a new dataset is one entry plus its reader."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import probssl.data.catalog as catalog_module
from probssl.data import official_files, open_source, registered_folders, resolve_dataset_info
from probssl.data.catalog import (
    CATALOG,
    DATASETS,
    READERS,
    CatalogEntry,
    DatasetError,
    DatasetInfo,
    canonical_name,
    catalog_entry,
    dataset_names,
    get_dataset_info,
)
from probssl.data.resolve import load_dataset
from probssl.data.shift_sets import load_shift_set, ood_set_names, transfer_set_names
from probssl.data.sources import ArraySource
from probssl.data.views import PRESETS, preset_for_dataset
from probssl.eval.ood_groups import ood_group

SYNTHETIC = {"noise"}  # evaluation sets that need no catalogue entry


def test_every_entry_is_complete_and_names_only_what_exists() -> None:
    names = set(CATALOG)
    aliases = [alias for entry in CATALOG.values() for alias in entry.aliases]
    assert len(aliases) == len(set(aliases)) and not set(aliases) & names
    for name, entry in CATALOG.items():
        assert entry.name == name and DATASETS[name] is entry.info and entry.title
        assert entry.reader in READERS
        if entry.reader == "official_files":
            assert name in official_files._LOADERS, name  # its reader knows it
        else:
            assert registered_folders.is_folder_set(name)
        assert entry.classes is None or len(entry.classes) == entry.info.num_classes
        if entry.preset is None:  # only a set nobody trains on goes without an augmentation preset
            assert "train" not in entry.info.splits, name
        else:
            assert entry.preset in PRESETS, name
        partners = set(entry.ood_sets) | set(entry.transfer_sets) | entry.near_ood | entry.far_ood
        assert partners <= names | SYNTHETIC, (name, partners - names)
        assert name not in partners and not entry.near_ood & entry.far_ood
        assert entry.copy_of is None or entry.copy_of in names
    assert len(DATASETS) == len(CATALOG) and list(DATASETS) == list(CATALOG)


def test_an_entry_with_a_wrong_class_count_or_reader_is_refused() -> None:
    info = DatasetInfo("toy", 1, 4, 3, ("train", "test"), (0.5,), (0.25,))
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        CatalogEntry(info, title="Toy", reader="official_files", classes=("a", "b"), preset="digits")
    with pytest.raises(ValueError, match="reader must be one of"):
        CatalogEntry(info, title="Toy", reader="ftp", classes=None, preset="digits")


def test_the_catalogue_sits_below_every_reader() -> None:
    """It imports nothing of probssl, lazily or not, so no reader can close a cycle through it."""
    tree = ast.parse(Path(catalog_module.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert imported and not [m for m in imported if m.split(".")[0] == "probssl"]


def test_any_spelling_finds_the_same_facts() -> None:
    assert canonical_name(" Fashion-MNIST ") == "fashion_mnist" and canonical_name("Tiny-ImageNet") == (
        "tiny_imagenet_val"
    )
    assert catalog_entry("CIFAR-10") is CATALOG["cifar10"]
    assert ood_set_names("FashionMNIST") == ood_set_names("fashion_mnist") == ("mnist", "noise")
    assert transfer_set_names("CIFAR_10") == ("stl10",)
    assert preset_for_dataset("STL-10") == "stl"
    assert ood_group("CIFAR-100", "tiny_imagenet") == ood_group("cifar100", "tiny_imagenet_val") == "near"
    assert ood_group("cifar10_jpeg", "Tiny-ImageNet") == "near"  # a copy is grouped as its original
    assert ood_group("cifar100", "cifar10_jpeg") == "near" and ood_group("cifar10", "cifar10_jpeg") is None
    assert ood_group("mnist", "/data/my_photos") is None and ood_group("/data/my_photos", "noise") == "far"
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'; valid datasets: cifar10"):
        catalog_entry("imagenet")


def _toy_loader(info: DatasetInfo, split: str, root: Path, download: bool) -> object:
    """The reader half of a new dataset: 12 (train) or 6 (test) seeded 4x4 grey images."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = 12 if split == "train" else 6
    images = rng.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8)
    return official_files._to_dataset(info, split, images, np.arange(n) % 3, list(CATALOG[info.name].classes))


def test_a_new_dataset_is_one_entry_plus_its_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    toy = CatalogEntry(
        DatasetInfo("toy", 1, 4, 3, ("train", "test"), (0.5,), (0.25,)),
        title="Toy",
        reader="official_files",
        classes=("zero", "one", "two"),
        preset="digits",
        ood_sets=("digits", "noise"),
        transfer_sets=("digits",),
        near_ood=frozenset({"digits"}),
        aliases=("toy_set",),
    )
    monkeypatch.setitem(CATALOG, "toy", toy)
    monkeypatch.setitem(official_files._LOADERS, "toy", _toy_loader)

    assert "toy" in dataset_names() and DATASETS["toy"] is toy.info
    assert get_dataset_info("Toy-Set") is toy.info
    train = load_dataset("toy", "train")
    assert train.classes == ["zero", "one", "two"] and train.images.shape == (12, 1, 4, 4)
    source = open_source("toy", "test")
    assert isinstance(source, ArraySource) and len(source) == 6
    assert resolve_dataset_info("toy") is toy.info
    assert load_dataset("toy", "test", image_size=8).images.shape == (6, 1, 8, 8)
    assert preset_for_dataset("toy") == "digits"
    assert ood_set_names("toy") == ("digits", "noise") and transfer_set_names("toy") == ("digits",)
    assert ood_group("toy", "digits") == "near" and ood_group("digits", "toy") is None
    shifted = load_shift_set("toy", "digits", None, download=False)  # seen through digits' eyes: 8x8
    assert shifted.images.shape == (6, 1, 8, 8) and shifted.classes == ["zero", "one", "two"]
    with pytest.raises(DatasetError, match="unknown split 'extra' for toy"):
        load_dataset("toy", "extra")


def test_official_class_names_come_from_the_catalogue() -> None:
    digits = load_dataset("digits", "test")
    assert digits.classes == list(CATALOG["digits"].classes) == [str(d) for d in range(10)]
    replaced = dataclasses.replace(CATALOG["digits"], classes=tuple("abcdefghij"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(CATALOG, "digits", replaced)
        assert load_dataset("digits", "test").classes == list("abcdefghij")
    assert torch.equal(load_dataset("digits", "test").labels, digits.labels)
